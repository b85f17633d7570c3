"""A plain-Python oracle of the original EPLB (deepseek-ai/EPLB), one layer at a time.

It follows the original's semantics step by step with Python loops and float32 sums, so tests
can check the vectorised faithful mode against it and the benchmark can time an implementation
with the original's structure (its per-layer, per-item loops). Not for production use.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rebalance_experts_reference"]


def _pack(weights: torch.Tensor, num_packs: int) -> tuple[list[int], list[int]]:
    """One row: heaviest first into the lightest non-full pack (lowest index on ties)."""
    n = weights.shape[0]
    cap = n // num_packs
    if cap == 1:
        return list(range(n)), [0] * n
    order = weights.float().sort(-1, descending=True).indices.tolist()
    w32 = weights.float().numpy()
    load = [np.float32(0)] * num_packs
    used = [0] * num_packs
    pack, rank = [0] * n, [0] * n
    for item in order:
        best = -1
        for p in range(num_packs):
            if used[p] < cap and (best < 0 or load[p] < load[best]):
                best = p
        pack[item], rank[item] = best, used[best]
        load[best] = np.float32(load[best] + w32[item])
        used[best] += 1
    return pack, rank


def _replicate(weights: torch.Tensor, num_phy: int) -> tuple[list[int], list[int], list[int]]:
    n = weights.shape[0]
    phy2log, rank, cnt = list(range(n)), [0] * n, [1] * n
    for _ in range(n, num_phy):
        hottest = int((weights / torch.tensor(cnt, dtype=torch.int64)).max(dim=-1).indices)
        phy2log.append(hottest)
        rank.append(cnt[hottest])
        cnt[hottest] += 1
    return phy2log, rank, cnt


def _layer(w: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int) -> tuple[list[int], list[int], list[int]]:
    experts = w.shape[0]
    gsize = experts // num_groups
    per_node = experts // num_nodes
    slots_node = num_phy // num_nodes
    gpus_node = num_gpus // num_nodes
    slots_gpu = num_phy // num_gpus
    group_load = w.view(num_groups, gsize).sum(-1)
    gnode, grank = _pack(group_load, num_nodes)
    # mlog ids: node-major, groups in their rank order inside the node.
    log2mlog = [(gnode[e // gsize] * (num_groups // num_nodes) + grank[e // gsize]) * gsize + e % gsize for e in range(experts)]
    mlog2log = [0] * experts
    for e, m in enumerate(log2mlog):
        mlog2log[m] = e
    phy2log = [0] * num_phy
    phyrank = [0] * num_phy
    logcnt = [0] * experts
    for node in range(num_nodes):
        local = [mlog2log[node * per_node + j] for j in range(per_node)]
        tokens = w[local]
        p2m, rank, cnt = _replicate(tokens, slots_node)
        share = (tokens / torch.tensor(cnt, dtype=torch.int64))[p2m]
        pack, prank = _pack(share, gpus_node)
        for j in range(slots_node):
            slot = node * slots_node + pack[j] * slots_gpu + prank[j]
            phy2log[slot] = local[p2m[j]]
            phyrank[slot] = rank[j]
        for j in range(per_node):
            logcnt[local[j]] = cnt[j]
    return phy2log, phyrank, logcnt


def rebalance_experts_reference(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                                num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's ``rebalance_experts`` semantics, loop by loop (no argument checks).

    Returns ``(phy2log [L, P], log2phy [L, E, max_count] padded with -1, logcnt [L, E])``.
    """
    w = weight.float().cpu()
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # the global policy
    rows = [_layer(w[i], num_replicas, num_groups, num_nodes, num_gpus) for i in range(w.shape[0])]
    phy2log = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    phyrank = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    logcnt = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    width = int(logcnt.max())
    log2phy = torch.full((w.shape[0], w.shape[1], width), -1, dtype=torch.int64)
    for layer in range(w.shape[0]):
        for slot in range(num_replicas):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot
    return phy2log, log2phy, logcnt
