"""ExpertLoadTracker: window mean, EMA, routing and per-slot receive statistics, all-reduce."""

import pytest
import torch

from openinfra.parallel.eplb import ExpertLoadTracker, balancedness

pytestmark = pytest.mark.unit


def test_window_mean_and_eviction():
    t = ExpertLoadTracker(2, 3, window=2)
    for v in (1.0, 3.0, 5.0):
        t.record(torch.full((2, 3), v))
        t.step()
    assert torch.equal(t.load(), torch.full((2, 3), 4.0, dtype=torch.float64))  # mean of the last two
    assert t.num_steps == 3


def test_partial_window_and_open_interval():
    t = ExpertLoadTracker(1, 2, window=4)
    t.record(torch.tensor([2, 4]), layer=0)
    assert t.load().tolist() == [[2.0, 4.0]]  # before any step: the open interval
    t.step()
    t.record(torch.tensor([[6, 0]]))
    t.step()
    assert t.load().tolist() == [[4.0, 2.0]]


def test_ema():
    t = ExpertLoadTracker(1, 2, ema=0.25)
    t.record(torch.tensor([[8.0, 0.0]]))
    t.step()
    t.record(torch.tensor([[0.0, 8.0]]))
    t.step()
    assert t.load().tolist() == [[6.0, 2.0]]


def test_topk_and_physical_slots():
    t = ExpertLoadTracker(2, 4)
    t.record_topk(torch.tensor([[0, 1], [1, -1], [3, 1]]), layer=1)
    assert t.pending[1].tolist() == [1.0, 3.0, 0.0, 1.0]
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]])
    # Rank 1 of 3 reports its two slots (2 and 3) for both layers.
    t.record_physical(torch.tensor([[5.0, 7.0], [1.0, 2.0]]), phy2log, first_slot=2)
    assert t.pending[0].tolist() == [0.0, 0.0, 5.0, 7.0]
    assert t.pending[1].tolist() == [3.0, 4.0, 0.0, 1.0]
    t.record_physical(torch.tensor([4.0, 6.0]), phy2log, layer=1, first_slot=4)
    assert t.pending[1].tolist() == [3.0, 4.0, 0.0, 11.0]


def test_balancedness_of_a_placement():
    t = ExpertLoadTracker(1, 4)
    t.record(torch.tensor([[10.0, 10.0, 10.0, 30.0]]))
    t.step()
    phy2log = torch.tensor([[0, 1, 2, 3, 3, 3]])  # GPU0: 0,1,2 -> 30; GPU1: 3,3,3 -> 30
    assert t.balancedness(phy2log, 2).tolist() == [1.0]
    assert torch.equal(t.balancedness(phy2log, 2), balancedness(phy2log, t.load(), 2))


def test_tracker_errors():
    with pytest.raises(ValueError, match="either window or ema"):
        ExpertLoadTracker(1, 2, window=3, ema=0.5)
    with pytest.raises(ValueError, match="ema must be in \\(0, 1\\]"):
        ExpertLoadTracker(1, 2, ema=1.5)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        ExpertLoadTracker(1, 0)
    t = ExpertLoadTracker(2, 3)
    with pytest.raises(ValueError, match="counts must have shape \\[2, 3\\]"):
        t.record(torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite and non-negative"):
        t.record(-torch.ones(2, 3))
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\)"):
        t.record(torch.ones(3), layer=2)
    with pytest.raises(ValueError, match="topk_idx holds ids outside"):
        t.record_topk(torch.tensor([[0, 3]]), layer=0)
    with pytest.raises(ValueError, match="counts cover slots"):
        t.record_physical(torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.int64), first_slot=1)


def _ranks_report(rank, world_size):
    # Each rank owns 2 of the 4 physical slots and reports what it received there.
    t = ExpertLoadTracker(1, 3)
    phy2log = torch.tensor([[0, 1, 2, 2]])
    t.record_physical(torch.tensor([[10.0 + rank, 20.0 + rank]]), phy2log, first_slot=2 * rank)
    t.all_reduce()
    t.step()
    return t.load().tolist()


@pytest.mark.distributed
def test_all_reduce_across_ranks(distributed):
    out = distributed(_ranks_report, 2)
    assert out[0] == out[1] == [[10.0, 20.0, 11.0 + 21.0]]
