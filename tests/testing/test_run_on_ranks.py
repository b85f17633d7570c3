"""The multi-process fixture later tiers stand on: real gloo ranks, errors and hangs surface."""

import time

import pytest
import torch
import torch.distributed as dist

from openinfra.testing.distributed import RankFailed, run_on_ranks

pytestmark = pytest.mark.distributed


def _all_reduce(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return t.item(), dist.get_rank(), dist.get_world_size()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is unhappy")
    return rank


def _hang(rank, world_size):
    time.sleep(60)


def _rank_sum(rank, world_size):
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return int(t.item()) // world_size


def test_all_reduce_on_three_ranks(distributed):
    values = distributed(_all_reduce, 3, 10)
    assert values == [(33.0, 0, 3), (33.0, 1, 3), (33.0, 2, 3)]


def test_failure_carries_the_rank_traceback():
    with pytest.raises(RankFailed, match="(?s)rank 1 failed.*ValueError: rank one is unhappy"):
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)


def test_a_hanging_rank_times_out_instead_of_hanging_the_suite():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="timed out"):
        run_on_ranks(_hang, 2, timeout=3)
    assert time.monotonic() - start < 30


def test_world_size_is_checked():
    with pytest.raises(ValueError, match="world_size"):
        run_on_ranks(_all_reduce, 0)


def test_a_taken_rendezvous_port_is_retried_on_a_new_one(monkeypatch):
    """Another process can take the picked port before rank 0 binds it (parallel tests): the run
    starts again on a fresh port instead of failing. Here the first pick is a port held open."""
    import socket

    from openinfra.testing import distributed as d

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    picks = []
    real = d.free_port

    def pick() -> int:
        picks.append(taken if not picks else real())
        return picks[-1]

    monkeypatch.setattr(d, "free_port", pick)
    try:
        assert d.run_on_ranks(_rank_sum, 2, timeout=60) == [1, 1]
    finally:
        holder.close()
    assert len(picks) == 2 and picks[0] == taken
