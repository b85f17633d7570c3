"""Placement bookkeeping: inverse maps, per-GPU loads and the balancedness metric.

A placement is ``phy2log [layers, replicas]``: physical slot -> logical expert. GPU ``g`` owns
the contiguous slots ``[g * P / G, (g + 1) * P / G)``. Every replica of an expert is assumed to
receive an equal share of that expert's tokens (the EP layer spreads tokens over replicas).
"""

from __future__ import annotations

import torch

__all__ = ["replica_counts", "replica_ranks", "logical_to_physical", "gpu_loads", "balancedness", "static_placement", "static_gpu_loads"]


def replica_counts(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """logcnt [layers, experts] int64: the number of slots holding each logical expert."""
    return torch.zeros(phy2log.shape[0], num_experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))


def replica_ranks(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """phyrank [layers, replicas] int64: the slot's index among its expert's replicas, in slot order."""
    layers, replicas = phy2log.shape
    # A stable sort groups each expert's slots in slot order; a slot's rank is its position in
    # the sorted row minus where its expert's run starts.
    order = phy2log.argsort(dim=1, stable=True)
    sorted_exp = phy2log.gather(1, order)
    count = replica_counts(phy2log, num_experts)
    run_start = count.cumsum(1) - count
    rank_sorted = torch.arange(replicas, dtype=torch.int64) - run_start.gather(1, sorted_exp)
    return torch.empty_like(phy2log).scatter_(1, order, rank_sorted)


def logical_to_physical(phy2log: torch.Tensor, num_experts: int, phyrank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a placement.

    Args:
        phy2log: [layers, replicas] int64 logical expert of each slot.
        num_experts: number of logical experts.
        phyrank: [layers, replicas] replica rank of each slot (default: order of the slots).

    Returns:
        ``(log2phy [layers, experts, max_replicas] int64 padded with -1, logcnt [layers, experts])``.
    """
    layers, replicas = phy2log.shape
    logcnt = replica_counts(phy2log, num_experts)
    if phyrank is None:
        phyrank = replica_ranks(phy2log, num_experts)
    width = int(logcnt.max().item())
    log2phy = torch.full((layers, num_experts, width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(1, phy2log * width + phyrank, torch.arange(replicas, dtype=torch.int64).expand(layers, -1))
    return log2phy, logcnt


def gpu_loads(phy2log: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-GPU load [layers, gpus] float64: the sum over its slots of expert load / replica count."""
    weight = weight.to(torch.float64)
    phy2log = phy2log.to(torch.int64)
    logcnt = replica_counts(phy2log, weight.shape[1])
    per_slot = (weight / logcnt.clamp(min=1)).gather(1, phy2log)
    return per_slot.view(phy2log.shape[0], num_gpus, -1).sum(-1)


def balancedness(phy2log: torch.Tensor, weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Balancedness [layers] float64: mean GPU load / max GPU load (1.0 is perfect; 1.0 for an idle layer)."""
    loads = gpu_loads(phy2log, weight, num_gpus)
    peak = loads.max(-1).values
    return torch.where(peak > 0, loads.mean(-1) / peak.clamp(min=1e-300), torch.ones_like(peak))


def static_placement(num_layers: int, num_experts: int, num_gpus: int) -> tuple[torch.Tensor, int]:
    """The placement before any balancing: expert e on GPU ``e * G // E``, no redundant replicas.

    Returns ``(gpu_of_expert [layers, experts], num_gpus)``; use :func:`static_gpu_loads` for loads.
    """
    gpu = torch.arange(num_experts, dtype=torch.int64) * num_gpus // num_experts
    return gpu.expand(num_layers, -1).clone(), num_gpus


def static_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-GPU load [layers, gpus] float64 of the static placement (expert e on GPU e*G//E)."""
    gpu, _ = static_placement(weight.shape[0], weight.shape[1], num_gpus)
    return torch.zeros(weight.shape[0], num_gpus, dtype=torch.float64).scatter_add_(1, gpu, weight.to(torch.float64))
