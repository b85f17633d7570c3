"""deep_gemm Triton kernels under TRITON_INTERPRET=1 (interpreter tier), against the references.

fp8 dots are exact in the interpreter, so these prove indexing, masking, tile walks, split-K,
the grouped layouts and the epilogues, not Hopper numerics (the gpu tier does that). Shapes are
tiny and ragged (edge tiles in M and N); outputs are poisoned so unwritten elements show.
"""

import pytest
import torch

from openinfra.kernels import deep_gemm as dg
from openinfra.kernels.deep_gemm.gemm import reference as ref
from openinfra.kernels.deep_gemm.gemm.config import INTERPRETER_CONFIG, GemmConfig
from openinfra.kernels.deep_gemm.gemm.kernel import DENSE, launch_gemm

pytestmark = pytest.mark.interpreter

TIGHT_FP32 = 1e-9   # fp32 out: only the summation order differs from the reference
TIGHT_BF16 = 2e-5   # bf16 out: plus one rounding of the output


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("OPENINFRA_KERNELS", "triton")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _tight(d):
    return TIGHT_FP32 if d.dtype == torch.float32 else TIGHT_BF16


@pytest.mark.parametrize("config, out_dtype", [
    (INTERPRETER_CONFIG, torch.bfloat16),
    (INTERPRETER_CONFIG, torch.float32),
    (GemmConfig(32, 32, split_k=3, group_m=2, num_stages=1, num_warps=4), torch.float32),      # split-K + reduce + C
    (GemmConfig(32, 32, split_k=2, group_m=2, num_stages=1, num_warps=4), torch.bfloat16),     # split-K, bf16 out
    (GemmConfig(16, 64, group_m=1, num_stages=1, num_warps=4, pipeline_promote=True), torch.bfloat16),  # pipelined
    (GemmConfig(32, 32, group_m=2, num_stages=1, num_warps=4, use_tma=False), torch.float32),  # pointer loads
    (GemmConfig(16, 256, group_m=2, num_stages=1, num_warps=4), torch.bfloat16),               # B scales as a vector
    (GemmConfig(32, 32, split_k=4, group_m=2, num_stages=1, num_warps=4, scale_prefetch=1), torch.float32),
    (GemmConfig(16, 256, split_k=3, group_m=2, num_stages=1, num_warps=4, scale_prefetch=2), torch.bfloat16),
], ids=["default-bf16", "default-fp32", "split_k-fp32", "split_k-bf16", "pipelined", "pointer", "wide_n",
        "prefetch1", "prefetch2"])
def test_dense_kernel_matches_reference(config, out_dtype):
    m, n, k = 45, 300, 384
    x, w = _randn(m, k, seed=1), _randn(n, k, seed=2)
    (a, sa), (b, sb) = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    c = _randn(m, n, seed=3) if out_dtype == torch.float32 else None
    d = torch.full((m, n), float("nan"), dtype=out_dtype)
    launch_gemm(DENSE, a, b, d, config, sfa=sa, sfb=sb, c=c)
    expected = ref.fp8_gemm_nt_reference(a, sa, b, sb, torch.empty(m, n), c)
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, expected) < _tight(d)


def test_dense_api_per_row_b_scales_and_mn_major_scales():
    m, n, k = 33, 70, 256
    x, w = _randn(m, k, seed=4), _randn(n, k, seed=5)
    (a, sa), (b, sb) = dg.per_token_cast_to_fp8(x), dg.per_token_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"))
    dg.fp8_gemm_nt((a, dg.get_mn_major_tma_aligned_tensor(sa)), (b, sb), d, recipe=(1, 1, 128))
    expected = ref.fp8_gemm_nt_reference(a, sa, b, sb, torch.empty(m, n))
    assert dg.calc_diff(d, expected) < TIGHT_FP32
    assert dg.calc_diff(d, x @ w.T) < 1e-3


def test_layout_aliases_on_the_pointer_path():
    m, n, k = 40, 96, 256
    x, w = _randn(m, k, seed=6), _randn(n, k, seed=7)
    (a, sa), (b, sb) = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    base = dg.fp8_gemm_nt((a, sa), (b, sb), torch.full((m, n), float("nan")))
    at, sat, bt, sbt = a.T.contiguous(), sa.T.contiguous(), b.T.contiguous(), sb.T.contiguous()
    for fn, aa, bb in [(dg.fp8_gemm_nn, (a, sa), (bt, sbt)), (dg.fp8_gemm_tn, (at, sat), (bt, sbt)),
                       (dg.fp8_gemm_tt, (at, sat), (b, sb))]:
        d = fn(aa, bb, torch.full((m, n), float("nan")))
        assert dg.calc_diff(d, base) < TIGHT_FP32, fn.__name__


