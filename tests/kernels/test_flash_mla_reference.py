"""flash_mla on the CPU: the references against an independent per-request oracle, the FP8 cache
layout, the tile scheduler's invariants, argument validation, and both metadata call styles.

unit tier: pure PyTorch (the reference path is what the public API runs without a Hopper GPU).
"""

import math

import pytest
import torch

from openinfra.kernels.flash_mla import (
    FlashMLASchedMeta, compare_outputs, dequantize_kv_cache_fp8, flash_mla_sparse_fwd, flash_mla_with_kvcache,
    get_mla_metadata, mla_decode_reference, mla_sparse_decode_reference, mla_sparse_prefill_reference,
    quantize_kv_cache_fp8,
)
from openinfra.kernels.flash_mla.cases import (
    UNUSED_SLOT, make_dense_case, make_sparse_decode_case, make_sparse_prefill_case,
)
from openinfra.kernels.flash_mla.metadata import build_schedule

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")


def _naive_dense(q, k_cache, block_table, lens, causal, scale):
    """The anchor's formulation, written independently: one request at a time, float64."""
    b, s_q, h_q, d = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        pages = block_table[i, : (n + page - 1) // page].long()
        kv = k_cache[pages].reshape(-1, h_kv, d)[:n].double()  # [n, h_kv, d]
        for h in range(h_q):
            k = kv[:, h // (h_q // h_kv)]
            for s in range(s_q):
                last = n - s_q + s if causal else n - 1
                if last < 0 or n == 0:
                    continue
                logits = (k[: last + 1] @ q[i, s, h].double()) * scale
                lse[i, h, s] = torch.logsumexp(logits, 0)
                out[i, s, h] = torch.softmax(logits, 0) @ k[: last + 1, :512]
    return out, lse


@pytest.mark.parametrize("b,s_q,sk,h_q,h_kv,varlen,causal,zero", [
    (2, 1, 20, 3, 1, False, False, False),
    (2, 2, 140, 4, 2, True, True, False),
    (3, 4, 70, 9, 3, True, True, True),
    (1, 2, 1, 8, 8, False, True, False),  # s_k < s_q: the first causal row sees nothing
    (2, 1, 64, 2, 1, False, False, True),
])
def test_dense_reference_matches_naive(b, s_q, sk, h_q, h_kv, varlen, causal, zero):
    c = make_dense_case(b, s_q, sk, h_q, h_kv, varlen=varlen, zero_len=zero, seed=b * 7 + sk, strided_cache=True)
    out, lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, causal)
    ref_out, ref_lse = _naive_dense(c.q, c.k_cache, c.block_table, c.cache_seqlens, causal, 576 ** -0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert compare_outputs("out", out, ref_out.to(torch.bfloat16)) is None
    assert compare_outputs("lse", lse, ref_lse.float(), abs_tol=1e-5, rel_tol=1e-6) is None
    assert not torch.isnan(out).any()


def test_zero_length_gives_zero_output_and_inf_lse():
    c = make_dense_case(2, 2, 64, 4, 1, seed=3)
    lens = torch.tensor([0, 64], dtype=torch.int32)
    out, lse = flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, lens, 512, None)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isposinf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_fp8_quantize_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(3, 5, 1, 576, generator=g) * torch.exp(torch.randn(3, 5, 1, 1, generator=g) * 3)).bfloat16()
    kv[0, 0, 0, :128] = 0.0  # all-zero tile: the amax floor 1e-4 / 448 rounds up to a power of two
    cache = quantize_kv_cache_fp8(kv)
    assert cache.shape == (3, 5, 1, 656) and cache.dtype == torch.float8_e4m3fn
    raw = cache.view(torch.uint8).reshape(-1, 656)
    scales = raw[:, 512:528].contiguous().view(torch.float32)
    m, _ = torch.frexp(scales)
    assert (m == 0.5).all(), "scales must be powers of two"
    nope = kv.reshape(-1, 576)[:, :512].float().view(-1, 4, 128)
    expected = (nope.abs().amax(-1) / 448).clamp(min=1e-4)
    assert (scales >= expected).all() and (scales < 2 * expected).all()
    assert torch.equal(raw[:, 528:].contiguous().view(torch.bfloat16), kv.reshape(-1, 576)[:, 512:])
    back = dequantize_kv_cache_fp8(cache)
    err = (back.float() - kv.float()).reshape(-1, 576)[:, :512].view(-1, 4, 128).abs()
    # |x / scale| <= 448, where e4m3's spacing is at most 32: rounding error <= 16 * scale
    assert (err <= scales[..., None] * 16 + 1e-30).all()
    assert torch.equal(back.reshape(-1, 576)[:, 512:], kv.reshape(-1, 576)[:, 512:])
    # dequantize(quantize(x)) is a fixed point
    assert torch.equal(dequantize_kv_cache_fp8(quantize_kv_cache_fp8(back)), back)


