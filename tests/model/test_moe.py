"""MoE: routing equals a direct per-token reference; layouts; bias update; load counts."""

import pytest
import torch

from openinfra.model import Gate, MoE, contiguous_layout, get_config, masked_layout, route

pytestmark = pytest.mark.unit


def _route_direct(logits, bias, topk, n_groups, topk_groups, route_scale, score_func):
    """Token by token, written from the tech report's description with plain Python sorting."""
    t, e = logits.shape
    per_group = e // n_groups
    all_w, all_i = [], []
    for row in range(t):
        s = logits[row].double()
        s = s.sigmoid() if score_func == "sigmoid" else s.softmax(-1)
        sel = [float(s[j]) + (float(bias[j]) if bias is not None else 0.0) for j in range(e)]
        if n_groups > 1:
            gscore = []
            for g in range(n_groups):
                vals = sorted(sel[g * per_group:(g + 1) * per_group], reverse=True)
                gscore.append(vals[0] + vals[1] if bias is not None else vals[0])
            kept = sorted(range(n_groups), key=lambda g: -gscore[g])[:topk_groups]
            cand = [j for j in range(e) if j // per_group in kept]
        else:
            cand = list(range(e))
        chosen = sorted(cand, key=lambda j: -sel[j])[:topk]
        w = [float(s[j]) for j in chosen]
        if score_func == "sigmoid":
            w = [v / sum(w) for v in w]
        all_w.append([v * route_scale for v in w])
        all_i.append(chosen)
    return torch.tensor(all_w, dtype=torch.float64), torch.tensor(all_i)


@pytest.mark.parametrize("e,topk,groups,kept,func,with_bias", [
    (16, 4, 4, 2, "sigmoid", True), (16, 4, 1, 1, "sigmoid", True), (12, 3, 3, 1, "sigmoid", True),
    (8, 2, 2, 1, "softmax", False), (32, 8, 8, 4, "sigmoid", True),
])
def test_route_equals_direct_reference(e, topk, groups, kept, func, with_bias):
    g = torch.Generator().manual_seed(e + topk)
    logits = torch.randn(40, e, generator=g, dtype=torch.float64)
    bias = torch.randn(e, generator=g) * 0.3 if with_bias else None
    w, idx = route(logits, bias, topk, groups, kept, 2.5, func)
    rw, ridx = _route_direct(logits, bias, topk, groups, kept, 2.5, func)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-7)
    if func == "sigmoid":
        torch.testing.assert_close(w.sum(-1), torch.full((40,), 2.5))  # float32 routing math
    if groups > 1:  # every chosen expert is inside at most `kept` groups
        assert int((idx // (e // groups)).unique(dim=None).numel()) <= groups
        for row in idx:
            assert (row // (e // groups)).unique().numel() <= kept


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w0, i0 = route(logits, torch.zeros(4), 1)
    w1, i1 = route(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), 1)
    assert i0.item() == 0 and i1.item() == 3
    assert w1.item() == pytest.approx(1.0)  # renormalized unbiased score of the chosen expert
    w2, i2 = route(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), 2)
    s = logits[0].sigmoid()
    torch.testing.assert_close(w2[0], torch.stack([s[3], s[0]]) / (s[3] + s[0]))


def _moe(**kw):
    cfg = get_config("tiny", dim=32, moe_inter_dim=24, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4,
                     n_limited_groups=2, route_scale=1.7, **kw)
    torch.manual_seed(0)
    return MoE(cfg).double(), cfg


def _moe_direct(moe, x):
    """Loop over tokens and their experts with the unstacked weights."""
    w, idx = route(x @ moe.gate.weight.t(), moe.gate.bias, moe.gate.topk, moe.gate.n_groups, moe.gate.topk_groups,
                   moe.gate.route_scale, moe.gate.score_func)
    out = torch.zeros_like(x)
    ex = moe.experts
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = torch.nn.functional.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])
            out[t] += w[t, k].to(x.dtype) * (ex.w2[e] @ h)
    return out + moe.shared_experts(x)


