"""Choosing replica counts: give the redundant slots to the experts with the most load per replica.

Both functions take ``weight [X, n]`` and the number of physical slots ``num_phy >= n`` and return
``(phy2log [X, num_phy], rank [X, num_phy], logcnt [X, n])`` int64: slots 0..n-1 hold expert i
as replica 0, slots n.. hold the redundant replicas in the order they were chosen.
"""

from __future__ import annotations

import torch

from openinfra.parallel.eplb.layout import replica_ranks

__all__ = ["greedy_replicate", "waterfill_replicate"]


def _base(rows: int, n: int, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    phy2log = torch.arange(num_phy, dtype=torch.int64).remainder(n).expand(rows, -1).clone()
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, n, dtype=torch.int64)
    return phy2log, rank, logcnt


def greedy_replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original EPLB's replication, bit for bit: one redundant slot at a time to the expert
    with the largest ``weight / count`` (float32 division; the first index on a tie)."""
    rows, n = weight.shape
    phy2log, rank, logcnt = _base(rows, n, num_phy)
    ar = torch.arange(rows)
    for slot in range(n, num_phy):
        hottest = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[ar, hottest]
        logcnt[ar, hottest] += 1
    return phy2log, rank, logcnt


def waterfill_replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same choice as :func:`greedy_replicate` in one shot (equal up to ties).

    The greedy's k-th extra replica of expert i is taken at the value ``w_i / k``, and each
    expert's values decrease with k, so the greedy takes exactly the R = num_phy - n largest of
    all ``w_i / k`` (k = 1..R): one ``topk`` over an [X, n * R] table, no loop.
    """
    rows, n = weight.shape
    phy2log, rank, logcnt = _base(rows, n, num_phy)
    redundant = num_phy - n
    if redundant == 0:
        return phy2log, rank, logcnt
    weight = weight.to(torch.float64)
    k = torch.arange(1, redundant + 1, dtype=torch.float64)
    table = (weight.unsqueeze(-1) / k).view(rows, n * redundant)  # [X, n*R], expert-major
    # topk's order is the greedy's order (largest value first); ties go to the lower flat index,
    # i.e. the lower expert id, as in the greedy.
    flat = table.topk(redundant, dim=1, sorted=True).indices
    expert = flat // redundant
    phy2log[:, n:] = expert
    logcnt.scatter_add_(1, expert, torch.ones_like(expert))
    # Ranks from slot order (not from k): with zero loads the values tie and topk may take an
    # expert's second copy "before" its first.
    return phy2log, replica_ranks(phy2log, n), logcnt
