"""deep_gemm references, API semantics and argument checks (unit tier, PyTorch on the CPU).

The references are the CPU path and the oracle of the kernels, so they are held to the issue's bar
here: ``calc_diff < 1e-3`` against the fp32 product of the unquantized inputs.
"""

import pytest
import torch

from openinfra.kernels import deep_gemm as dg
from openinfra.kernels.deep_gemm.gemm.reference import dequantize

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def _quant(x, w):
    return dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)


# --- helpers ------------------------------------------------------------------------------------

def test_calc_diff():
    x = _randn(100, seed=1)
    assert dg.calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert dg.calc_diff(x, -x) == pytest.approx(2.0)
    assert dg.calc_diff(x, x * 1.01) == pytest.approx(0.01**2 / 2, rel=0.05)
    assert dg.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    nan = torch.tensor([1.0, float("nan")])
    assert not dg.calc_diff(nan, torch.ones(2)) < 1e-3
    with pytest.raises(ValueError, match="equal shapes"):
        dg.calc_diff(torch.zeros(2), torch.zeros(3))


def test_alignment_helpers():
    assert dg.get_m_alignment_for_contiguous_layout() == 128
    assert dg.get_mk_alignment_for_contiguous_layout() == 128
    assert dg.align(129, 128) == 256 and dg.ceil_div(129, 128) == 2
    assert dg.get_tma_aligned_size(5, 4) == 8 and dg.get_tma_aligned_size(5, 1) == 16


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 2), (8, 1)])
def test_mn_major_tma_aligned_tensor(shape):
    sf = _randn(*shape, seed=2)
    out = dg.get_mn_major_tma_aligned_tensor(sf)
    assert torch.equal(out, sf)
    mn, kg = shape[-2:]
    aligned = dg.align(mn, 4)
    assert out.stride()[-2:] == (1, aligned)
    if len(shape) == 3:
        assert out.stride(0) == aligned * kg
    assert dg.get_mn_major_tma_aligned_tensor(out) is out  # already in the layout: returned as is
    with pytest.raises(ValueError, match="float32"):
        dg.get_mn_major_tma_aligned_tensor(sf.double())
    with pytest.raises(ValueError, match="2-D"):
        dg.get_mn_major_tma_aligned_tensor(torch.zeros(3))


# --- casts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_block_cast_semantics(use_ue8m0):
    x = _randn(200, 300, seed=3) * torch.exp(_randn(200, 1, seed=4) * 2)
    y, sf = dg.per_block_cast_to_fp8(x, use_ue8m0)
    assert y.dtype == torch.float8_e4m3fn and y.shape == (200, 300) and sf.shape == (2, 3)
    padded = torch.nn.functional.pad(x, (0, 84, 0, 56)).view(2, 128, 3, 128)
    amax = padded.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    want = amax / 448
    if use_ue8m0:
        want = torch.exp2(torch.ceil(torch.log2(want)))
        assert torch.equal(torch.log2(sf), torch.round(torch.log2(sf)))
    torch.testing.assert_close(sf, want, rtol=1e-6, atol=0)
    deq = dequantize(y, sf)
    err = (deq - x).abs() / sf.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert err.max() <= 16  # half an e4m3 step at the top binade (step 32 of 448) in scale units
    assert y.float().abs().max() <= 448


def test_per_channel_cast_semantics():
    x = _randn(300, 70, seed=5)
    y, sf = dg.per_channel_cast_to_fp8(x)
    assert sf.shape == (3, 70)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 84)).view(3, 128, 70)
    torch.testing.assert_close(sf, padded.abs().amax(1).clamp(min=1e-4) / 448, rtol=1e-6, atol=0)
    deq = y.float() * sf.repeat_interleave(128, 0)[:300]
    assert dg.calc_diff(deq, x) < 1e-3


def test_casts_reject_bad_input():
    for fn in (dg.per_block_cast_to_fp8, dg.per_channel_cast_to_fp8):
        with pytest.raises(ValueError, match="x must be 2-D"):
            fn(torch.zeros(2, 3, 4))
        with pytest.raises(ValueError, match="x must be bfloat16"):
            fn(torch.zeros(2, 3, dtype=torch.int32))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            fn([[1.0]])


