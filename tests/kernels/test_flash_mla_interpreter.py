"""flash_mla's Triton kernels under TRITON_INTERPRET=1 against the reference, at tiny shapes.

Every sweep dimension of the anchor's tests appears at small sizes: batch, s_q (multi-token
prediction), lengths (fixed, varlen, zero), h_q (1, 3, 9, 63, 64, 128) and h_kv (1, 2, 3, 8),
causal, bf16 and fp16, forced split-KV with the combine kernel, both metadata call styles, the FP8
cache, sparse decoding (invalid indices, all-invalid rows, topk_length, attn_sink, odd page sizes)
and sparse prefill. Inputs are poisoned (NaN past lengths, 2147480000 in unused block-table slots,
shuffled pages, a block stride wider than a page, non-contiguous q). Tolerances are the anchor's.
The interpreter computes fp8 and our fp32-upcast dots exactly, so this proves indexing and logic;
Hopper numerics are the gpu tier's job (test_flash_mla_gpu.py).
"""

import pytest
import torch

from openinfra.kernels.flash_mla import (
    compare_outputs, flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata, mla_decode_reference,
    mla_sparse_decode_reference, mla_sparse_prefill_reference,
)
from openinfra.kernels.flash_mla.cases import make_dense_case, make_sparse_decode_case, make_sparse_prefill_case

pytestmark = pytest.mark.interpreter

OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
SPARSE_OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_diff_tol=1.0)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("OPENINFRA_KERNELS", "triton")


def _check(out, lse, ref_out, ref_lse, out_tol=OUT_TOL):
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    problems = [compare_outputs("out", out, ref_out, **out_tol), compare_outputs("lse", lse, ref_lse, **LSE_TOL)]
    assert problems == [None, None], problems


# (b, s_q, s_k, h_q, h_kv, varlen, causal, zero_len, dtype, parts, style)
DENSE = [
    (1, 1, 20, 1, 1, False, False, False, torch.bfloat16, None, "lazy"),
    (2, 2, 140, 3, 1, True, True, False, torch.bfloat16, 5, "classic"),
    (2, 4, 140, 9, 3, True, True, True, torch.bfloat16, 3, "classic"),
    (2, 1, 140, 64, 2, False, False, False, torch.bfloat16, None, "lazy"),
    (1, 2, 20, 63, 1, False, True, False, torch.bfloat16, 2, "classic"),
    (2, 1, 140, 128, 1, True, False, True, torch.bfloat16, 4, "classic"),
    (2, 2, 140, 8, 8, True, True, False, torch.float16, 6, "classic"),
    (1, 4, 3, 2, 1, False, True, False, torch.float16, 1, "classic"),  # s_k < s_q: early causal rows see nothing
]


@pytest.mark.parametrize("b,s_q,sk,h_q,h_kv,varlen,causal,zero,dtype,parts,style", DENSE)
def test_dense_decode_matches_reference(b, s_q, sk, h_q, h_kv, varlen, causal, zero, dtype, parts, style):
    c = make_dense_case(b, s_q, sk, h_q, h_kv, varlen=varlen, zero_len=zero, dtype=dtype, seed=sk + h_q,
                        strided_cache=h_q % 2 == 1, noncontiguous_q=s_q > 1)
    if style == "lazy":
        meta, splits = get_mla_metadata()
    else:
        meta, splits = get_mla_metadata(c.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sm_parts=parts)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, splits, causal=causal)
    ref_out, ref_lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, causal)
    _check(out, lse, ref_out, ref_lse)
    if zero:
        empty = c.cache_seqlens == 0
        assert empty.any() and (out[empty] == 0).all() and torch.isposinf(lse[empty]).all()


def test_pieces_first_launch_order_matches_reference(monkeypatch):
    """More schedule pieces than CUDA's second grid dimension takes (a ~65k-request batch) launch
    [pieces, row blocks] instead of [row blocks, pieces]: forced here with a tiny limit, two row
    blocks (h_q = 128), split KV and the combine kernel."""
    from openinfra.kernels.flash_mla import kernel

    monkeypatch.setattr(kernel, "MAX_GRID_Y", 1)
    c = make_dense_case(2, 1, 140, 128, 1, varlen=True, seed=5)
    meta, splits = get_mla_metadata(c.cache_seqlens, 128, 1, num_sm_parts=4)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, splits)
    ref_out, ref_lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, False)
    _check(out, lse, ref_out, ref_lse)


def test_lazy_metadata_is_built_once_and_reused():
    c = make_dense_case(2, 2, 140, 4, 1, varlen=True, seed=9)
    meta, _ = get_mla_metadata()
    out1, lse1 = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, None, causal=True)
    assert meta.have_initialized and meta.tile_scheduler_metadata is not None
    sched = meta.tile_scheduler_metadata
    out2, lse2 = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, None, causal=True)
    assert meta.tile_scheduler_metadata is sched
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    with pytest.raises(ValueError, match="causal"):
        flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, None, causal=False)


def test_fp8_dense_decode_matches_reference():
    c = make_dense_case(2, 2, 140, 16, 1, varlen=True, zero_len=True, seed=4, fp8=True, strided_cache=True)
    meta, splits = get_mla_metadata(c.cache_seqlens, 2 * 16, 1, num_sm_parts=3)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, meta, splits, causal=True,
                                      is_fp8_kvcache=True)
    ref_out, ref_lse = mla_decode_reference(c.q, c.k_cache_bf16, c.block_table, c.cache_seqlens, 512, None, True)
    _check(out, lse, ref_out, ref_lse)