def test_bf16_kernel_with_ragged_k():
    a, b = _randn(30, 200, seed=8).bfloat16(), _randn(50, 200, seed=9).bfloat16()  # K=200: masked last slice
    c = _randn(30, 50, seed=10)
    d = torch.full((30, 50), float("nan"))
    dg.bf16_gemm_nt(a, b, d, c=c)
    assert dg.calc_diff(d, a.float() @ b.float().T + c) < TIGHT_FP32
    d = torch.full((50, 30), float("nan"), dtype=torch.bfloat16)
    dg.bf16_gemm_tn(b.T.contiguous(), a.T.contiguous(), d)
    assert dg.calc_diff(d, b.float() @ a.float().T) < TIGHT_BF16


def test_m_grouped_contiguous_kernel_skips_padding():
    align = dg.get_m_alignment_for_contiguous_layout()
    ms = [40, 0, 130, 0]
    total = sum(dg.align(x, align) for x in ms) + align  # plus one block that is all padding
    n, k = 40, 256
    x, w = _randn(total, k, seed=11), _randn(len(ms), n, k, seed=12)
    m_indices = torch.full((total,), -1, dtype=torch.int32)
    start = 0
    for g, mg in enumerate(ms):
        m_indices[start:start + mg] = g
        start += dg.align(mg, align)
    a = dg.per_token_cast_to_fp8(x)
    bq = [dg.per_block_cast_to_fp8(w[g]) for g in range(len(ms))]
    b = (torch.stack([q[0] for q in bq]), torch.stack([q[1] for q in bq]))
    d = torch.full((total, n), 7.0, dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)
    assert (d[m_indices < 0] == 7.0).all()
    expected = ref.m_grouped_fp8_gemm_nt_contiguous_reference(*a, *b, torch.full((total, n), 7.0), m_indices)
    assert dg.calc_diff(d, expected) < TIGHT_BF16
    d16 = torch.full((total, n), 7.0)
    dg.m_grouped_bf16_gemm_nt_contiguous(x.bfloat16(), w.bfloat16(), d16, m_indices)
    expected16 = ref.m_grouped_bf16_gemm_nt_contiguous_reference(x.bfloat16(), w.bfloat16(), torch.full((total, n), 7.0), m_indices)
    assert dg.calc_diff(d16, expected16) < TIGHT_FP32


def test_m_grouped_masked_kernel_leaves_rows_past_the_mask():
    groups, max_m, n, k = 3, 70, 48, 256
    x, w = _randn(groups, max_m, k, seed=13), _randn(groups, n, k, seed=14)
    aq = [dg.per_token_cast_to_fp8(x[g]) for g in range(groups)]
    bq = [dg.per_block_cast_to_fp8(w[g]) for g in range(groups)]
    a = (torch.stack([q[0] for q in aq]), torch.stack([q[1] for q in aq]))
    b = (torch.stack([q[0] for q in bq]), torch.stack([q[1] for q in bq]))
    masked_m = torch.tensor([0, 33, 70], dtype=torch.int32)
    d = torch.full((groups, max_m, n), 7.0)
    dg.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 32)
    expected = ref.m_grouped_fp8_gemm_nt_masked_reference(*a, *b, torch.full((groups, max_m, n), 7.0), masked_m)
    assert dg.calc_diff(d, expected) < TIGHT_FP32
    assert (d[0] == 7.0).all() and (d[1, 33:] == 7.0).all()
    d16 = torch.full((groups, max_m, n), 7.0)
    dg.m_grouped_bf16_gemm_nt_masked(x.bfloat16(), w.bfloat16(), d16, masked_m, 32)
    expected16 = ref.m_grouped_bf16_gemm_nt_masked_reference(x.bfloat16(), w.bfloat16(), torch.full((groups, max_m, n), 7.0), masked_m)
    assert dg.calc_diff(d16, expected16) < TIGHT_FP32


@pytest.mark.parametrize("k_major", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_k_grouped_kernel(k_major, out_dtype, monkeypatch):
    ks, m, n = [128, 0, 256], 40, 72
    total = sum(ks)
    (a, sa), (b, sb) = dg.per_channel_cast_to_fp8(_randn(total, m, seed=15)), dg.per_channel_cast_to_fp8(_randn(total, n, seed=16))
    kt = torch.tensor(ks, dtype=torch.int32)
    c = _randn(3, m, n, seed=17) if out_dtype == torch.float32 else None
    if k_major:
        starts = [0, 128, 128]
        flat = lambda t: torch.cat([t[s:s + k].T.contiguous().flatten() for s, k in zip(starts, ks)])  # noqa: E731
        args = ((flat(a), sa.T.contiguous()), (flat(b), sb.T.contiguous()))
        fn = dg.k_grouped_fp8_gemm_nt_contiguous
    else:
        args, fn = ((a, sa), (b, sb)), dg.k_grouped_fp8_gemm_tn_contiguous
    d = torch.full((3, m, n), float("nan"), dtype=out_dtype)
    fn(*args, d, ks, kt, c=c)
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")
    expected = torch.full((3, m, n), float("nan"), dtype=torch.float32)
    fn(*args, expected, ks, kt, c=c)
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, expected) < _tight(d)