# --- dense --------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, n, k", [(1, 128, 128), (64, 200, 384), (130, 256, 512)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_nt_reference_accuracy(m, n, k, out_dtype):
    x, w = _randn(m, k, seed=m), _randn(n, k, seed=n)
    d = torch.full((m, n), float("nan"), dtype=out_dtype)
    out = dg.fp8_gemm_nt(*_quant(x, w), d)
    assert out is d and torch.isfinite(d).all()
    assert dg.calc_diff(d, x @ w.T) < 1e-3


def test_fp8_gemm_accumulates_c_and_takes_per_row_b_scales():
    x, w = _randn(64, 256, seed=6), _randn(96, 256, seed=7)
    c = _randn(64, 96, seed=8) * 32
    d = torch.empty(64, 96)
    dg.fp8_gemm_nt(*_quant(x, w), d, c=c)
    assert dg.calc_diff(d, x @ w.T + c) < 1e-3
    wq = dg.per_token_cast_to_fp8(w)  # 1x128 B scales: recipe (1, 1, 128), inferred from the shape
    dg.fp8_gemm_nt(dg.per_token_cast_to_fp8(x), wq, d)
    assert dg.calc_diff(d, x @ w.T) < 1e-3
    d2 = torch.empty(64, 96)
    dg.fp8_gemm_nt(dg.per_token_cast_to_fp8(x), wq, d2, recipe=(1, 1, 128))
    assert torch.equal(d, d2)


def test_layout_aliases_compute_the_same_product():
    x, w = _randn(64, 256, seed=9), _randn(160, 256, seed=10)
    (a, sa), (b, sb) = _quant(x, w)
    base = dg.fp8_gemm_nt((a, sa), (b, sb), torch.empty(64, 160))
    at, sat = a.T.contiguous(), sa.T.contiguous()
    bt, sbt = b.T.contiguous(), sb.T.contiguous()
    assert torch.equal(dg.fp8_gemm_nn((a, sa), (bt, sbt), torch.empty(64, 160)), base)
    assert torch.equal(dg.fp8_gemm_tn((at, sat), (bt, sbt), torch.empty(64, 160)), base)
    assert torch.equal(dg.fp8_gemm_tt((at, sat), (b, sb), torch.empty(64, 160)), base)
    mn_major = dg.get_mn_major_tma_aligned_tensor(sa)
    assert torch.equal(dg.fp8_gemm_nt((a, mn_major), (b, sb), torch.empty(64, 160)), base)


def test_bf16_gemms():
    a, b = _randn(30, 200, seed=11).bfloat16(), _randn(50, 200, seed=12).bfloat16()
    exact = a.float() @ b.float().T
    c = _randn(30, 50, seed=13)
    assert dg.calc_diff(dg.bf16_gemm_nt(a, b, torch.empty(30, 50)), exact) < 1e-6
    assert dg.calc_diff(dg.bf16_gemm_nt(a, b, torch.empty(30, 50), c=c), exact + c) < 1e-6
    assert dg.calc_diff(dg.bf16_gemm_nn(a, b.T.contiguous(), torch.empty(30, 50)), exact) < 1e-6
    assert dg.calc_diff(dg.bf16_gemm_tn(a.T.contiguous(), b.T.contiguous(), torch.empty(30, 50)), exact) < 1e-6
    assert dg.calc_diff(dg.bf16_gemm_tt(a.T.contiguous(), b, torch.empty(30, 50, dtype=torch.bfloat16)), exact) < 1e-5


