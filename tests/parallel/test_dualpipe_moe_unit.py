"""MoEStage in one process (no EP group): segmented vs connected graph, the overlapped F&B by hand, config errors."""

from __future__ import annotations

import pytest
import torch

from openinfra.parallel.dualpipe import calc_diff, run_backward
from openinfra.parallel.dualpipe.moe import MoEConfig, MoEStage
from openinfra.parallel.dualpipe.toy import mse_criterion

pytestmark = pytest.mark.unit

CFG = MoEConfig(hidden=16, num_heads=2, num_experts=4, topk=2, expert_hidden=24, num_layers=2)


def _pair():
    torch.manual_seed(0)
    a = MoEStage(CFG)
    b = MoEStage(CFG, segmented=False)
    b.load_state_dict(a.state_dict())
    return a, b


def test_segmented_matches_connected_graph():
    seg, con = _pair()
    x = torch.randn(2, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = seg(x)
    y2 = con(x2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert calc_diff(x.grad, x2.grad) < 1e-12
    for (n, p), p2 in zip(seg.named_parameters(), con.parameters()):
        assert calc_diff(p.grad, p2.grad) < 1e-12, n
    with torch.no_grad():
        assert torch.equal(seg(x), y.detach())


def test_overlapped_forward_backward_by_hand():
    """F of chunk 0 interleaved with B of chunk 1 == F then B, bit for bit (outputs, loss, grads)."""
    torch.manual_seed(1)
    m0, m1 = MoEStage(CFG), MoEStage(CFG)
    x0, x1 = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    lab = torch.randn(2, 5, 16)

    def run(overlap: bool):
        for m in (m0, m1):
            m.zero_grad()
        a0, a1 = x0.detach().clone().requires_grad_(), x1.detach().clone().requires_grad_()
        out1 = m1(a1)
        g1 = torch.randn_like(out1, generator=torch.Generator().manual_seed(5))
        if overlap:
            outs, loss0 = MoEStage.overlapped_forward_backward(m0, [a0], mse_criterion, [lab], m1, None, [out1], [g1])
            out0 = outs[0]
        else:
            out0 = m0(a0)
            loss0 = mse_criterion(out0, lab)
            run_backward([out1], [g1])
        loss0.backward()
        return out0.detach(), loss0.detach(), a0.grad, a1.grad, [p.grad.clone() for m in (m0, m1) for p in m.parameters()]

    ref, got = run(False), run(True)
    for r, g in zip(ref[:4], got[:4]):
        assert torch.equal(r, g)
    assert all(torch.equal(r, g) for r, g in zip(ref[4], got[4]))


def test_overlapped_with_loss_on_the_backward_chunk():
    torch.manual_seed(2)
    m0, m1 = MoEStage(CFG), MoEStage(CFG)
    lab = torch.randn(2, 5, 16)
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 16, requires_grad=True)
    loss1 = mse_criterion(m1(x1), lab)
    outs, loss0 = MoEStage.overlapped_forward_backward(m0, [x0], None, [], m1, loss1, [], [])
    assert loss0 is None and outs[0].shape == x0.shape
    ref_grad = x1.grad.clone()
    x1.grad = None
    for p in m1.parameters():
        p.grad = None
    mse_criterion(m1(x1), lab).backward()
    assert torch.equal(ref_grad, x1.grad)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MoEConfig(hidden=10, num_heads=3)
    with pytest.raises(ValueError, match="topk"):
        MoEConfig(num_experts=2, topk=3)
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        MoEConfig(num_layers=0)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 16\]"):
        MoEStage(CFG)(torch.randn(3, 16))