@pytest.mark.parametrize("m, n", [(1, 128), (130, 200), (256, 64)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_block_and_channel_cast_kernels_bitwise(m, n, use_ue8m0):
    from openinfra.kernels.deep_gemm.block_cast.kernel import block_cast_to_fp8_triton
    from openinfra.kernels.deep_gemm.block_cast.reference import (
        per_block_cast_to_fp8_reference, per_channel_cast_to_fp8_reference,
    )

    x = (_randn(m, n, seed=m) * torch.exp(_randn(m, 1, seed=n) * 3)).bfloat16()
    x[0, : min(n, 64)] = 0.0  # zeros exercise the 1e-4 amax floor
    for per_block, rf in [(True, per_block_cast_to_fp8_reference), (False, per_channel_cast_to_fp8_reference)]:
        y, s = block_cast_to_fp8_triton(x, per_block, use_ue8m0)
        ry, rs = rf(x, use_ue8m0)
        assert torch.equal(s, rs)
        assert torch.equal(y.view(torch.uint8), ry.view(torch.uint8))


def test_cast_kernels_honour_strides():
    from openinfra.kernels.deep_gemm.block_cast.kernel import block_cast_to_fp8_triton
    from openinfra.kernels.deep_gemm.block_cast.reference import per_channel_cast_to_fp8_reference

    x = _randn(96, 300, seed=18).bfloat16().t()  # [300, 96], column-major
    y, s = block_cast_to_fp8_triton(x, per_block=False)
    ry, rs = per_channel_cast_to_fp8_reference(x)
    assert torch.equal(s, rs) and torch.equal(y.view(torch.uint8), ry.view(torch.uint8))


def test_fp8_linear_kernels_match_reference_path(monkeypatch):
    layer = dg.FP8Linear(128, 256, dtype=torch.float32)
    x = _randn(2, 20, 128, seed=19).requires_grad_()
    y = layer(x)
    g = _randn(*y.shape, seed=20)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref, (x, layer.weight, layer.bias), g)
    assert dg.calc_diff(y, y_ref) < TIGHT_FP32
    for got, want in zip(grads, grads_ref):
        assert dg.calc_diff(got, want) < TIGHT_FP32


def test_unchecked_layouts_cannot_write_out_of_bounds():
    # Under CUDA-graph capture the host checks of masked_m / m_indices are skipped; the kernels
    # must then clamp rather than write past a group. Call the launcher directly, as capture would.
    from openinfra.kernels.deep_gemm.gemm.kernel import CONTIGUOUS, MASKED

    groups, max_m, n, k = 2, 40, 32, 128
    x, w = _randn(groups, max_m, k, seed=21), _randn(groups, n, k, seed=22)
    aq = [dg.per_token_cast_to_fp8(x[g]) for g in range(groups)]
    bq = [dg.per_block_cast_to_fp8(w[g]) for g in range(groups)]
    a, sa = torch.stack([q[0] for q in aq]), torch.stack([q[1] for q in aq])
    b, sb = torch.stack([q[0] for q in bq]), torch.stack([q[1] for q in bq])
    big = torch.full((groups + 1, max_m, n), 7.0)  # one guard group after the real ones
    d = big[:groups]
    launch_gemm(MASKED, a, b, d, INTERPRETER_CONFIG, sfa=sa, sfb=sb, layout=torch.tensor([max_m + 50, 5], dtype=torch.int32))
    assert (big[groups] == 7.0).all() and (d[1, 5:] == 7.0).all()
    expected = ref.m_grouped_fp8_gemm_nt_masked_reference(a, sa, b, sb, torch.full((groups, max_m, n), 7.0),
                                                          torch.tensor([max_m, 5], dtype=torch.int32))
    assert dg.calc_diff(d, expected) < TIGHT_FP32

    xc = _randn(128, k, seed=23)
    ac, sac = dg.per_token_cast_to_fp8(xc)
    m_indices = torch.full((128,), 5, dtype=torch.int32)  # rows 64.. name expert 5 of 2
    m_indices[:64] = 1
    d2 = torch.full((128, n), 7.0)
    launch_gemm(CONTIGUOUS, ac, b, d2, INTERPRETER_CONFIG, sfa=sac, sfb=sb, layout=m_indices)
    assert (d2[64:] == 7.0).all()
    expected2 = ref.fp8_gemm_nt_reference(ac[:64], sac[:64], b[1], sb[1], torch.empty(64, n))
    assert dg.calc_diff(d2[:64], expected2) < TIGHT_FP32