def test_fp8_dense_reference_is_dense_on_dequantized_cache():
    c = make_dense_case(2, 2, 100, 4, 1, varlen=True, seed=5, fp8=True)
    out, lse = mla_decode_reference(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None, True, True)
    out2, lse2 = mla_decode_reference(c.q, c.k_cache_bf16, c.block_table, c.cache_seqlens, 512, None, True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def _naive_sparse(q, kv_flat, idx, valid, scale, sink):
    # q [h, d], kv_flat [T, d] float64; one query token
    keep = [int(i) for i, v in zip(idx, valid) if v]
    if not keep:
        return torch.zeros(q.shape[0], 512, dtype=torch.float64), torch.full((q.shape[0],), math.inf, dtype=torch.float64), \
            torch.full((q.shape[0],), -math.inf, dtype=torch.float64)
    k = kv_flat[keep].double()
    logits = (q.double() @ k.T) * scale
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ k[:, :512]
    if sink is not None:
        out = out * (1 / (1 + torch.exp(sink.double() - lse)))[:, None]
    return out, lse, logits.amax(-1)


@pytest.mark.parametrize("page,fp8,topk_len,sink", [(2, True, False, False), (53, True, True, True), (64, False, True, True)])
def test_sparse_decode_reference_matches_naive(page, fp8, topk_len, sink):
    c = make_sparse_decode_case(2, 2, 3, 40, 6, page, fp8=fp8, seed=page, with_topk_length=topk_len, with_sink=sink,
                                all_invalid_rows=True)
    out, lse = mla_sparse_decode_reference(c.q, c.k_cache, c.indices, 512, None, fp8, c.topk_length, c.attn_sink)
    kv = dequantize_kv_cache_fp8(c.k_cache) if fp8 else c.k_cache
    flat = kv.reshape(-1, 576)
    n_tok = flat.shape[0]
    for i in range(2):
        for s in range(2):
            idx = c.indices[i, s]
            lim = int(c.topk_length[i]) if c.topk_length is not None else idx.numel()
            valid = [(0 <= int(x) < n_tok) and j < lim for j, x in enumerate(idx)]
            o, l, _ = _naive_sparse(c.q[i, s], flat, idx, valid, 576 ** -0.5, c.attn_sink)
            assert compare_outputs("out", out[i, s], o.to(torch.bfloat16)) is None
            assert compare_outputs("lse", lse[i, :, s], l.float(), abs_tol=1e-5, rel_tol=1e-6) is None
    assert torch.isposinf(lse[0, :, 0]).all() and (out[0, 0] == 0).all()  # the all-invalid row
    if sink:
        assert (out[:, :, 1] == 0).all()  # sink = +inf zeroes head 1


@pytest.mark.parametrize("topk_len,sink", [(False, False), (True, True)])
def test_sparse_prefill_reference_matches_naive(topk_len, sink):
    q, kv, idx, tl_, sk = make_sparse_prefill_case(5, 50, 4, 24, seed=11, with_topk_length=topk_len, with_sink=sink)
    out, mx, lse = mla_sparse_prefill_reference(q, kv, idx, 0.07, 512, sk, tl_)
    flat = kv[:, 0]
    for s in range(5):
        lim = int(tl_[s]) if tl_ is not None else 24
        valid = [(0 <= int(x) < 50) and j < lim for j, x in enumerate(idx[s, 0])]
        o, l, m = _naive_sparse(q[s], flat, idx[s, 0], valid, 0.07, sk)
        assert compare_outputs("out", out[s], o.to(torch.bfloat16)) is None
        assert compare_outputs("lse", lse[s], l.float(), abs_tol=1e-5, rel_tol=1e-6) is None
        assert compare_outputs("max", mx[s], m.float(), abs_tol=1e-5, rel_tol=1e-6) is None
    assert torch.isneginf(mx[0]).all() and torch.isposinf(lse[0]).all()
    o2, m2, l2 = flash_mla_sparse_fwd(q, kv, idx, 0.07, 512, sk, tl_)
    assert torch.equal(o2, out) and torch.equal(l2, lse) and torch.equal(m2, mx)


@pytest.mark.parametrize("lens,parts", [([100, 37, 0, 500, 1], 7), ([0, 0], 3), ([4096] * 3, 132), ([1], 1), ([5000, 64, 65], 2)])
def test_schedule_covers_every_block_exactly_once(lens, parts):
    lengths = torch.tensor(lens, dtype=torch.int32)
    meta, splits = build_schedule(lengths, parts)
    assert meta.shape == (len(lens) + parts, 8) and meta.dtype == torch.int32 and splits.shape == (len(lens) + 1,)
    nblk = [(n + 63) // 64 for n in lens]
    seen = {r: [] for r in range(len(lens))}
    for row in meta.tolist():
        req, lo, hi, k, part = row[:5]
        if req < 0:
            continue
        seen[req].append((lo, min(hi, nblk[req]), k, part))
    per_part = {}
    for r, pieces in seen.items():
        blocks = sorted(b for lo, hi, _, _ in pieces for b in range(lo, hi))
        assert blocks == list(range(nblk[r])), f"request {r}: blocks {blocks}"
        assert all(lo < hi for lo, hi, _, _ in pieces), "no empty piece"
        assert splits[r + 1] - splits[r] == len(pieces)
        assert sorted(p[2] for p in pieces) == list(range(len(pieces))), "split indices must be 0..n-1"
        for lo, hi, _, part in pieces:
            per_part[part] = per_part.get(part, 0) + hi - lo + 5
    # balance: no chunk holds much more than its share of blocks + per-request overhead
    total = sum(n + 5 for n in nblk)
    assert all(0 <= p < parts for p in per_part)
    assert max(per_part.values(), default=0) <= -(-total // parts) + 5


def test_metadata_call_styles():
    lens = torch.tensor([100, 300], dtype=torch.int32)
    meta, splits = get_mla_metadata(lens, 2 * 16 // 1, 1)
    assert meta.dtype == torch.int32 and meta.shape[1] == 8 and splits.shape == (3,)
    lazy, none = get_mla_metadata()
    assert isinstance(lazy, FlashMLASchedMeta) and none is None and not lazy.have_initialized
    meta_s, splits_s = get_mla_metadata(lens, 2 * 16, 1, 16, True, 128)  # sparse: b * s_q requests
    assert splits_s.shape == (2 * 2 + 1,)
    with pytest.raises(ValueError, match="num_heads_q"):
        get_mla_metadata(lens, 32, 1, None, True, 128)
    with pytest.raises(ValueError, match="num_heads_k"):
        get_mla_metadata(lens, 32)


def _good():
    c = make_dense_case(2, 1, 70, 4, 2, seed=1)
    return c


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"].float()), "q must be bfloat16"),
    (lambda a: a.update(q=a["q"][..., :512]), "head dim"),
    (lambda a: a.update(q=a["q"][0]), "q must be 4-D"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have q's dtype"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :32]), "page_block_size"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :512]), "k_cache's head dim"),
    (lambda a: a.update(q=torch.zeros(2, 1, 3, 576, dtype=torch.bfloat16)), "divisible by num_heads_k"),
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "cache_seqlens must be int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), "batch size"),
    (lambda a: a.update(head_dim_v=576), "head_dim_v"),
    (lambda a: a["block_table"].__setitem__((1, 0), 10_000), r"block_table\[1, 0\]"),
    (lambda a: a["block_table"].__setitem__((0, 0), -3), r"block_table\[0, 0\]"),
    (lambda a: a.update(cache_seqlens=torch.tensor([70, 10_000], dtype=torch.int32)), "capacity"),
    (lambda a: a.update(attn_sink=torch.zeros(4)), "sparse decoding only"),
    (lambda a: a.update(is_fp8_kvcache=True), "uint8 or float8_e4m3fn"),
])
def test_dense_validation(mutate, match):
    c = _good()
    args = dict(q=c.q, k_cache=c.k_cache, block_table=c.block_table, cache_seqlens=c.cache_seqlens, head_dim_v=512,
                tile_scheduler_metadata=None)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        flash_mla_with_kvcache(**args)


def test_unused_block_table_slots_are_not_checked():
    c = _good()
    assert (c.block_table == UNUSED_SLOT).any()
    flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, 512, None)


def test_sparse_validation():
    c = make_sparse_decode_case(2, 1, 4, 16, 4, 64, seed=0)
    call = lambda **kw: flash_mla_with_kvcache(**{**dict(q=c.q, k_cache=c.k_cache, block_table=None, cache_seqlens=None,
                                                       head_dim_v=512, tile_scheduler_metadata=None,
                                                       is_fp8_kvcache=True, indices=c.indices), **kw})
    call()
    with pytest.raises(ValueError, match="causal"):
        call(causal=True)
    with pytest.raises(ValueError, match="indices must be"):
        call(indices=c.indices[:, :, :0])
    with pytest.raises(ValueError, match="indices must be int32"):
        call(indices=c.indices.long())
    with pytest.raises(ValueError, match="attn_sink"):
        call(attn_sink=torch.zeros(3))
    with pytest.raises(ValueError, match="topk_length"):
        call(topk_length=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="656"):
        call(k_cache=c.k_cache[..., :600])
    with pytest.raises(ValueError, match="1 KV head"):
        call(k_cache=c.k_cache.expand(-1, -1, 2, -1))
    q, kv, idx, _, _ = make_sparse_prefill_case(3, 20, 4, 8)
    with pytest.raises(ValueError, match="d_v"):
        flash_mla_sparse_fwd(q, kv, idx, 0.1, d_v=576)
    with pytest.raises(ValueError, match="indices must be"):
        flash_mla_sparse_fwd(q, kv, idx[:2], 0.1)
    with pytest.raises(ValueError, match="kv must be bfloat16"):
        flash_mla_sparse_fwd(q, kv.half(), idx, 0.1)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_mla_sparse_fwd(q.numpy() if False else [1], kv, idx, 0.1)


def test_docs_example_runs():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "flash_mla.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/flash_mla.md", "exec"), scope)
    out, lse = scope["out"], scope["lse"]
    assert out.shape == (2, 2, 16, 512) and lse.shape == (2, 16, 2)
    # Against the independent float64 oracle (the API runs mla_decode_reference here: comparing with it is no check).
    ref_out, ref_lse = _naive_dense(scope["q"], scope["k_cache"], scope["block_table"], scope["cache_seqlens"],
                                    True, 576 ** -0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert compare_outputs("out", out, ref_out.to(torch.bfloat16)) is None
    assert compare_outputs("lse", lse, ref_lse.float(), abs_tol=1e-5, rel_tol=1e-6) is None
    assert not torch.isnan(out).any()


def test_kernel_config_defaults_and_validation():
    from openinfra.kernels.flash_mla.kernel import KernelConfig
    from openinfra.kernels.flash_mla.warmup import default_variants

    # dense 16-bit cache: the fastest launch of the H200 sweep (benchmarks/notes/flash_mla.md, run 3)
    assert KernelConfig().resolve(16) == (16, 64, 8, 2)
    assert KernelConfig().resolve(2) == (16, 64, 8, 2)  # at least 16 rows: the smallest tensor-core tile
    assert KernelConfig().resolve(32) == (32, 64, 8, 3)
    assert KernelConfig().resolve(128) == (64, 64, 8, 2)
    # FP8 / sparse: the resource-report defaults (64 rows: 32-token tiles, no spills)
    assert KernelConfig().resolve(128, dense_16bit=False) == (64, 32, 8, 3)
    assert KernelConfig(block_n=16, num_stages=4).resolve(40) == (64, 16, 8, 4)
    with pytest.raises(ValueError, match="block_n"):
        KernelConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(block_m=128)
    variants = default_variants([16, 64])
    assert len(variants) == len(set(variants)) and any(v.fp8 and v.sparse for v in variants)


@pytest.mark.parametrize("rows,flags", [(16, {}), (32, {"causal": True}), (128, {}), (128, {"sparse": True, "fp8": True})])
def test_default_configs_fit_sm90(rows, flags):
    """The launch defaults compile for sm_90 within its shared memory (the compiler's report).

    Spills and K-buffer counts are not asserted for the dense defaults: the H200 sweep measured the
    single-buffered 16-row launch and the 64-row launch with 176 B of spills faster than the
    spill-free, triple-staged ones (benchmarks/notes/flash_mla.md, run 3)."""
    import os

    from openinfra.kernels.flash_mla.kernel import KernelConfig
    from openinfra.kernels.flash_mla.resource_report import SMEM_LIMIT_SM90, ptxas_path, resource_report

    if not os.path.exists(ptxas_path()):
        pytest.skip(f"Triton's bundled ptxas is missing at {ptxas_path()}; cannot build for sm_90 here")
    dense = not (flags.get("sparse") or flags.get("fp8"))
    rep = resource_report(*KernelConfig().resolve(rows, dense_16bit=dense), **flags)
    assert rep.shared_bytes <= SMEM_LIMIT_SM90, rep
    if not dense:
        assert rep.spill_store_bytes <= 1024, rep  # ptxas reported 488-536 B for the FP8 variants


def test_gluon_decode_switches(monkeypatch):
    """Where the Gluon decode kernel's own check accepts a call, it still needs a block table, a
    real GPU run (not the interpreter) and OPENINFRA_MLA_GLUON not set to 0."""
    from openinfra.kernels.flash_mla import gluon_kernel
    from openinfra.kernels.flash_mla.kernel import uses_gluon_decode

    monkeypatch.setattr(gluon_kernel, "gluon_decode_supported", lambda *a, **k: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("OPENINFRA_MLA_GLUON", raising=False)
    q, kv = torch.zeros(1, 1, 64, 576), torch.zeros(1, 64, 1, 576)
    flags = dict(sparse=False, is_fp8=False, has_sink=False, write_max=False)
    assert uses_gluon_decode(q, kv, 64, paged=True, **flags)
    assert not uses_gluon_decode(q, kv, 64, paged=False, **flags)
    monkeypatch.setenv("OPENINFRA_MLA_GLUON", "0")
    assert not uses_gluon_decode(q, kv, 64, paged=True, **flags)
    monkeypatch.delenv("OPENINFRA_MLA_GLUON")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not uses_gluon_decode(q, kv, 64, paged=True, **flags)
    # and on this machine the kernel's own check refuses CPU tensors
    monkeypatch.undo()
    assert not gluon_kernel.gluon_decode_supported(q, kv, 64, sparse=False, is_fp8=False, has_sink=False,
                                                   write_max=False)