@pytest.mark.parametrize("layout,alignment", [("contiguous", None), ("contiguous", 8), ("masked", None)])
def test_moe_layouts_equal_direct_loop(layout, alignment):
    moe, cfg = _moe()
    moe.alignment = alignment  # 8: padded expert blocks, as the GPU kernels need
    with torch.no_grad():
        moe.gate.bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(37, cfg.dim, dtype=torch.float64)
    torch.testing.assert_close(moe(x, layout), _moe_direct(moe, x), rtol=1e-10, atol=1e-10)


def test_layout_construction():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    lay = contiguous_layout(idx, 4, alignment=4)
    assert lay.offsets == [0, 4, 8, 12, 12]
    assert lay.m_indices.tolist() == [0, 0, -1, -1, 1, -1, -1, -1, 2, 2, 2, -1]
    assert lay.row_token.tolist() == [0, 2, -1, -1, 1, -1, -1, -1, 0, 1, 2, -1]
    assert lay.row_slot.tolist() == [1, 0, -1, -1, 1, -1, -1, -1, 0, 0, 1, -1]
    assert lay.counts.tolist() == [2, 1, 3, 0]
    m = masked_layout(idx, 4)
    assert m.masked_m.tolist() == [2, 1, 3, 0]
    assert m.token_index.tolist() == [[0, 2, -1], [1, -1, -1], [0, 1, 2], [-1, -1, -1]]
    with pytest.raises(ValueError, match="max_m"):
        masked_layout(idx, 4, max_m=2)
    with pytest.raises(ValueError, match="indices must lie"):
        contiguous_layout(torch.tensor([[4, 0]]), 4)


def test_moe_gradients_flow_through_grouped_path():
    moe, cfg = _moe()
    x = torch.randn(20, cfg.dim, dtype=torch.float64, requires_grad=True)
    moe(x, "contiguous").square().sum().backward()
    g_contig = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    _moe_direct(moe, x).square().sum().backward()
    g_direct = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    for a, b in zip(g_contig, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_load_counts_and_bias_update_balance_a_skewed_router():
    cfg = get_config("tiny", dim=32, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(0)
    gate = Gate(cfg)
    with torch.no_grad():  # skew: inputs share a mean direction that experts 0 and 1 align with
        gate.weight.normal_(std=0.3)
        gate.weight[0] += 0.3
        gate.weight[1] += 0.2
    x = torch.randn(1024, cfg.dim) + 0.5

    def imbalance():
        gate.reset_load()
        gate(x)
        load = gate.load.float()
        return float(load.max() / load.mean()), gate.load.clone()

    before, load0 = imbalance()
    assert int(load0.sum()) == 1024 * 2
    assert before > 2.5  # strongly skewed to start with
    for _ in range(200):
        gate(x)
        gate.update_bias(rate=1e-2)  # reads and resets the tracked load
    after, _ = imbalance()
    assert after < 1.3 < before, (before, after)
    assert gate.bias[0] < 0 and gate.bias[1] < 0  # the overloaded experts were pushed down


def test_update_bias_errors():
    gate = Gate(get_config("tiny"))
    with pytest.raises(ValueError, match="load must be"):
        gate.update_bias(load=torch.zeros(3))
    with pytest.raises(ValueError, match="rate"):
        gate.update_bias(rate=-1)
    soft = Gate(get_config("tiny", score_func="softmax"))
    with pytest.raises(ValueError, match="selection bias"):
        soft.update_bias()


def test_grouped_linear_contiguous_gradients_with_an_empty_expert():
    """The CPU grouped product (one split of x, one unbind of w) against a loop over experts,
    forward and both gradients, with expert 1 receiving no rows and padded blocks."""
    from openinfra.model.grouped import grouped_linear_contiguous

    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([[0, 2], [2, 3], [0, 3], [3, 0], [2, 0]])
    lay = contiguous_layout(idx, 4, alignment=4)
    assert lay.counts.tolist()[1] == 0
    x = torch.randn(lay.offsets[-1], 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    grouped_linear_contiguous(x, w, lay).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(lay.offsets[:-1], lay.offsets[1:]))])
    want.square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-12, atol=1e-12)
    assert gw[1].abs().max() == 0  # the empty expert gets a zero gradient, not garbage
    with pytest.raises(ValueError, match="rows"):
        grouped_linear_contiguous(x[:-1], w, lay)
