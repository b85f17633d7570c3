"""The tile scheduler: how the KV blocks of a decode step are cut into balanced pieces of work.

Work unit: a 64-token block of one request, for one tile of up to 64 query rows of one KV head.
Each request costs its blocks plus a fixed ``SCHEDULE_OVERHEAD_BLOCKS`` (starting a request: load
q, write an output); the requests are laid end to end and the line is cut into ``num_sm_parts``
equal, contiguous chunks, one per SM's worth of work (FlashMLA's scheme). A request cut by chunk
boundaries is computed in pieces ("splits"), each writing an fp32 partial output and its lse, which
the combine kernel merges; a request inside one chunk is one piece and writes its output directly.

The kernel runs one program per piece, so ``tile_scheduler_metadata`` lists the pieces:
[num_requests + num_sm_parts, 8] int32 (an upper bound on their number: each chunk boundary adds at
most one piece), row ``[req, begin_block, end_block, split, chunk, 0, 0, 0]`` for piece ``split`` of
request ``req`` covering blocks ``[begin_block, end_block)``; unused rows have ``req = -1``. The last
piece of a request has ``end_block = 2^24`` (to the request's end). ``num_splits`` [num_requests + 1]
int32 is the running count of pieces: request i owns partial slots ``[num_splits[i], num_splits[i + 1])``
(0 pieces: an empty request, written by the combine kernel as output 0, lse +inf).

(A first version ran one program per chunk looping over its requests, as FlashMLA does; ptxas then
spilled ~0.8 KB per thread at 64 rows per tile, and none without the outer loop.)

Everything is computed with tensor ops on the lengths' device, with no host synchronisation, so a
decode step under CUDA graphs can rebuild it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from openinfra.kernels.flash_mla.layout import BLOCK_M, PAGE_BLOCK_SIZE, SCHEDULE_OVERHEAD_BLOCKS, ceil_div

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "build_schedule", "default_num_sm_parts", "METADATA_WIDTH", "TO_END"]

METADATA_WIDTH = 8


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduler state for the newer call style: ``get_mla_metadata()`` returns an empty one and the
    first ``flash_mla_with_kvcache`` call fills it; later calls (other layers of the same decode
    step) reuse it and must pass the same shapes, flags and lengths."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # [num_requests + num_sm_parts, 8] int32
    num_splits: Optional[torch.Tensor] = None  # [num_requests + 1] int32


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU / interpreter: a few parts, enough to exercise splitting


# Programs per SM the schedule aims at. Two: on the H200 the 16-row decode tile (113 registers,
# 92 KB of shared memory) fits twice per SM and one CTA's softmax overlaps the other's loads, and
# the finer chunks balance the SMs (benchmarks/notes/flash_mla.md, run 4: h_q = 16 0.46 -> 0.57 of
# copy, h_q = 64 +17%, h_q = 128 +-2%).
PARTS_PER_SM = 2


def default_num_sm_parts(device: torch.device, num_heads_k: int, num_q_tokens_per_head_k: int) -> int:
    """Chunks per (KV head, row tile) so that all programs together fill every SM PARTS_PER_SM times."""
    m_blocks = ceil_div(max(num_q_tokens_per_head_k, 1), BLOCK_M)
    return max(PARTS_PER_SM * _sm_count(device) // (num_heads_k * m_blocks), 1)


TO_END = 1 << 24  # end_block of a request's last piece: run to its end, whatever its length


def build_schedule(
    lengths: torch.Tensor, num_sm_parts: int, block_tokens: int = PAGE_BLOCK_SIZE,
    overhead_blocks: int = SCHEDULE_OVERHEAD_BLOCKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut requests of ``lengths`` tokens ([n] int) into pieces of ``num_sm_parts`` balanced chunks.

    Returns ``(tile_scheduler_metadata [n + num_sm_parts, 8] int32, num_splits [n + 1] int32)`` on
    ``lengths``' device (see the module docstring for their meaning).
    """
    if num_sm_parts < 1:
        raise ValueError(f"num_sm_parts must be >= 1, got {num_sm_parts}")
    dev = lengths.device
    n = lengths.shape[0]
    cap = n + num_sm_parts
    meta = torch.zeros(cap, METADATA_WIDTH, dtype=torch.int32, device=dev)
    num_splits = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    if n == 0:
        meta[:, 0] = -1
        return meta, num_splits
    lens = lengths.to(torch.int64).clamp(min=0)
    nblk = (lens + block_tokens - 1) // block_tokens
    cost = nblk + overhead_blocks
    c_end = torch.cumsum(cost, 0)
    c_begin = c_end - cost
    per_part = torch.clamp((c_end[-1:] + num_sm_parts - 1) // num_sm_parts, min=1)  # [1]
    start = c_begin + overhead_blocks  # position of each request's block 0
    first_part = start // per_part
    last_part = (start + nblk - 1) // per_part
    splits = torch.where(nblk > 0, last_part - first_part + 1, 0)
    cum = torch.cumsum(splits, 0)
    num_splits[1:] = cum
    piece = torch.arange(cap, device=dev, dtype=torch.int64)
    req = torch.searchsorted(cum, piece, right=True)  # the request owning each piece
    used = req < n
    req = req.clamp(max=n - 1)
    k = piece - (cum[req] - splits[req])  # split index within the request
    part = first_part[req] + k
    lo = (part * per_part - start[req]).clamp(min=0)
    hi = torch.minimum((part + 1) * per_part - start[req], nblk[req])
    hi = torch.where(k == splits[req] - 1, TO_END, hi)
    meta[:, 0] = torch.where(used, req, -1)
    meta[:, 1], meta[:, 2], meta[:, 3], meta[:, 4] = lo, hi, k, part
    return meta, num_splits


def get_mla_metadata(
    cache_seqlens: Optional[torch.Tensor] = None,
    num_q_tokens_per_head_k: Optional[int] = None,
    num_heads_k: Optional[int] = None,
    num_heads_q: Optional[int] = None,
    is_fp8_kvcache: bool = False,
    topk: Optional[int] = None,
    *,
    num_sm_parts: Optional[int] = None,
):
    """FlashMLA's scheduler entry point, both call styles.

    Newer style: ``get_mla_metadata()`` (any arguments left out) returns
    ``(FlashMLASchedMeta(), None)``; the schedule is built on the first ``flash_mla_with_kvcache``
    call from the real inputs (including ``topk_length`` for sparse decoding) and reused after.

    Classic style: ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)`` returns
    ``(tile_scheduler_metadata [b + num_sm_parts, 8] int32, num_splits [b + 1] int32)``, computed once
    per decode step and passed to every layer. For sparse decoding pass ``num_heads_q`` and ``topk``:
    each (request, query token) is then scheduled as ``topk`` tokens.

    Args:
        cache_seqlens: [b] int32, tokens per request.
        num_q_tokens_per_head_k: s_q * h_q / h_kv (query rows per KV head).
        num_heads_k: h_kv.
        num_heads_q: h_q (needed with ``topk``).
        is_fp8_kvcache: accepted for compatibility; the schedule does not depend on it.
        topk: sparse decoding's indices per query token.
        num_sm_parts: override the number of chunks (default: SMs / (h_kv * row tiles)).
    """
    if cache_seqlens is None:
        return FlashMLASchedMeta(), None
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens must be a 1-D tensor [b], got {type(cache_seqlens).__name__} "
                         f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if num_q_tokens_per_head_k is None or num_heads_k is None:
        raise ValueError("get_mla_metadata needs num_q_tokens_per_head_k and num_heads_k with cache_seqlens")
    if int(num_q_tokens_per_head_k) < 1:
        raise ValueError(f"num_q_tokens_per_head_k must be >= 1, got {num_q_tokens_per_head_k}")
    if int(num_heads_k) < 1:
        raise ValueError(f"num_heads_k must be >= 1, got {num_heads_k}")
    rows = int(num_q_tokens_per_head_k)
    lengths = cache_seqlens
    if topk is not None:
        if num_heads_q is None:
            raise ValueError("get_mla_metadata with topk (sparse decoding) needs num_heads_q")
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if (rows * num_heads_k) % num_heads_q:
            raise ValueError(f"num_q_tokens_per_head_k * num_heads_k ({rows * num_heads_k}) must be a multiple "
                             f"of num_heads_q ({num_heads_q})")
        s_q = rows * num_heads_k // num_heads_q
        # sparse: one request per (batch, query token), topk tokens each, rows = heads
        lengths = torch.full((cache_seqlens.shape[0] * s_q,), int(topk), dtype=torch.int32, device=cache_seqlens.device)
        rows = num_heads_q // num_heads_k
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(cache_seqlens.device, int(num_heads_k), rows)
    return build_schedule(lengths, int(num_sm_parts))