def test_dense_validation_names_the_problem():
    x, w = _randn(64, 256), _randn(96, 256)
    aq, bq = _quant(x, w)
    d = torch.empty(64, 96)
    with pytest.raises(ValueError, match="K must be a multiple of 128"):
        a2 = dg.per_token_cast_to_fp8(_randn(64, 200))
        dg.fp8_gemm_nt(a2, dg.per_block_cast_to_fp8(_randn(96, 200)), d)
    with pytest.raises(ValueError, match="a must be float8_e4m3fn"):
        dg.fp8_gemm_nt((x, aq[1]), bq, d)
    with pytest.raises(ValueError, match="b scale factors must be float32"):
        dg.fp8_gemm_nt(aq, (bq[0], bq[1].double()), d)
    with pytest.raises(TypeError, match="a must be a \\(tensor, scale_factors\\) pair"):
        dg.fp8_gemm_nt(aq[0], bq, d)
    with pytest.raises(ValueError, match="share K"):
        dg.fp8_gemm_nt(aq, dg.per_block_cast_to_fp8(_randn(96, 384)), d)
    with pytest.raises(ValueError, match="a scale factors must have shape"):
        dg.fp8_gemm_nt((aq[0], aq[1][:10]), bq, d)
    with pytest.raises(ValueError, match="b scale factors must have shape"):
        dg.fp8_gemm_nt(aq, (bq[0], torch.ones(5, 2)), d)
    with pytest.raises(ValueError, match="d must have shape"):
        dg.fp8_gemm_nt(aq, bq, torch.empty(64, 95))
    with pytest.raises(ValueError, match="d must be bfloat16 or float32"):
        dg.fp8_gemm_nt(aq, bq, torch.empty(64, 96, dtype=torch.float16))
    with pytest.raises(ValueError, match="c must have shape"):
        dg.fp8_gemm_nt(aq, bq, d, c=torch.empty(3, 3))
    with pytest.raises(ValueError, match="recipe must be"):
        dg.fp8_gemm_nt(aq, bq, d, recipe=(1, 64, 64))
    with pytest.raises(ValueError, match="a must be bfloat16"):
        dg.bf16_gemm_nt(x, w.bfloat16(), d)


# --- grouped ------------------------------------------------------------------------------------

def _contiguous_problem(ms, n, k, seed=0):
    align = dg.get_m_alignment_for_contiguous_layout()
    total = sum(dg.align(m, align) for m in ms)
    x, w = _randn(total, k, seed=seed), _randn(len(ms), n, k, seed=seed + 1)
    m_indices = torch.full((total,), -1, dtype=torch.int32)
    start = 0
    for g, m in enumerate(ms):
        m_indices[start:start + m] = g
        start += dg.align(m, align)
    bq = [dg.per_block_cast_to_fp8(w[g]) for g in range(len(ms))]
    b = (torch.stack([q[0] for q in bq]), torch.stack([q[1] for q in bq]))
    return x, w, dg.per_token_cast_to_fp8(x), b, m_indices


def test_m_grouped_contiguous_reference():
    x, w, a, b, m_indices = _contiguous_problem([40, 0, 130], 96, 256)
    d = torch.full((m_indices.numel(), 96), 7.0, dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)
    assert (d[m_indices < 0] == 7.0).all()
    for g in range(3):
        rows = m_indices == g
        if rows.any():
            assert dg.calc_diff(d[rows], x[rows] @ w[g].T) < 1e-3


def test_m_grouped_contiguous_validation():
    x, w, a, b, m_indices = _contiguous_problem([40, 130], 96, 256)
    d = torch.empty(m_indices.numel(), 96, dtype=torch.bfloat16)
    bad = m_indices.clone()
    bad[3] = 2
    with pytest.raises(ValueError, match=r"m_indices must be in \[-1, 2\)"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, bad)
    bad = m_indices.clone()
    bad[5] = -3
    with pytest.raises(ValueError, match=r"m_indices must be in"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, bad)
    mixed = m_indices.clone()
    mixed[100] = 1  # expert 1 starting inside expert 0's 128-row block
    with pytest.raises(ValueError, match="mix experts"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, mixed)
    with pytest.raises(ValueError, match="m_indices must be int32"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices.long())
    with pytest.raises(ValueError, match="multiple of 128 rows"):
        short = (a[0][:200], a[1][:200])
        dg.m_grouped_fp8_gemm_nt_contiguous(short, b, d[:200], m_indices[:200])
    with pytest.raises(ValueError, match="b must be 3-D"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, (b[0][0], b[1][0]), d, m_indices)


def _masked_problem(groups, max_m, n, k, seed=0):
    x, w = _randn(groups, max_m, k, seed=seed), _randn(groups, n, k, seed=seed + 1)
    aq = [dg.per_token_cast_to_fp8(x[g]) for g in range(groups)]
    bq = [dg.per_block_cast_to_fp8(w[g]) for g in range(groups)]
    a = (torch.stack([q[0] for q in aq]), torch.stack([q[1] for q in aq]))
    b = (torch.stack([q[0] for q in bq]), torch.stack([q[1] for q in bq]))
    return x, w, a, b


