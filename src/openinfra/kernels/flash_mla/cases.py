"""Inputs for tests and benchmarks, poisoned the way FlashMLA's own tests poison them.

Everything a kernel must not read holds poison: NaN in the cache past each request's length (the
tail of its last page and its unused pages), 2147480000 in unused block-table slots; physical pages
are handed out in random order; values are ``randn / 10`` clamped to [-1, 1] (the anchor's data).
Optional: a cache whose block stride exceeds one page (a slice of a wider allocation) and a
non-contiguous q.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

import torch

from openinfra.kernels.flash_mla.fp8_cache import quantize_kv_cache_fp8
from openinfra.kernels.flash_mla.layout import HEAD_DIM_QK, PAGE_BLOCK_SIZE, ceil_div

__all__ = ["DenseCase", "SparseDecodeCase", "make_dense_case", "make_sparse_decode_case", "make_sparse_prefill_case",
           "UNUSED_SLOT"]

UNUSED_SLOT = 2147480000


def _randn(shape, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    # Drawn on ``device`` with a generator seeded from ``gen``: real shapes are gigabytes.
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return (torch.randn(shape, generator=dev_gen, device=device) / 10).clamp_(-1.0, 1.0).to(dtype)


@dataclasses.dataclass
class DenseCase:
    q: torch.Tensor  # [b, s_q, h_q, 576]
    k_cache: torch.Tensor  # [num_blocks, 64, h_kv, 576] (or 656 bytes when fp8)
    block_table: torch.Tensor  # [b, max_blocks] int32
    cache_seqlens: torch.Tensor  # [b] int32
    k_cache_bf16: torch.Tensor  # the dequantized cache when fp8, else k_cache itself


def make_dense_case(
    b: int, s_q: int, mean_sk: int, h_q: int, h_kv: int, *, varlen: bool = False, zero_len: bool = False,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0, device="cpu", strided_cache: bool = False,
    noncontiguous_q: bool = False, fp8: bool = False,
) -> DenseCase:
    """A dense decoding case: lengths ``mean_sk`` (or ~N(mean, mean/2), at least s_q, when varlen;
    about half of them 0 when zero_len, the first always)."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = [mean_sk] * b
    if varlen:
        lens = [max(int(rnd.normalvariate(mean_sk, mean_sk / 2)), s_q) for _ in range(b)]
    if zero_len:  # about half zero; always the first, never the last of two or more
        lens = [0 if (i == 0 or rnd.random() < 0.5) and (i < b - 1 or b == 1) else n for i, n in enumerate(lens)]
    page = PAGE_BLOCK_SIZE
    max_blocks = max(ceil_div(max(lens), page), 1) + 1  # one spare slot: always an unused entry
    num_blocks = b * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    rows = page + 5 if strided_cache else page  # block stride larger than one page
    full = _randn((num_blocks, rows, h_kv, HEAD_DIM_QK), gen, dtype if not fp8 else torch.bfloat16, device)
    cache = full[:, :page]
    block_table = perm.clone()
    for i, n in enumerate(lens):
        used = ceil_div(n, page)
        cache[perm[i, used:].long().to(device)] = float("nan")
        if n % page:
            cache[int(perm[i, used - 1]), n % page:] = float("nan")
        block_table[i, used:] = UNUSED_SLOT
    if fp8:
        if h_kv != 1 or dtype != torch.bfloat16:
            raise ValueError("the FP8 cache needs h_kv == 1 and bf16")
        from openinfra.kernels.flash_mla.fp8_cache import dequantize_kv_cache_fp8

        k_cache = quantize_kv_cache_fp8(cache)
        if strided_cache:
            wide = torch.zeros(num_blocks, rows, 1, k_cache.shape[-1], dtype=k_cache.dtype, device=device)
            wide[:, :page] = k_cache
            k_cache = wide[:, :page]
        k_bf16 = dequantize_kv_cache_fp8(k_cache)
    else:
        k_cache = cache if strided_cache else cache.contiguous()
        k_bf16 = k_cache
    if noncontiguous_q:
        wide_q = _randn((b, s_q, h_q, HEAD_DIM_QK + 64), gen, dtype, device)
        q = wide_q[..., 32:32 + HEAD_DIM_QK]
    else:
        q = _randn((b, s_q, h_q, HEAD_DIM_QK), gen, dtype, device)
    return DenseCase(q, k_cache, block_table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), k_bf16)


