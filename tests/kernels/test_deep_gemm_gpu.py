"""deep_gemm on the H200 (gpu tier): the Triton kernels at DeepSeek-V3 shapes.

Each check draws fresh random inputs, poisons the output with NaN (or a sentinel for rows that must
stay untouched), and asserts both bars of the issue: ``calc_diff < 1e-3`` against the fp32 product
of the unquantized inputs, and a tight kernel-only check against the dequantized reference.
"""

import random

import pytest
import torch

from openinfra.kernels import deep_gemm as dg
from openinfra.kernels.deep_gemm.gemm import reference as ref
from openinfra.kernels.deep_gemm.gemm.kernel import DENSE, launch_gemm

pytestmark = pytest.mark.gpu

TIGHT = 2e-5  # kernel vs dequantized reference: only accumulation order and bf16 rounding differ
DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _stack_blocks(w):
    q = [dg.per_block_cast_to_fp8(w[g]) for g in range(w.shape[0])]
    return torch.stack([x[0] for x in q]), torch.stack([x[1] for x in q])


def _stack_tokens(x):
    q = [dg.per_token_cast_to_fp8(x[g]) for g in range(x.shape[0])]
    return torch.stack([t[0] for t in q]), torch.stack([t[1] for t in q])


@pytest.mark.parametrize("m", [64, 128, 4096])
@pytest.mark.parametrize("n, k", DENSE_NK)
def test_fp8_gemm_nt_deepseek_shapes(m, n, k):
    if m < 4096 and (n, k) not in [(2112, 7168), (7168, 16384), (32768, 512)]:
        pytest.skip("M=64/128 checked on three (N, K) shapes to keep the gpu tier short")
    x, w = _rand(m, k), _rand(n, k)
    xq, wq = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    dg.fp8_gemm_nt(xq, wq, d)
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, x.float() @ w.float().T) < 1e-3
    expected = ref.fp8_gemm_nt_reference(*xq, *wq, torch.empty(m, n, device="cuda"))
    assert dg.calc_diff(d, expected) < TIGHT


@pytest.mark.parametrize("m, n, k", [(4096, 2112, 7168), (128, 7168, 2048)])
def test_fp8_gemm_fp32_out_accumulates_c(m, n, k):
    x, w = _rand(m, k), _rand(n, k)
    c = torch.randn(m, n, device="cuda") * 32
    d = torch.full((m, n), float("nan"), device="cuda")
    dg.fp8_gemm_nt(dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w), d, c=c)
    assert dg.calc_diff(d, x.float() @ w.float().T + c) < 1e-3


def _candidates():
    from openinfra.kernels.deep_gemm.gemm.config import tuning_candidates

    dev = torch.device("cuda")
    out = []
    for m, n, k in [(1000, 1700, 2048), (100, 1700, 2048)]:
        out += [(m, n, k, label, cfg) for label, cfg in tuning_candidates(m, n, k, dev)]
    return out


# The candidate list depends on the GPU's SM count, so without a GPU there is one placeholder case
# that the gpu-tier skip (with its reason) removes, instead of pytest's bare "empty parameter set".
@pytest.mark.parametrize("m, n, k, label, config",
                         _candidates() if torch.cuda.is_available() else [(0, 0, 0, "no-gpu", None)],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_swept_config_is_correct(m, n, k, label, config):
    # Ragged M and N: edge tiles in both directions. Every configuration the sweep may report
    # (and the heuristic may pick) must compute the same function.
    x, w = _rand(m, k), _rand(n, k)
    xq, wq = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch_gemm(DENSE, xq[0], wq[0], d, config, sfa=xq[1], sfb=wq[1])
    expected = ref.fp8_gemm_nt_reference(*xq, *wq, torch.empty(m, n, device="cuda"))
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, expected) < TIGHT


def test_layouts_nn_tn_tt_and_mn_major_scales():
    m, n, k = 384, 640, 1024
    x, w = _rand(m, k), _rand(n, k)
    (a, sa), (b, sb) = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    base = torch.empty(m, n, device="cuda")
    dg.fp8_gemm_nt((a, sa), (b, sb), base)
    at, sat, bt, sbt = a.T.contiguous(), sa.T.contiguous(), b.T.contiguous(), sb.T.contiguous()
    for fn, aa, bb in [(dg.fp8_gemm_nn, (a, sa), (bt, sbt)), (dg.fp8_gemm_tn, (at, sat), (bt, sbt)),
                       (dg.fp8_gemm_tt, (at, sat), (b, sb)),
                       (dg.fp8_gemm_nt, (a, dg.get_mn_major_tma_aligned_tensor(sa)), (b, sb))]:
        d = torch.full((m, n), float("nan"), device="cuda")
        fn(aa, bb, d)
        assert dg.calc_diff(d, base) < 1e-6, fn.__name__


