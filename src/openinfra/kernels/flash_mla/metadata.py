"""The tile scheduler: how the KV blocks of a decode step are cut among the GPU's SMs.

Work unit: a 64-token block of one request, for one tile of up to 64 query rows of one KV head.
Each request costs its blocks plus a fixed ``SCHEDULE_OVERHEAD_BLOCKS`` (starting a request: load
q, write an output); the requests are laid end to end and the line is cut into ``num_sm_parts``
equal, contiguous chunks. A request cut by a chunk boundary is computed in pieces ("splits"), each
writing an fp32 partial output and its lse, and the combine kernel merges them; a request that
falls in one chunk is written directly.

``tile_scheduler_metadata`` [num_sm_parts, 8] int32, one row per chunk:
``[begin_req, begin_block, end_req, end_block, begin_split, 0, 0, 0]``: the chunk covers blocks
``[begin_block, ...)`` of ``begin_req`` up to blocks ``[..., end_block)`` of ``end_req``;
``begin_split`` is the split index of its piece of ``begin_req`` (pieces of the other requests are
their first split). ``num_splits`` [num_requests + 1] int32 is the running count of splits:
request i owns partial slots ``[num_splits[i], num_splits[i + 1])`` (0 splits: empty request).

Everything is computed with tensor ops on the lengths' device, with no host synchronisation, so a
decode step under CUDA graphs can rebuild it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from openinfra.kernels.flash_mla.layout import BLOCK_M, PAGE_BLOCK_SIZE, SCHEDULE_OVERHEAD_BLOCKS, ceil_div

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "build_schedule", "default_num_sm_parts", "METADATA_WIDTH"]

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
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # [num_sm_parts, 8] int32
    num_splits: Optional[torch.Tensor] = None  # [num_requests + 1] int32


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU / interpreter: a few parts, enough to exercise splitting


def default_num_sm_parts(device: torch.device, num_heads_k: int, num_q_tokens_per_head_k: int) -> int:
    """Chunks per (KV head, row tile) so that all programs together fill the SMs once."""
    m_blocks = ceil_div(max(num_q_tokens_per_head_k, 1), BLOCK_M)
    return max(_sm_count(device) // (num_heads_k * m_blocks), 1)


def build_schedule(
    lengths: torch.Tensor, num_sm_parts: int, block_tokens: int = PAGE_BLOCK_SIZE,
    overhead_blocks: int = SCHEDULE_OVERHEAD_BLOCKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut requests of ``lengths`` tokens ([n] int) into ``num_sm_parts`` balanced contiguous chunks.

    Returns ``(tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [n + 1] int32)`` on
    ``lengths``' device (see the module docstring for their meaning).
    """
    if num_sm_parts < 1:
        raise ValueError(f"num_sm_parts must be >= 1, got {num_sm_parts}")
    dev = lengths.device
    n = lengths.shape[0]
    lens = lengths.to(torch.int64).clamp(min=0)
    nblk = (lens + block_tokens - 1) // block_tokens
    cost = nblk + overhead_blocks
    c_end = torch.cumsum(cost, 0)
    c_begin = c_end - cost
    total = c_end[-1:] if n else torch.zeros(1, dtype=torch.int64, device=dev)
    per_part = torch.clamp((total + num_sm_parts - 1) // num_sm_parts, min=1)  # [1]
    part = torch.arange(num_sm_parts, device=dev, dtype=torch.int64)
    x = part * per_part  # first position of each chunk
    y = x + per_part  # one past its last position

    def locate(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (request holding position pos, clamped to n - 1; block of pos within it, may be < 0)
        req = torch.searchsorted(c_end, pos, right=True).clamp(max=max(n - 1, 0))
        return req, pos - c_begin[req] - overhead_blocks if n else pos

    begin_req, begin_off = locate(x)
    end_req, end_off = locate(y - 1)
    if n:
        begin_blk = begin_off.clamp(min=0)
        end_blk = torch.minimum((end_off + 1).clamp(min=0), nblk[end_req])
        first_part = (c_begin + overhead_blocks) // per_part  # chunk holding each request's block 0
        last_part = (c_begin + overhead_blocks + nblk - 1) // per_part
        splits = torch.where(nblk > 0, last_part - first_part + 1, 0)
        begin_split = (part - first_part[begin_req]).clamp(min=0)
        empty = x >= total  # chunks past the end of the work
        begin_req = torch.where(empty, n, begin_req)
        end_req = torch.where(empty, n - 1, end_req)
    else:
        begin_blk = end_blk = begin_split = torch.zeros_like(part)
        splits = torch.zeros(0, dtype=torch.int64, device=dev)
        begin_req, end_req = torch.zeros_like(part), torch.full_like(part, -1)
    meta = torch.zeros(num_sm_parts, METADATA_WIDTH, dtype=torch.int32, device=dev)
    meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], meta[:, 4] = begin_req, begin_blk, end_req, end_blk, begin_split
    num_splits = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    num_splits[1:] = torch.cumsum(splits, 0)
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
    ``(tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32)``, computed once
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
