"""flash_mla's Triton kernels on a Hopper GPU at real shapes, against the fp32 reference.

gpu tier. The anchor's sweep (b, s_q, s_k, h_q, h_kv, varlen, causal) is covered by a fixed,
deterministic sample in which every value of every dimension appears (the full product is ~2,000
cases: too long for one device call), plus the anchor's corner case (b=128, zero-length requests),
fp16, the FP8 cache, sparse FP8 decoding at DeepSeek-V3.2's shape and sparse prefill. Tolerances
and poisoning are the anchor's (see test_flash_mla_interpreter.py).
"""

import itertools
import random

import pytest
import torch

from openinfra.kernels.flash_mla import (
    compare_outputs, flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference,
    mla_sparse_decode_reference, mla_sparse_prefill_reference,
)
from openinfra.kernels.flash_mla.cases import make_dense_case, make_sparse_decode_case, make_sparse_prefill_case

pytestmark = pytest.mark.gpu

OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
SPARSE_OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_diff_tol=1.0)


def _sample_sweep(n: int = 40):
    full = [c for c in itertools.product([1, 2, 6, 64], [1, 2, 4], [20, 140, 4096], [1, 3, 9, 63, 64, 126, 128],
                                         [1, 2, 3, 8], [False, True], [False, True]) if c[3] % c[4] == 0]
    rnd = random.Random(1234)
    picked = rnd.sample(full, n)
    # make sure every value of every dimension appears at least once
    for dim, values in enumerate([[1, 2, 6, 64], [1, 2, 4], [20, 140, 4096], [1, 3, 9, 63, 64, 126, 128], [1, 2, 3, 8]]):
        for v in values:
            if not any(c[dim] == v for c in picked):
                picked.append(next(c for c in full if c[dim] == v))
    return picked


def _check(out, lse, ref_out, ref_lse, out_tol=OUT_TOL):
    problems = [compare_outputs("out", out, ref_out, **out_tol), compare_outputs("lse", lse, ref_lse, **LSE_TOL)]
    assert problems == [None, None], problems


@pytest.mark.parametrize("b,s_q,sk,h_q,h_kv,varlen,causal", _sample_sweep())
def test_dense_sweep(b, s_q, sk, h_q, h_kv, varlen, causal):
    c = make_dense_case(b, s_q, sk, h_q, h_kv, varlen=varlen, seed=b + s_q + sk + h_q, device="cuda",
                        strided_cache=(b + h_q) % 2 == 0, noncontiguous_q=s_q == 2)
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, None, causal=causal)
    ref_out, ref_lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, causal)
    _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("h_q,h_kv,causal", [(128, 1, True), (64, 1, False), (63, 3, True), (9, 3, False)])
def test_zero_length_corner(h_q, h_kv, causal):
    c = make_dense_case(128, 2, 4096, h_q, h_kv, varlen=True, zero_len=True, seed=h_q, device="cuda")
    meta, splits = get_mla_metadata(c.cache_seqlens, 2 * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, splits, causal=causal)
    ref_out, ref_lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, causal)
    _check(out, lse, ref_out, ref_lse)


def test_fp16_and_fp8_cache():
    c = make_dense_case(32, 2, 4096, 64, 1, varlen=True, dtype=torch.float16, seed=1, device="cuda")
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, causal=True)
    _check(out, lse, *mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, True))
    c = make_dense_case(32, 1, 4096, 128, 1, varlen=True, seed=2, device="cuda", fp8=True, strided_cache=True)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, is_fp8_kvcache=True)
    _check(out, lse, *mla_decode_reference(c.q, c.k_cache_bf16, c.block_table, c.cache_seqlens, 512, None, False))


@pytest.mark.parametrize("b,s_q,h_q,topk,page,topk_len,sink", [
    (32, 2, 128, 2048, 64, True, True), (8, 1, 64, 512, 2, False, False), (8, 2, 128, 576, 61, True, False),
    (4, 1, 16, 1000, 53, False, True),
])
def test_sparse_decode(b, s_q, h_q, topk, page, topk_len, sink):
    nb = max(8192 // page, 4)
    c = make_sparse_decode_case(b, s_q, h_q, topk, nb, page, seed=page, device="cuda", with_topk_length=topk_len,
                                with_sink=sink, all_invalid_rows=True)
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, meta, None, is_fp8_kvcache=True,
                                      indices=c.indices, attn_sink=c.attn_sink, topk_length=c.topk_length)
    ref = mla_sparse_decode_reference(c.q, c.k_cache, c.indices, 512, None, True, c.topk_length, c.attn_sink)
    _check(out, lse, *ref, SPARSE_OUT_TOL)


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_sparse_decode_hopper_paths(monkeypatch, fused, fp8):
    """Both Hopper sparse paths (the fused kernel with its gathering producer, and gather-then-dense)
    on both cache formats, with invalid indices, an all-invalid row, topk_length, sinks, odd pages."""
    monkeypatch.setenv("OPENINFRA_MLA_SPARSE_FUSED", "1" if fused else "0")
    c = make_sparse_decode_case(6, 2, 64, 700, 300, 37, fp8=fp8, seed=5, device="cuda", with_topk_length=True,
                                with_sink=True, all_invalid_rows=True)
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, meta, None, is_fp8_kvcache=fp8,
                                      indices=c.indices, attn_sink=c.attn_sink, topk_length=c.topk_length)
    ref = mla_sparse_decode_reference(c.q, c.k_cache, c.indices, 512, None, fp8, c.topk_length, c.attn_sink)
    _check(out, lse, *ref, SPARSE_OUT_TOL)


@pytest.mark.parametrize("h_q,topk_len,sink", [(128, False, False), (64, True, True)])
def test_sparse_prefill(h_q, topk_len, sink):
    q, kv, idx, tl_, sk = make_sparse_prefill_case(256, 8192, h_q, 2048, seed=h_q, device="cuda",
                                                   with_topk_length=topk_len, with_sink=sink)
    out, mx, lse = flash_mla_sparse_fwd(q, kv, idx, 576 ** -0.5, 512, sk, tl_)
    ref_out, ref_mx, ref_lse = mla_sparse_prefill_reference(q, kv, idx, 576 ** -0.5, 512, sk, tl_)
    _check(out, lse, ref_out, ref_lse, SPARSE_OUT_TOL)
    assert compare_outputs("max_logits", mx, ref_mx, **LSE_TOL) is None


def test_out_of_range_block_table_raises_on_gpu():
    c = make_dense_case(2, 1, 100, 16, 1, seed=0, device="cuda")
    c.block_table[1, 0] = c.k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None)
