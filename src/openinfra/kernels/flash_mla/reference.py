"""Exact PyTorch references of every FlashMLA entry point: the CPU path and the test oracle.

All arithmetic is fp32 over keys gathered from the paged cache, per request; nothing past a
request's length, no unused block-table slot and no invalid sparse index is ever read into the
result (they are masked and zeroed, so NaN poison there cannot leak). Conventions, as FlashMLA:

- ``lse`` is the natural-log log-sum-exp of the scaled logits ``softmax_scale * q.k``;
- a query row that sees no key (zero-length request, causal row before the first key, sparse row
  with only invalid indices) gets output 0 and lse ``+inf``;
- ``attn_sink[h]`` scales the output by ``exp(lse) / (exp(lse) + exp(sink))`` and leaves lse alone.
"""

from __future__ import annotations

import torch

from openinfra.kernels.flash_mla.fp8_cache import dequantize_kv_cache_fp8

__all__ = ["mla_decode_reference", "mla_sparse_decode_reference", "mla_sparse_prefill_reference"]


def _attend(
    q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, scale: float, d_v: int,
    attn_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked attention of R independent requests, fp32.

    Args:
        q: [R, h_kv, M, d] query rows grouped by the KV head they read.
        kv: [R, L, h_kv, d] gathered keys (V is the first ``d_v`` dims).
        valid: [R, M, L] bool, which key each row may see.
        attn_sink: [h_kv, M] fp32 or None (already laid out per row).

    Returns:
        out [R, h_kv, M, d_v] fp32, lse [R, h_kv, M] (``+inf`` for rows with no key),
        max_logits [R, h_kv, M] (``-inf`` for rows with no key).
    """
    q = q.float()
    # Zero keys no row may see: they may hold NaN poison, and 0 * NaN would leak through P @ V.
    seen = valid.any(dim=1)  # [R, L]
    kv = torch.where(seen[:, :, None, None], kv.float(), 0.0)
    k = kv.permute(0, 2, 3, 1)  # [R, h_kv, d, L]
    v = kv[..., :d_v].permute(0, 2, 1, 3)  # [R, h_kv, L, d_v]
    s = torch.matmul(q, k) * scale  # [R, h_kv, M, L]
    s = s.masked_fill(~valid[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    max_logits = s.amax(dim=-1) if s.shape[-1] > 0 else torch.full_like(lse, float("-inf"))
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])  # rows with no key: exp(-inf) = 0
    out = torch.matmul(p, v)
    if attn_sink is not None:
        out = out * torch.sigmoid(lse - attn_sink.float())[..., None]  # = e^lse / (e^lse + e^sink)
    out = out.masked_fill(empty[..., None], 0.0)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse, max_logits


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense paged MLA decoding (``flash_mla_with_kvcache`` without ``indices``).

    Args:
        q: [b, s_q, h_q, d] bf16/fp16 (d = 576 for MLA).
        k_cache: [num_blocks, page_block_size, h_kv, d], or [num_blocks, page_block_size, 1, 656]
            bytes when ``is_fp8_kvcache``; any block stride.
        block_table: [b, max_blocks] int32, logical page -> physical page; slots past a request's
            last page are never read.
        cache_seqlens: [b] int32, tokens per request (0 allowed).
        causal: query i of s_q sees keys [0, s_k - s_q + i].

    Returns:
        out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] fp32.
    """
    b, s_q, h_q, d = q.shape
    page = k_cache.shape[1]
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    lens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    max_pages = int((lens.max().item() + page - 1) // page) if b else 0
    slots = torch.arange(max_pages, device=q.device)
    used = slots[None, :] * page < lens[:, None]  # [b, max_pages]
    pages = torch.where(used, block_table[:, :max_pages].to(torch.int64), 0)
    kv = k_cache[pages]  # [b, max_pages, page, h_kv, d or 656]
    if is_fp8_kvcache:
        kv = dequantize_kv_cache_fp8(kv)
    h_kv = kv.shape[3]
    kv = kv.reshape(b, max_pages * page, h_kv, -1)
    g = h_q // h_kv
    # rows of one KV head: (query token, head within the group), the kernel's folding
    qr = q.view(b, s_q, h_kv, g, d).permute(0, 2, 1, 3, 4).reshape(b, h_kv, s_q * g, d)
    pos = torch.arange(max_pages * page, device=q.device)
    row_sq = torch.arange(s_q, device=q.device).repeat_interleave(g)  # [s_q * g]
    valid = pos[None, None, :] < lens[:, None, None]
    if causal:
        limit = lens[:, None] - s_q + row_sq[None, :]  # [b, rows], last key each row may see
        valid = valid & (pos[None, None, :] <= limit[:, :, None])
    else:
        valid = valid.expand(b, s_q * g, -1)
    out, lse, _ = _attend(qr, kv, valid, softmax_scale, head_dim_v, None)
    out = out.view(b, h_kv, s_q, g, head_dim_v).permute(0, 2, 1, 3, 4).reshape(b, s_q, h_q, head_dim_v)
    lse = lse.view(b, h_kv, s_q, g).permute(0, 1, 3, 2).reshape(b, h_q, s_q)
    return out.to(q.dtype), lse


def _sparse_valid(indices: torch.Tensor, num_tokens: int, topk_length: torch.Tensor | None) -> torch.Tensor:
    valid = (indices >= 0) & (indices < num_tokens)
    if topk_length is not None:
        j = torch.arange(indices.shape[-1], device=indices.device)
        tl_ = topk_length.to(device=indices.device, dtype=torch.int64)
        valid = valid & (j < tl_.view(-1, *([1] * (indices.dim() - 1))))
    return valid


def mla_sparse_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    is_fp8_kvcache: bool = True,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decoding: each query token attends to its own top-k cache tokens.

    Args:
        q: [b, s_q, h_q, d] bf16.
        k_cache: [num_blocks, page_block_size, 1, 656] FP8 bytes (``is_fp8_kvcache``) or
            [num_blocks, page_block_size, 1, d] bf16; any page size, any block stride.
        indices: [b, s_q, topk] int32, physical token ``page * page_block_size + offset``; an index
            < 0 or >= num_blocks * page_block_size is invalid (skipped).
        topk_length: [b] int32 or None: only the first topk_length[i] indices of request i count.
        attn_sink: [h_q] fp32 or None.

    Returns:
        out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] fp32.
    """
    b, s_q, h_q, d = q.shape
    nb, page = k_cache.shape[:2]
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    topk = indices.shape[-1]
    idx = indices.to(device=q.device, dtype=torch.int64)
    valid = _sparse_valid(idx, nb * page, topk_length)  # [b, s_q, topk]
    safe = torch.where(valid, idx, 0)
    kv = k_cache[safe // page, safe % page]  # [b, s_q, topk, 1, *]
    if is_fp8_kvcache:
        kv = dequantize_kv_cache_fp8(kv)
    kv = kv.reshape(b * s_q, topk, 1, -1)
    qr = q.reshape(b * s_q, 1, h_q, d)
    sink = attn_sink.view(1, h_q) if attn_sink is not None else None
    out, lse, _ = _attend(qr, kv, valid.view(b * s_q, 1, topk).expand(-1, h_q, -1), softmax_scale, head_dim_v, sink)
    out = out.view(b, s_q, h_q, head_dim_v)
    lse = lse.view(b, s_q, h_q).transpose(1, 2).contiguous()
    return out.to(q.dtype), lse


def mla_sparse_prefill_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill (``flash_mla_sparse_fwd``): each of s_q tokens attends to its top-k of kv.

    Args:
        q: [s_q, h_q, d] bf16; kv: [s_kv, 1, d] bf16; indices: [s_q, 1, topk] int32 into kv's first
            dimension, invalid when < 0 or >= s_kv; topk_length: [s_q] int32 or None.

    Returns:
        out [s_q, h_q, d_v] in q's dtype; max_logits [s_q, h_q] fp32 (-inf for rows with no valid
        index); lse [s_q, h_q] fp32 natural log (+inf for such rows).
    """
    s_q, h_q, d = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    idx = indices.to(device=q.device, dtype=torch.int64).view(s_q, topk)
    valid = _sparse_valid(idx, s_kv, topk_length)
    gathered = kv[torch.where(valid, idx, 0)]  # [s_q, topk, 1, d]
    qr = q.view(s_q, 1, h_q, d)
    sink = attn_sink.view(1, h_q) if attn_sink is not None else None
    out, lse, mx = _attend(qr, gathered, valid.view(s_q, 1, topk).expand(-1, h_q, -1), sm_scale, d_v, sink)
    return out.view(s_q, h_q, d_v).to(q.dtype), mx.view(s_q, h_q), lse.view(s_q, h_q)
