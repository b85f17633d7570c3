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

__all__ = ["Steps", "Draft", "draft_placement", "finish_placement", "hierarchical_placement"]

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


@dataclass
class Draft:
    """Steps 1-3 done, before refinement: what :func:`finish_placement` needs.

    tokens [L*N, E/N] per-node expert loads; slot2mlog [L*N, P/N] GPU-major placement in node-
    local ids; slotrank [L*N, P/N] replica ranks; mlogcnt [L*N, E/N]; mlog2log / log2mlog
    [L, E] the node-major renumbering; shape (layers, nodes, gpus_per_node).
    """

    tokens: torch.Tensor
    slot2mlog: torch.Tensor
    slotrank: torch.Tensor
    mlogcnt: torch.Tensor
    mlog2log: torch.Tensor
    log2mlog: torch.Tensor
    layers: int
    nodes: int
    gpus_per_node: int


def draft_placement(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
                    steps: Steps) -> Draft:
    """Steps 1-3 of the pipeline for ``weight [L, E]`` (float32, validated)."""
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
    pphy2phy = _inverse(pack_index * slots_per_gpu + rank_in_pack)
    return Draft(tokens_per_mlog, phy2mlog.gather(-1, pphy2phy), phyrank.gather(-1, pphy2phy), mlogcnt,
                 mlog2log, log2mlog, layers, num_nodes, gpus_per_node)


def finish_placement(draft: Draft, refined: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map a draft (optionally with a refined slot2mlog) back to logical ids.

    Returns ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])``; after refinement replica
    ranks follow slot order.
    """
    slot2mlog, slotrank, mlogcnt = draft.slot2mlog, draft.slotrank, draft.mlogcnt
    experts_per_node = draft.tokens.shape[1]
    if refined is not None:
        slot2mlog = refined
        slotrank = replica_ranks(refined, experts_per_node)
        mlogcnt = torch.zeros_like(mlogcnt).scatter_add_(1, refined, torch.ones_like(refined))
    experts = experts_per_node * draft.nodes
    node_offset = torch.arange(0, experts, experts_per_node, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (slot2mlog.view(draft.layers, draft.nodes, -1) + node_offset).flatten(-2)
    phy2log = draft.mlog2log.gather(-1, pphy2mlog)
    logcnt = mlogcnt.view(draft.layers, -1).gather(-1, draft.log2mlog)
    return phy2log, slotrank.view(draft.layers, -1), logcnt


def hierarchical_placement(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int, steps: Steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_physical`` slots for ``weight [L, E]`` (float32, validated).

    Returns ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])`` int64; slot p lives on GPU
    ``p // (P / num_gpus)`` and every replica of an expert stays on its group's node.
    """
    draft = draft_placement(weight, num_physical, num_groups, num_nodes, num_gpus, steps)
    refined = None
    if steps.refine is not None:
        refined = steps.refine(draft.tokens, draft.slot2mlog, draft.gpus_per_node)
    return finish_placement(draft, refined)