@dataclasses.dataclass
class SparseDecodeCase:
    q: torch.Tensor  # [b, s_q, h_q, 576] bf16
    k_cache: torch.Tensor  # [num_blocks, page, 1, 656] fp8 bytes (or bf16 576)
    indices: torch.Tensor  # [b, s_q, topk] int32
    topk_length: Optional[torch.Tensor]  # [b] int32
    attn_sink: Optional[torch.Tensor]  # [h_q] fp32


def _poison_indices(idx: torch.Tensor, n_tokens: int, gen: torch.Generator, frac: float) -> torch.Tensor:
    # Replace a fraction of indices by invalid ones: -1, >= n_tokens, huge positive / negative.
    bad = torch.rand(idx.shape, generator=gen) < frac
    kinds = torch.randint(0, 4, idx.shape, generator=gen)
    vals = torch.stack([torch.full_like(idx, -1), torch.full_like(idx, n_tokens) + kinds.to(idx.dtype),
                        torch.full_like(idx, 2**31 - 1), torch.full_like(idx, -(2**31))])
    return torch.where(bad, vals.gather(0, kinds[None]).squeeze(0), idx).to(torch.int32)


def make_sparse_decode_case(
    b: int, s_q: int, h_q: int, topk: int, num_blocks: int, page: int, *, fp8: bool = True, seed: int = 0,
    device="cpu", invalid_frac: float = 0.2, all_invalid_rows: bool = False, with_topk_length: bool = False,
    with_sink: bool = False,
) -> SparseDecodeCase:
    gen = torch.Generator().manual_seed(seed)
    n_tokens = num_blocks * page
    kv = _randn((num_blocks, page, 1, HEAD_DIM_QK), gen, torch.bfloat16, device)
    k_cache = quantize_kv_cache_fp8(kv) if fp8 else kv
    idx = torch.randint(0, n_tokens, (b, s_q, topk), generator=gen, dtype=torch.int32)
    idx = _poison_indices(idx, n_tokens, gen, invalid_frac)
    if all_invalid_rows:
        idx[0, 0] = -1
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32)
        topk_length[0] = topk
        if b > 1:
            topk_length[1] = 0
    sink = None
    if with_sink:
        sink = torch.randn(h_q, generator=gen) * 2
        sink[0] = float("-inf")
        if h_q > 1:
            sink[1] = float("inf")
    q = _randn((b, s_q, h_q, HEAD_DIM_QK), gen, torch.bfloat16, device)
    return SparseDecodeCase(q, k_cache, idx.to(device),
                            None if topk_length is None else topk_length.to(device),
                            None if sink is None else sink.to(device))


def make_sparse_prefill_case(
    s_q: int, s_kv: int, h_q: int, topk: int, *, seed: int = 0, device="cpu", invalid_frac: float = 0.2,
    with_topk_length: bool = False, with_sink: bool = False,
):
    """(q [s_q, h_q, 576], kv [s_kv, 1, 576], indices [s_q, 1, topk], topk_length, attn_sink)."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn((s_q, h_q, HEAD_DIM_QK), gen, torch.bfloat16, device)
    kv = _randn((s_kv, 1, HEAD_DIM_QK), gen, torch.bfloat16, device)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), generator=gen, dtype=torch.int32)
    idx = _poison_indices(idx, s_kv, gen, invalid_frac)
    idx[0] = -1  # a token with no valid index
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (s_q,), generator=gen, dtype=torch.int32).to(device)
    sink = None
    if with_sink:
        sink = (torch.randn(h_q, generator=gen) * 2).to(device)
    return q, kv, idx.to(device), topk_length, sink
