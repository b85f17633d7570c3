"""Clear errors for bad pipelines: odd PP, too few chunks, views, mismatched p2p shapes, missing args."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from openinfra.parallel.dualpipe import (
    DualPipe, DualPipeV, P2PSpec, WeightGradStore, ZeroBubbleLinear, bubble_formula, phase_counts, scatter,
)
from openinfra.parallel.dualpipe.toy import MLPStage, mse_criterion
from openinfra.testing.distributed import free_port

pytestmark = pytest.mark.unit


@pytest.fixture
def single_rank_group():
    """A real one-rank gloo group in this process (torn down after the test)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _pair(h=4):
    return (MLPStage(h), MLPStage(h))


def test_dualpipe_rejects_odd_pp(single_rank_group):
    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        DualPipe(_pair(), p2p_shapes=[(1, 4)])


def test_too_few_chunks(single_rank_group):
    pipe = DualPipeV(_pair(), p2p_shapes=[(1, 4)])
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"num_chunks >= 2 \* PP = 2"):
        pipe.step(x, num_chunks=1, criterion=mse_criterion, labels=(x,))
    with pytest.raises(TypeError, match="num_chunks must be an int"):
        pipe.step(x, num_chunks=2.0, criterion=mse_criterion, labels=(x,))
    with pytest.raises(ValueError, match="even and >= 2 \\* PP"):
        phase_counts("dualpipe", 4, 6, 0)


def test_missing_arguments(single_rank_group):
    pipe = DualPipeV(_pair())
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="p2p_shapes is required"):
        pipe.step(x, num_chunks=2, criterion=mse_criterion, labels=(x,))
    with pytest.raises(ValueError, match="needs a criterion"):
        pipe.step(x, num_chunks=2, labels=(x,), p2p_shapes=[(2, 4)])
    with pytest.raises(ValueError, match="needs inputs"):
        pipe.step(num_chunks=2, criterion=mse_criterion, labels=(x,), p2p_shapes=[(2, 4)])
    with pytest.raises(ValueError, match="cannot be split into 3 equal micro-batches"):
        pipe.step(x, num_chunks=3, criterion=mse_criterion, labels=(x,), p2p_shapes=[(2, 4)])
    # per-call shapes work when the constructor had none
    loss, _ = pipe.step(x, num_chunks=2, criterion=mse_criterion, labels=(x,), p2p_shapes=[(2, 4)])
    assert loss.shape == (2,)


def test_constructor_checks(single_rank_group):
    with pytest.raises(TypeError, match="modules must be a pair"):
        DualPipeV((MLPStage(4),))
    with pytest.raises(TypeError, match=r"modules\[1\] must be an nn.Module"):
        DualPipeV((MLPStage(4), "x"))
    with pytest.raises(ValueError, match="rank_mapping must be a permutation"):
        DualPipeV(_pair(), rank_mapping=[1])
    with pytest.raises(ValueError, match=r"p2p_shapes\[0\] must be a tuple"):
        DualPipeV(_pair(), p2p_shapes=[(2, -1)])
    with pytest.raises(ValueError, match="one per shape"):
        DualPipeV(_pair(), p2p_shapes=[(2, 4), (2, 4)], p2p_dtypes=[torch.float32])


def test_needs_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    with pytest.raises(RuntimeError, match="init_process_group"):
        DualPipeV(_pair())


def test_p2p_spec_check():
    spec = P2PSpec.make([(2, 4)], torch.float32)
    spec.check([torch.zeros(2, 4)], "x")
    with pytest.raises(ValueError, match=r"shape \(2, 5\) dtype torch.float32, but p2p_shapes/p2p_dtypes declare \(2, 4\)"):
        spec.check([torch.zeros(2, 5)], "x")
    with pytest.raises(ValueError, match="dtype torch.float64"):
        spec.check([torch.zeros(2, 4, dtype=torch.float64)], "x")
    with pytest.raises(ValueError, match="produced 2 tensor"):
        spec.check([torch.zeros(2, 4)] * 2, "x")
    assert P2PSpec.make((2, 4), None).shapes == ((2, 4),)


def test_weight_grad_store_and_zero_bubble_linear():
    torch.manual_seed(0)
    lin = ZeroBubbleLinear(4, 3)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(5, 4, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    lin(x).square().sum().backward()
    WeightGradStore.enabled = False
    assert lin.weight.grad is None and x.grad is not None  # W deferred, input grad now
    WeightGradStore.flush()
    assert WeightGradStore.pending() == 1
    WeightGradStore.pop()
    ref(xr).square().sum().backward()
    assert torch.allclose(lin.weight.grad, ref.weight.grad) and torch.allclose(lin.bias.grad, ref.bias.grad)
    assert torch.allclose(x.grad, xr.grad)
    with pytest.raises(RuntimeError, match="no deferred weight-gradient batch"):
        WeightGradStore.pop()
    with pytest.raises(TypeError, match="callable"):
        WeightGradStore.put(3)


def test_scatter_and_bubble_formula():
    a = torch.arange(12).reshape(6, 2)
    parts = scatter((a, None), 3, 0)
    assert len(parts) == 3 and torch.equal(parts[1][0], a[2:4]) and parts[1][1] is None
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        scatter(3, 2, 0)
    assert bubble_formula("1f1b", 4, 1.0, 2.0, 1.0) == 9.0
    assert bubble_formula("zb1p", 4, 1.0, 2.0, 1.0) == 3.0
    assert bubble_formula("dualpipe", 8, 1.0, 2.0, 1.0, fb=3.0) == 3 * 2.0
    with pytest.raises(ValueError, match="unknown schedule"):
        bubble_formula("gpipe", 4, 1, 1, 1)


class _ViewStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x):
        return self.lin(x)[..., :4]  # a view of a bigger tensor


def _bad_stage_rank(rank: int, world: int):
    """Rank 0 must raise before any communication (rank 1 does nothing, so nothing can hang)."""
    if rank != 0:
        return None
    x = torch.randn(8, 4)
    msgs = {}
    for what in ("view", "shape"):
        if what == "view":
            pipe = DualPipeV((_ViewStage(), _ViewStage()), p2p_shapes=[(2, 4)])
        else:
            pipe = DualPipeV(_pair(), p2p_shapes=[(2, 5)])
        try:
            pipe.step(x, num_chunks=4, criterion=mse_criterion, labels=(x,))
            msgs[what] = "no error"
        except ValueError as exc:
            msgs[what] = str(exc)
    return msgs


@pytest.mark.distributed
def test_view_and_mismatched_shapes_raise(distributed):
    msgs = distributed(_bad_stage_rank, 2, timeout=120)[0]
    assert "returned a view" in msgs["view"], msgs
    assert "p2p_shapes/p2p_dtypes declare (2, 5)" in msgs["shape"], msgs
