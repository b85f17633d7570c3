"""Sizes of DeepSeek's MLA decoding layout, shared by the reference, the kernels and the checks.

MQA form of MLA: every query head carries the absorbed query ``[q_nope @ W_UK (512) | q_rope (64)]``
(576 dims); the cache holds one latent row per token ``[c_kv (512) | k_rope (64)]``. K is the whole
576-dim row, V its first 512 dims (the same storage).

FP8 cache, 656 bytes per token (FlashMLA's "V3.2" layout):
``[0, 512)`` 512 e4m3 values of c_kv; ``[512, 528)`` 4 fp32 scales, one per 128 values, each a power
of two; ``[528, 656)`` the 64 rope values, bf16, unquantized.
"""

from __future__ import annotations

__all__ = [
    "HEAD_DIM_QK", "HEAD_DIM_V", "HEAD_DIM_ROPE", "PAGE_BLOCK_SIZE", "FP8_BYTES_PER_TOKEN",
    "FP8_TILE", "FP8_NUM_TILES", "FP8_SCALE_OFFSET", "FP8_ROPE_OFFSET", "SCHEDULE_OVERHEAD_BLOCKS",
    "BLOCK_M", "ceil_div",
]

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
HEAD_DIM_ROPE = HEAD_DIM_QK - HEAD_DIM_V
PAGE_BLOCK_SIZE = 64  # tokens per page of the dense paged cache

FP8_TILE = 128  # values per scale
FP8_NUM_TILES = HEAD_DIM_V // FP8_TILE
FP8_SCALE_OFFSET = HEAD_DIM_V  # bytes
FP8_ROPE_OFFSET = FP8_SCALE_OFFSET + 4 * FP8_NUM_TILES  # 528 bytes
FP8_BYTES_PER_TOKEN = FP8_ROPE_OFFSET + 2 * HEAD_DIM_ROPE  # 656 bytes

# The tile scheduler charges each request this many 64-token blocks on top of its own blocks: the
# fixed cost of starting a request (loading q, writing the output or a partial), as FlashMLA does.
SCHEDULE_OVERHEAD_BLOCKS = 5

# Query rows (heads x query tokens) folded into one kernel tile.
BLOCK_M = 64

# The decode kernels launch [row blocks, pieces] so that a piece's row blocks run together (L2
# sharing of its pages); CUDA caps the second grid dimension at 65,535, so a schedule with more
# pieces (a batch of ~65k requests) launches [pieces, row blocks] instead.
MAX_GRID_Y = 65535


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