@pytest.mark.parametrize("groups, expected_m, n, k", [(4, 8192, 4096, 7168), (8, 4096, 7168, 2048)])
def test_m_grouped_contiguous(groups, expected_m, n, k):
    align = dg.get_m_alignment_for_contiguous_layout()
    ms = [int(expected_m * random.uniform(0.7, 1.3)) for _ in range(groups)]
    ms[1] = 0  # an expert with no tokens
    total = sum(dg.align(x, align) for x in ms)
    x, w = _rand(total, k), _rand(groups, n, k)
    m_indices = torch.full((total,), -1, device="cuda", dtype=torch.int32)
    start = 0
    for g, mg in enumerate(ms):
        m_indices[start:start + mg] = g
        start += dg.align(mg, align)
    xq, wq = dg.per_token_cast_to_fp8(x), _stack_blocks(w)
    d = torch.full((total, n), 7.0, device="cuda", dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_contiguous(xq, wq, d, m_indices)
    pad = m_indices < 0
    assert (d[pad] == 7.0).all(), "padding rows must be skipped"
    exact = torch.zeros(total, n, device="cuda")
    for g in range(groups):
        rows = m_indices == g
        exact[rows] = x[rows].float() @ w[g].float().T
    got = torch.where(pad[:, None], torch.zeros_like(d), d)
    assert dg.calc_diff(got, exact) < 1e-3
    expected = ref.m_grouped_fp8_gemm_nt_contiguous_reference(*xq, *wq, torch.zeros(total, n, device="cuda"), m_indices)
    assert dg.calc_diff(got, expected) < TIGHT


@pytest.mark.parametrize("groups, expected_m", [(1, 1024), (2, 512), (4, 256), (6, 20)])
def test_m_grouped_masked(groups, expected_m):
    n, k, max_m = 4096, 7168, 2048
    x, w = _rand(groups, max_m, k), _rand(groups, n, k)
    masked_m = torch.tensor([int(expected_m * random.uniform(0.7, 1.3)) for _ in range(groups)], device="cuda", dtype=torch.int32)
    xq, wq = _stack_tokens(x), _stack_blocks(w)
    d = torch.full((groups, max_m, n), 7.0, device="cuda", dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_masked(xq, wq, d, masked_m, expected_m)
    for g, mg in enumerate(masked_m.tolist()):
        assert dg.calc_diff(d[g, :mg], x[g, :mg].float() @ w[g].float().T) < 1e-3
        expected = (ref.dequantize(xq[0][g, :mg], xq[1][g, :mg]) @ ref.dequantize(wq[0][g], wq[1][g]).T)
        assert dg.calc_diff(d[g, :mg], expected) < TIGHT
        assert (d[g, mg:] == 7.0).all(), "rows past masked_m must be left alone"


@pytest.mark.parametrize("expected_m", [128, 256], ids=["triton", "gluon-ws"])
def test_masked_replays_under_cuda_graph(expected_m):
    groups, max_m, n, k = 4, 256, 2048, 1024
    x, w = _rand(groups, max_m, k), _rand(groups, n, k)
    xq, wq = _stack_tokens(x), _stack_blocks(w)
    masked_m = torch.tensor([10, 200, 0, 256], device="cuda", dtype=torch.int32)
    d = torch.zeros(groups, max_m, n, device="cuda", dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_masked(xq, wq, d, masked_m, expected_m)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dg.m_grouped_fp8_gemm_nt_masked(xq, wq, d, masked_m, expected_m)
    for new in ([256, 1, 77, 128], [0, 0, 0, 3]):
        masked_m.copy_(torch.tensor(new, dtype=torch.int32))
        d.fill_(7.0)
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.full_like(d, 7.0)
        ref.m_grouped_fp8_gemm_nt_masked_reference(*xq, *wq, expected, masked_m)
        assert dg.calc_diff(d, expected) < TIGHT
        for g, mg in enumerate(new):
            assert (d[g, mg:] == 7.0).all()


@pytest.mark.parametrize("k_major", [False, True])
def test_k_grouped_weight_gradients(k_major):
    groups, m, n, expected_k = 4, 4096, 7168, 2048
    ks = [dg.align(int(expected_k * random.uniform(0.7, 1.3)), 128) for _ in range(groups)]
    ks[2] = 0
    total = sum(ks)
    a_full, b_full = _rand(total, m), _rand(total, n)
    (a, sa), (b, sb) = dg.per_channel_cast_to_fp8(a_full), dg.per_channel_cast_to_fp8(b_full)
    c = torch.randn(groups, m, n, device="cuda")
    d = torch.full((groups, m, n), float("nan"), device="cuda")
    ks_tensor = torch.tensor(ks, device="cuda", dtype=torch.int32)
    if k_major:
        starts = [sum(ks[:g]) for g in range(groups)]
        flat = lambda x: torch.cat([x[s:s + kg].T.contiguous().flatten() for s, kg in zip(starts, ks)])  # noqa: E731
        dg.k_grouped_fp8_gemm_nt_contiguous((flat(a), sa.T.contiguous()), (flat(b), sb.T.contiguous()), d, ks, ks_tensor, c=c)
    else:
        dg.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, ks_tensor, c=c)
    start = 0
    for g, kg in enumerate(ks):
        exact = a_full[start:start + kg].float().T @ b_full[start:start + kg].float() + c[g]
        assert dg.calc_diff(d[g], exact) < 1e-3
        start += kg


def test_bf16_gemm_nt():
    m, n, k = 4096, 2112, 7168
    a, b = _rand(m, k), _rand(n, k)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    dg.bf16_gemm_nt(a, b, d)
    assert dg.calc_diff(d, a.float() @ b.float().T) < 1e-5


@pytest.mark.parametrize("m, n", [(4096, 7168), (4097, 2112), (300, 1536)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("kind", ["block", "channel"])
def test_block_and_channel_casts_match_reference(m, n, use_ue8m0, kind):
    from openinfra.kernels.deep_gemm.block_cast.reference import (
        per_block_cast_to_fp8_reference, per_channel_cast_to_fp8_reference,
    )

    fn, rf = {"block": (dg.per_block_cast_to_fp8, per_block_cast_to_fp8_reference),
              "channel": (dg.per_channel_cast_to_fp8, per_channel_cast_to_fp8_reference)}[kind]
    x = _rand(m, n) * torch.exp(torch.randn(m, 1, device="cuda") * 3).bfloat16()
    y, s = fn(x, use_ue8m0)
    ry, rs = rf(x, use_ue8m0)
    assert torch.equal(s, rs)
    mismatch = (y.view(torch.uint8) != ry.view(torch.uint8)).sum().item()
    assert mismatch == 0, f"{mismatch} of {y.numel()} fp8 values differ from the reference"


def test_fp8_linear_matches_reference_path(monkeypatch):
    torch.manual_seed(0)
    layer = dg.FP8Linear(1024, 2048, device="cuda", dtype=torch.bfloat16)
    x = _rand(4, 300, 1024).requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref, (x, layer.weight, layer.bias), g)
    assert dg.calc_diff(y, y_ref) < TIGHT
    for got, want in zip(grads, grads_ref):
        assert dg.calc_diff(got, want) < TIGHT
    exact = x.float() @ layer.weight.float().T + layer.bias.float()
    assert dg.calc_diff(y, exact) < 1e-3


@pytest.mark.parametrize("m, n, k, buffers", [(1000, 1600, 2048, 4), (4096, 4096, 7168, 4), (130, 256, 128, 3),
                                              (257, 384, 256, 5), (64, 7168, 16384, 4), (200, 640, 640, 4)])
@pytest.mark.parametrize("variant", ["one-partition", "warp-specialized", "warp-specialized-256"])
def test_gluon_dense_kernel_matches_reference(m, n, k, buffers, variant):
    """The Gluon kernels directly (not through the fallback): ragged M, an N edge tile (1600; with
    128 x 256 tiles also a missing right half: 1600 = 6 x 256 + 64), one and two K slices, five (two
    pairs and the odd slice out of the warp-specialized kernel's paired loop), every buffer count the
    sweep uses."""
    from openinfra.kernels.deep_gemm.gemm.gluon_kernel import fp8_gemm_nt_gluon, fp8_gemm_nt_gluon_ws, gluon_supported

    x, w = _rand(m, k), _rand(n, k)
    xq, wq = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert gluon_supported(xq[0], wq[0], d)
    if variant == "one-partition":
        fp8_gemm_nt_gluon(xq[0], xq[1], wq[0], wq[1], d, num_buffers=buffers)
    else:
        block_n = 256 if variant.endswith("256") else 128
        fp8_gemm_nt_gluon_ws(xq[0], xq[1], wq[0], wq[1], d, num_buffers=min(buffers, 4 if block_n == 256 else 5),
                             block_n=block_n)
    expected = ref.fp8_gemm_nt_reference(*xq, *wq, torch.empty(m, n, device="cuda"))
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, expected) < TIGHT
    assert dg.calc_diff(d, x.float() @ w.float().T) < 1e-3


@pytest.mark.parametrize("m, n, k, split", [(64, 2112, 7168, 7), (100, 1600, 1280, 4), (128, 384, 640, 5),
                                            (64, 256, 256, 2), (1, 128, 512, 3)])
def test_gluon_split_k_matches_reference(m, n, k, split):
    """The warp-specialized kernel's split-K (the small-M default): uneven K parts (1280 / 4 =
    2.5 slices, 640 / 5 = 1), ragged M and an N edge tile, one row; the workspace partials summed by
    the reduce kernel into a NaN-poisoned output."""
    from openinfra.kernels.deep_gemm.gemm.gluon_kernel import fp8_gemm_nt_gluon_ws, gluon_ws_supported

    x, w = _rand(m, k), _rand(n, k)
    xq, wq = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert gluon_ws_supported(0, xq[0], wq[0], d)
    fp8_gemm_nt_gluon_ws(xq[0], xq[1], wq[0], wq[1], d, num_buffers=6, split_k=split)
    expected = ref.fp8_gemm_nt_reference(*xq, *wq, torch.empty(m, n, device="cuda"))
    assert torch.isfinite(d).all()
    assert dg.calc_diff(d, expected) < TIGHT
    assert dg.calc_diff(d, x.float() @ w.float().T) < 1e-3
    with pytest.raises(ValueError, match="split_k"):
        fp8_gemm_nt_gluon_ws(xq[0], xq[1], wq[0], wq[1], d, split_k=2, block_n=256)


@pytest.mark.parametrize("n", [1600, 2048])
def test_gluon_grouped_kernels_match_reference(n):
    """The warp-specialized kernel's grouped layouts directly: contiguous with an empty expert,
    partly padded 128-row blocks, padding inside a block and N not a multiple of 128 (a tile's last
    B rows belong to the next expert); masked with max_m not a multiple of 128, an empty group and
    a masked_m past max_m (clamped). Padding rows and rows past masked_m stay untouched."""
    from openinfra.kernels.deep_gemm.gemm.gluon_kernel import _CONTIGUOUS, _MASKED, fp8_gemm_nt_gluon_ws, gluon_ws_supported

    k, groups = 1024, 3
    w = _rand(groups, n, k)
    wq = _stack_blocks(w)
    ms = [300, 0, 130]
    total = sum(-(-x // 128) * 128 for x in ms) + 128  # and one all-padding block at the end
    m_indices = torch.full((total,), -1, device="cuda", dtype=torch.int32)
    start = 0
    for g, mg in enumerate(ms):
        m_indices[start:start + mg] = g
        start += -(-mg // 128) * 128
    m_indices[5] = -1  # a padding row inside an expert's block
    x = _rand(total, k)
    xq = dg.per_token_cast_to_fp8(x)
    d = torch.full((total, n), 7.0, device="cuda", dtype=torch.bfloat16)
    assert gluon_ws_supported(_CONTIGUOUS, xq[0], wq[0], d)
    fp8_gemm_nt_gluon_ws(xq[0], xq[1], wq[0], wq[1], d, mode=_CONTIGUOUS, layout=m_indices)
    pad = m_indices < 0
    assert (d[pad] == 7.0).all(), "padding rows must be skipped"
    expected = ref.m_grouped_fp8_gemm_nt_contiguous_reference(*xq, *wq, torch.zeros(total, n, device="cuda"), m_indices)
    assert dg.calc_diff(torch.where(pad[:, None], torch.zeros_like(d), d), expected) < TIGHT

    max_m = 300
    xm = _rand(groups, max_m, k)
    xmq = _stack_tokens(xm)
    masked_m = torch.tensor([300, 0, 1000], device="cuda", dtype=torch.int32)
    dm = torch.full((groups, max_m, n), 7.0, device="cuda", dtype=torch.bfloat16)
    assert gluon_ws_supported(_MASKED, xmq[0], wq[0], dm)
    fp8_gemm_nt_gluon_ws(xmq[0], xmq[1], wq[0], wq[1], dm, mode=_MASKED, layout=masked_m)
    for g, mg in enumerate([300, 0, 300]):
        if mg:
            want = ref.dequantize(xmq[0][g, :mg], xmq[1][g, :mg]) @ ref.dequantize(wq[0][g], wq[1][g]).T
            assert dg.calc_diff(dm[g, :mg], want) < TIGHT
        assert (dm[g, mg:] == 7.0).all()
