"""The three-step placement pipeline of EPLB's hierarchical policy, with pluggable steps.

1. pack the expert groups onto nodes (equal groups per node),
2. replicate experts inside each node (the node's slots = P / N),
3. pack each node's replicas onto its GPUs (equal slots per GPU),
4. (ours) optionally refine each node's placement jointly (swaps and replica moves).

The global policy is the same pipeline with one group and one node. Every step works on
``[rows, items]`` tensors whose rows are layers (step 1) or (layer, node) pairs (steps 2-4), so
each step is vectorised over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from openinfra.parallel.eplb.layout import replica_ranks

__all__ = ["Steps", "hierarchical_placement"]

PackFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
ReplicateFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
RefineFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Steps:
    """The functions a solver plugs into the pipeline.

    pack_groups(tokens_per_group [L, groups], nodes) and pack_gpus(tokens_per_replica
    [L*N, P/N], gpus_per_node) return (pack_index, rank_in_pack); replicate(tokens
    [L*N, E/N], P/N) returns (phy2mlog, rank, count); refine(tokens [L*N, E/N], slot2mlog
    [L*N, P/N] GPU-major, gpus_per_node) returns an improved slot2mlog (None: no refinement).
    """

    pack_groups: PackFn
    replicate: ReplicateFn
    pack_gpus: PackFn
    refine: RefineFn | None = None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation [X, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand_as(perm))
    return inv


def hierarchical_placement(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int, steps: Steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_physical`` slots for ``weight [L, E]`` (float32, validated).

    Returns ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])`` int64; slot p lives on GPU
    ``p // (P / num_gpus)`` and every replica of an expert stays on its group's node.
    """
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = experts // num_nodes
    slots_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: groups -> nodes. "mlog" numbers the experts node-major: node n's experts are
    # mlog ids [n * E/N, (n+1) * E/N), its groups in pack-rank order, experts in group order.
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    node_of_group, rank_in_node = steps.pack_groups(tokens_per_group, num_nodes)
    group_start = (node_of_group * groups_per_node + rank_in_node) * group_size  # [L, groups]
    log2mlog = (group_start.unsqueeze(-1) + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicas inside each node; rows are (layer, node).
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, experts_per_node)
    phy2mlog, phyrank, mlogcnt = steps.replicate(tokens_per_mlog, slots_per_node)

    # Step 3: the node's replicas -> its GPUs, each replica carrying load / replica count.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = steps.pack_gpus(tokens_per_phy, gpus_per_node)
    phy2pphy = pack_index * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [L*N, P/N], GPU-major
    pphyrank = phyrank.gather(-1, pphy2phy)

    # Step 4 (ours): joint refinement inside each node; replica ranks then follow slot order.
    if steps.refine is not None:
        pphy2mlog = steps.refine(tokens_per_mlog, pphy2mlog, gpus_per_node)
        pphyrank = replica_ranks(pphy2mlog, experts_per_node)
        mlogcnt = torch.zeros_like(mlogcnt).scatter_add_(1, pphy2mlog, torch.ones_like(pphy2mlog))

    node_offset = torch.arange(0, experts, experts_per_node, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return phy2log, pphyrank.view(layers, -1), logcnt