# (b, s_q, h_q, topk, num_blocks, page, fp8, topk_length, sink, parts)
SPARSE = [
    (2, 2, 4, 40, 40, 2, True, False, False, 3),
    (2, 1, 64, 130, 5, 53, True, True, True, None),
    (1, 2, 3, 70, 3, 61, True, True, False, 4),
    (2, 1, 128, 64, 2, 69, True, False, True, 2),
    (2, 2, 8, 100, 4, 64, False, True, True, 5),
]


@pytest.mark.parametrize("b,s_q,h_q,topk,nb,page,fp8,topk_len,sink,parts", SPARSE)
def test_sparse_decode_matches_reference(b, s_q, h_q, topk, nb, page, fp8, topk_len, sink, parts):
    c = make_sparse_decode_case(b, s_q, h_q, topk, nb, page, fp8=fp8, seed=page + h_q, with_topk_length=topk_len,
                                with_sink=sink, all_invalid_rows=True)
    if parts is None:
        meta, splits = get_mla_metadata()
    else:
        lens = torch.full((b,), 0, dtype=torch.int32)  # unused by the sparse schedule, which counts topk
        meta, splits = get_mla_metadata(lens, s_q * h_q, 1, h_q, fp8, topk, num_sm_parts=parts)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, meta, splits, is_fp8_kvcache=fp8,
                                      indices=c.indices, attn_sink=c.attn_sink, topk_length=c.topk_length)
    ref_out, ref_lse = mla_sparse_decode_reference(c.q, c.k_cache, c.indices, 512, None, fp8, c.topk_length,
                                                   c.attn_sink)
    _check(out, lse, ref_out, ref_lse, SPARSE_OUT_TOL)
    assert (out[0, 0] == 0).all() and torch.isposinf(lse[0, :, 0]).all()  # the all-invalid row


@pytest.mark.parametrize("h_q,topk_len,sink", [(4, False, False), (64, True, True)])
def test_sparse_prefill_matches_reference(h_q, topk_len, sink):
    q, kv, idx, tl_, sk = make_sparse_prefill_case(3, 90, h_q, 80, seed=h_q, with_topk_length=topk_len, with_sink=sink)
    kv_strided = torch.cat([kv, kv], dim=2)[:, :, :576]  # token stride 1152: honoured, not copied
    out, mx, lse = flash_mla_sparse_fwd(q, kv_strided, idx, 0.05, 512, sk, tl_)
    ref_out, ref_mx, ref_lse = mla_sparse_prefill_reference(q, kv, idx, 0.05, 512, sk, tl_)
    _check(out, lse, ref_out, ref_lse, SPARSE_OUT_TOL)
    assert compare_outputs("max_logits", mx, ref_mx, **LSE_TOL) is None



@pytest.mark.parametrize("b,s_q,h_q,topk,nb,page,fp8,topk_len,sink,parts", SPARSE)
def test_sparse_decode_gathered_matches_reference(monkeypatch, b, s_q, h_q, topk, nb, page, fp8, topk_len, sink, parts):
    """Hopper's sparse path (gather each query token's valid keys into a dense 16-bit workspace,
    then the dense decode kernel; forced on here, where the interpreter runs the dense Triton
    kernel): same cases and tolerances as the sparse kernel, the all-invalid row included."""
    import openinfra.kernels.flash_mla.sparse_gather as sg

    monkeypatch.setattr(sg, "uses_hopper_sparse_decode", lambda q, h_kv, topk: True)
    monkeypatch.setenv("OPENINFRA_MLA_SPARSE_FUSED", "0")  # the fused kernel is Gluon: GPU tier only
    test_sparse_decode_matches_reference(b, s_q, h_q, topk, nb, page, fp8, topk_len, sink, parts)


def test_sparse_gather_packs_valid_tokens_and_dequantizes_them():
    """The gather alone: each row's valid indices (in range, within topk_length) packed to the front
    in order, and the workspace rows equal to the dequantized cache tokens (FP8 and bf16 caches,
    block stride wider than a page)."""
    from openinfra.kernels.flash_mla import dequantize_kv_cache_fp8
    from openinfra.kernels.flash_mla.sparse_gather import gather_tokens, pack_valid_indices

    for fp8 in (True, False):
        c = make_sparse_decode_case(3, 2, 4, 50, 6, 7, fp8=fp8, seed=5, with_topk_length=True)
        n_tokens = 6 * 7
        packed, counts = pack_valid_indices(c.indices, n_tokens, c.topk_length)
        wide = torch.zeros(6, 9, *c.k_cache.shape[2:], dtype=c.k_cache.dtype)
        wide[:, :7] = c.k_cache
        cache = wide[:, :7]  # block stride 9 tokens
        work = gather_tokens(cache, packed, counts, fp8).view(6, 64, 576)
        flat = (dequantize_kv_cache_fp8(c.k_cache) if fp8 else c.k_cache).view(n_tokens, 576)
        for r in range(6):
            bi = r // 2
            limit = int(c.topk_length[bi])
            row = [int(t) for t in c.indices.view(6, 50)[r, :limit] if 0 <= int(t) < n_tokens]
            assert int(counts[r]) == len(row) and packed[r, :len(row)].tolist() == row
            assert torch.equal(work.view(-1, 576)[r * 64:r * 64 + len(row)], flat[row])


def test_sparse_gather_workspace_size_and_limit():
    """The workspace is b x s_q x topk (rounded up to 64-token pages) bf16 rows of 576; DeepSeek-V3.2's
    decode batch fits the limit, a batch whose workspace would pass it keeps the Triton kernel."""
    from openinfra.kernels.flash_mla.sparse_gather import WORKSPACE_LIMIT, workspace_bytes

    assert workspace_bytes(128, 2, 2048) == 128 * 2 * 2048 * 1152 <= WORKSPACE_LIMIT
    assert workspace_bytes(1, 1, 70) == 128 * 1152
    assert workspace_bytes(1024, 4, 2048) > WORKSPACE_LIMIT