def test_m_grouped_masked_reference_and_validation():
    x, w, a, b = _masked_problem(3, 64, 96, 256)
    masked_m = torch.tensor([0, 17, 64], dtype=torch.int32)
    d = torch.full((3, 64, 96), 7.0)
    dg.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 32)
    for g, m in enumerate(masked_m.tolist()):
        assert (d[g, m:] == 7.0).all()
        if m:
            assert dg.calc_diff(d[g, :m], x[g, :m] @ w[g].T) < 1e-3
    with pytest.raises(ValueError, match=r"masked_m must be in \[0, max_m=64\]"):
        dg.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.tensor([0, 65, 1], dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="expected_m must be a positive int"):
        dg.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 0)
    with pytest.raises(ValueError, match="one entry per group"):
        dg.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m[:2], 32)
    with pytest.raises(ValueError, match="same number of groups"):
        dg.m_grouped_fp8_gemm_nt_masked(a, (b[0][:2], b[1][:2]), d, masked_m, 32)


def test_m_grouped_bf16_forms():
    x, w, _, _, m_indices = _contiguous_problem([50, 128], 64, 128)
    d = torch.full((m_indices.numel(), 64), 7.0)
    dg.m_grouped_bf16_gemm_nt_contiguous(x.bfloat16(), w.bfloat16(), d, m_indices)
    assert (d[m_indices < 0] == 7.0).all()
    rows = m_indices == 1
    assert dg.calc_diff(d[rows], x[rows].bfloat16().float() @ w[1].bfloat16().float().T) < 1e-6
    xm, wm = _randn(2, 32, 128).bfloat16(), _randn(2, 64, 128).bfloat16()
    d = torch.full((2, 32, 64), 7.0)
    dg.m_grouped_bf16_gemm_nt_masked(xm, wm, d, torch.tensor([5, 32], dtype=torch.int32), 16)
    assert (d[0, 5:] == 7.0).all()
    assert dg.calc_diff(d[1], xm[1].float() @ wm[1].float().T) < 1e-6


def _k_grouped_problem(ks, m, n, seed=0):
    total = sum(ks)
    a_full, b_full = _randn(total, m, seed=seed), _randn(total, n, seed=seed + 1)
    return a_full, b_full, dg.per_channel_cast_to_fp8(a_full), dg.per_channel_cast_to_fp8(b_full)


def _flat_k_major(x, ks):
    starts = [sum(ks[:g]) for g in range(len(ks))]
    return torch.cat([x[s:s + k].T.contiguous().flatten() for s, k in zip(starts, ks)])


def test_k_grouped_reference_both_layouts():
    ks = [128, 0, 256]
    a_full, b_full, (a, sa), (b, sb) = _k_grouped_problem(ks, 48, 80)
    c = _randn(3, 48, 80, seed=9)
    kt = torch.tensor(ks, dtype=torch.int32)
    d = torch.full((3, 48, 80), float("nan"))
    dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, kt, c=c)
    start = 0
    for g, k in enumerate(ks):
        exact = a_full[start:start + k].T @ b_full[start:start + k] + c[g]
        assert dg.calc_diff(d[g], exact) < 1e-3
        start += k
    assert torch.equal(d[1], c[1])  # an empty group leaves c
    d2 = torch.full((3, 48, 80), float("nan"))
    dg.k_grouped_fp8_gemm_nt_contiguous((_flat_k_major(a, ks), sa.T.contiguous()),
                                        (_flat_k_major(b, ks), sb.T.contiguous()), d2, ks, kt, c=c)
    assert torch.equal(d, d2)


def test_k_grouped_validation():
    ks = [128, 256]
    _, _, (a, sa), (b, sb) = _k_grouped_problem(ks, 16, 32)
    kt = torch.tensor(ks, dtype=torch.int32)
    d = torch.empty(2, 16, 32)
    with pytest.raises(ValueError, match=r"ks\[1\] must be a non-negative multiple of 128"):
        dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, [128, 200], kt)
    with pytest.raises(ValueError, match="ks_tensor must hold the same values"):
        dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, torch.tensor([256, 128], dtype=torch.int32))
    with pytest.raises(ValueError, match="one entry per group"):
        dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, [384], kt[:1])
    with pytest.raises(ValueError, match=r"a must have shape \(sum\(ks\)=384, 16\)"):
        dg.k_grouped_fp8_gemm_tn_contiguous((a[:, :8], sa), (b, sb), d, ks, kt)
    with pytest.raises(ValueError, match="a must be flat"):
        dg.k_grouped_fp8_gemm_nt_contiguous((a, sa.T), (b, sb.T), d, ks, kt)
    with pytest.raises(TypeError, match="ks must be a list of ints"):
        dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, kt, kt)
