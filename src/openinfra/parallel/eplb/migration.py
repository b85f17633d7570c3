"""Migration-aware rebalancing: keep experts where they are unless moving them buys balance.

Moving an expert replica to another GPU means sending its weights (DeepSeek-V3: ~44 MB in FP8)
over NVLink / RDMA while serving continues, so a rebalance should move as little as it can.
:func:`rebalance_with_migration` takes the placement in service and the new loads and returns
the placement with the fewest moves it finds whose balancedness is within ``budget`` of a full
re-solve, choosing per layer between

* keeping the current placement (0 moves) when it is already good enough,
* local search from the current placement (swaps and replica moves inside a node, stopping as
  soon as the layer is good enough), and
* the full re-solve with its GPUs (and nodes) relabelled to overlap the current placement most.

Moves are counted per GPU: a replica that a GPU holds afterwards but did not hold before (as a
multiset) must be transferred; a replica that only changes slot inside its GPU is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openinfra.parallel.eplb._checks import check_phy2log, check_topology, check_weight
from openinfra.parallel.eplb.layout import balancedness, logical_to_physical, replica_counts, replica_ranks
from openinfra.parallel.eplb.packing import round_pack
from openinfra.parallel.eplb.refine import placement_loads, refine_placement
from openinfra.parallel.eplb.solver import DEFAULT_SOLVER, choose_policy, solve_placement

__all__ = ["MigrationPlan", "rebalance_with_migration", "count_moves", "align_to_previous", "DEEPSEEK_V3_EXPERT_BYTES"]

# One routed expert of DeepSeek-V3 in FP8: gate, up and down projections of 7168 x 2048 (1 byte
# each) plus their float32 scales per 128 x 128 block.
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 + 3 * (7168 // 128) * (2048 // 128) * 4


@dataclass
class MigrationPlan:
    """The result of :func:`rebalance_with_migration`.

    phy2log [L, P], log2phy [L, E, X] (-1 padded), logcnt [L, E]: the new placement, as
    ``rebalance_experts`` returns it. moves [L] int64: replicas each layer must transfer.
    balancedness_before / _after / _fresh [L] float64: the previous placement, the new one and a
    full re-solve, all on the new loads. source [L]: 0 kept, 1 local search, 2 relabelled re-solve.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    moves: torch.Tensor
    balancedness_before: torch.Tensor
    balancedness_after: torch.Tensor
    balancedness_fresh: torch.Tensor
    source: torch.Tensor
    expert_bytes: int

    @property
    def experts_moved(self) -> int:
        """Replicas transferred, summed over layers."""
        return int(self.moves.sum())

    @property
    def bytes_moved(self) -> int:
        """Bytes transferred: replicas moved x bytes per expert."""
        return self.experts_moved * self.expert_bytes

    def summary(self) -> dict:
        return {
            "experts_moved": self.experts_moved,
            "bytes_moved": self.bytes_moved,
            "balancedness_before": float(self.balancedness_before.mean()),
            "balancedness_after": float(self.balancedness_after.mean()),
            "balancedness_fresh": float(self.balancedness_fresh.mean()),
            "layers_kept": int((self.source == 0).sum()),
            "layers_searched": int((self.source == 1).sum()),
            "layers_resolved": int((self.source == 2).sum()),
        }


def count_moves(previous: torch.Tensor, new: torch.Tensor, num_gpus: int, num_experts: int) -> torch.Tensor:
    """Replicas each layer must transfer [L] int64: per GPU, new copies of an expert beyond the
    copies it already held (slot order inside a GPU does not matter)."""
    layers, slots = previous.shape
    gpu = (torch.arange(slots) // (slots // num_gpus)).expand(layers, -1)
    def histogram(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(layers, num_gpus * num_experts, dtype=torch.int64).scatter_add_(1, gpu * num_experts + p, torch.ones_like(p))
    return (histogram(new) - histogram(previous)).clamp(min=0).sum(1)


def _greedy_match(overlap: torch.Tensor) -> torch.Tensor:
    """Assign each new unit (row index) an old unit, greedily by largest overlap.

    overlap [L, K, K] (new x old). Returns perm [L, K]: new unit k takes old unit perm[k]. A loop
    over the K picks, vectorised over layers.
    """
    layers, k, _ = overlap.shape
    score = overlap.to(torch.float64).clone()
    perm = torch.empty(layers, k, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(k):
        flat = score.view(layers, -1).argmax(1)
        i, j = flat // k, flat % k
        perm[rows, i] = j
        score[rows, i, :] = float("-inf")
        score[rows, :, j] = float("-inf")
    return perm


def _units_overlap(prev_units: torch.Tensor, new_units: torch.Tensor) -> torch.Tensor:
    """Replicas shared by every new unit and every old unit: [L, K(new), K(old)].

    Counted as equal (new slot, old slot) pairs, which matches the multiset overlap unless a
    unit holds the same expert twice (then it over-counts, harmlessly for matching).
    """
    eq = new_units.unsqueeze(2).unsqueeze(-1) == prev_units.unsqueeze(1).unsqueeze(3)  # [L, K, K, S, S]
    return eq.sum((-1, -2)).to(torch.float64)


def _waterfill_subset(weight: torch.Tensor, present: torch.Tensor, slots: int) -> torch.Tensor:
    """Replica counts [X, n] over each row's ``present`` experts only (others 0), filling
    ``slots`` per row by water-filling (the greedy's choice, as one top-k)."""
    rows, n = weight.shape
    base = present.to(torch.int64)
    extra = slots - base.sum(1)  # [X] redundant slots per row
    width = int(extra.max()) if rows else 0
    if width <= 0:
        return base
    k = torch.arange(1, width + 1, dtype=torch.float64)
    table = (weight.to(torch.float64).unsqueeze(-1) / k).masked_fill(~present.unsqueeze(-1), float("-inf"))
    flat = table.view(rows, -1).topk(width, dim=1).indices  # [X, width], best first
    use = torch.arange(width).unsqueeze(0) < extra.unsqueeze(1)
    return base.scatter_add_(1, flat // width, use.to(torch.int64))


def repair_counts(slot2exp: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Change as few slots as needed so each expert has ``counts`` replicas.

    slot2exp [X, P], counts [X, n] (each >= 1, summing to P). An expert with surplus copies
    gives up its highest-ranked ones; the freed slots go to experts short of copies.
    """
    rows, slots = slot2exp.shape
    n = counts.shape[1]
    have = torch.zeros(rows, n, dtype=torch.int64).scatter_add_(1, slot2exp, torch.ones_like(slot2exp))
    donor = replica_ranks(slot2exp, n) >= counts.gather(1, slot2exp)  # [X, P] surplus copies
    gain = (counts - have).clamp(min=0)  # [X, n]
    width = int(gain.max()) if gain.numel() else 0
    if width == 0:
        return slot2exp.clone()
    # The gainers as a list per row: expert e repeated gain[e] times, then padding.
    k = torch.arange(width)
    wanted = k.view(1, 1, -1) < gain.unsqueeze(-1)  # [X, n, width]
    order = (~wanted).view(rows, -1).to(torch.int8).argsort(dim=1, stable=True)  # wanted first
    gainers = order // width
    if gainers.shape[1] < slots:
        gainers = torch.cat([gainers, torch.zeros(rows, slots - gainers.shape[1], dtype=torch.int64)], 1)
    gainers = gainers[:, :slots]
    donor_slots = (~donor).to(torch.int8).argsort(dim=1, stable=True)  # donors first, in slot order
    num = donor.sum(1)  # == gain.sum(1)
    j = torch.arange(slots).expand(rows, -1)
    take = j < num.unsqueeze(1)
    out = slot2exp.clone()
    r = torch.arange(rows).unsqueeze(1).expand(-1, slots)
    out[r[take], donor_slots[take]] = gainers[take]
    return out


def repack_extremes(weight: torch.Tensor, slot2exp: torch.Tensor, num_gpus: int, k: int) -> torch.Tensor:
    """Re-pack the replicas of each row's k hottest and k coldest GPUs among those 2k GPUs.

    Replica counts do not change, so no other GPU's load changes; rows whose max load does not
    drop keep their placement. Moves are limited to the 2k GPUs touched.
    """
    rows, slots = slot2exp.shape
    per_gpu = slots // num_gpus
    k = min(k, num_gpus // 2)
    if k == 0:
        return slot2exp.clone()
    _, slot_w, load = placement_loads(weight, slot2exp, num_gpus)
    order = load.argsort(dim=1, descending=True)
    chosen = torch.cat([order[:, :k], order[:, -k:]], 1).sort(1).values  # [X, 2k] GPU ids
    idx = (chosen.unsqueeze(-1) * per_gpu + torch.arange(per_gpu)).view(rows, -1)  # their slots
    sub_w = slot_w.gather(1, idx)
    pack, rank = round_pack(sub_w, 2 * k)
    sub = torch.empty_like(idx).scatter_(1, pack * per_gpu + rank, slot2exp.gather(1, idx))
    out = slot2exp.clone().scatter_(1, idx, sub)
    _, _, new_load = placement_loads(weight, out, num_gpus)
    better = new_load.max(1).values < load.max(1).values
    return torch.where(better.unsqueeze(1), out, slot2exp)


def align_to_previous(previous: torch.Tensor, new: torch.Tensor, num_nodes: int, num_gpus: int, num_experts: int,
                      hierarchical: bool) -> torch.Tensor:
    """Relabel ``new [L, P]`` (nodes, GPUs inside nodes, slots inside GPUs) to overlap ``previous``.

    Every relabelling permutes interchangeable units, so the loads and balancedness are unchanged.
    """
    layers, slots = new.shape
    per_gpu = slots // num_gpus
    out = new.clone()
    if hierarchical and num_nodes > 1:
        pn, nn = previous.view(layers, num_nodes, -1), out.view(layers, num_nodes, -1)
        perm = _greedy_match(_units_overlap(pn, nn))  # new node k -> old position
        out = torch.empty_like(nn).scatter_(1, perm.unsqueeze(-1).expand_as(nn), nn).view(layers, slots)
    nodes = num_nodes if hierarchical else 1
    gpn = num_gpus // nodes
    pg = previous.view(layers * nodes, gpn, per_gpu)
    ng = out.view(layers * nodes, gpn, per_gpu)
    perm = _greedy_match(_units_overlap(pg, ng))
    ng = torch.empty_like(ng).scatter_(1, perm.unsqueeze(-1).expand_as(ng), ng)
    # Inside each GPU, put a replica the GPU already held back in its old slot.
    flat_p = pg.reshape(-1, per_gpu)
    flat_n = ng.reshape(-1, per_gpu)
    result = torch.full_like(flat_n, -1)
    taken = torch.zeros_like(flat_n, dtype=torch.bool)
    rows = torch.arange(flat_n.shape[0])
    for k in range(per_gpu):  # loop over slots per GPU, vectorised over all GPUs
        match = (flat_n == flat_p[:, k : k + 1]) & ~taken
        has = match.any(1)
        first = match.int().argmax(1)
        result[has, k] = flat_n[rows[has], first[has]]
        taken[rows[has], first[has]] = True
    # Fill the remaining slots with the remaining replicas, in order.
    rest_sorted = torch.where(taken, torch.iinfo(torch.int64).max, flat_n).sort(1).values
    free = result < 0
    fill_rank = free.long().cumsum(1) - 1
    result = torch.where(free, rest_sorted.gather(1, fill_rank.clamp(min=0)), result)
    return result.view(layers, slots)


def rebalance_with_migration(weight: torch.Tensor, previous: torch.Tensor, num_replicas: int, num_groups: int,
                             num_nodes: int, num_gpus: int, *, budget: float = 0.01,
                             expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES, solver: str = DEFAULT_SOLVER) -> MigrationPlan:
    """Rebalance for new loads, moving as few replicas as the balancedness budget allows.

    Args:
        weight: [layers, experts] the new loads (see ``rebalance_experts``).
        previous: [layers, num_replicas] the phy2log in service.
        num_replicas, num_groups, num_nodes, num_gpus: as for ``rebalance_experts``.
        budget: balancedness (a fraction, 0.01 = 1 point) a layer may give up against a full
            re-solve to save moves; 0 asks for the re-solve's balancedness.
        expert_bytes: bytes of one expert's weights, for ``bytes_moved``.
        solver: the solver of the full re-solve.

    Returns:
        a :class:`MigrationPlan`. In hierarchical mode replicas stay in their node unless a layer
        falls back to the (relabelled) re-solve.
    """
    w = check_weight(weight)
    layers, experts = w.shape
    check_topology(experts, num_replicas, num_groups, num_nodes, num_gpus)
    prev = check_phy2log(previous, layers, num_replicas, experts, name="previous")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not (0.0 <= float(budget) <= 1.0):
        raise ValueError(f"budget must be a balancedness fraction in [0, 1], got {budget!r}")
    if isinstance(expert_bytes, bool) or not isinstance(expert_bytes, int) or expert_bytes < 0:
        raise ValueError(f"expert_bytes must be a non-negative int, got {expert_bytes!r}")
    hierarchical = choose_policy(num_groups, num_nodes) == "hierarchical"
    nodes = num_nodes if hierarchical else 1
    w64 = w.to(torch.float64)

    fresh, _, _ = solve_placement(w, num_replicas, num_groups, num_nodes, num_gpus, solver)
    fresh = align_to_previous(prev, fresh, num_nodes, num_gpus, experts, hierarchical)
    bal_fresh = balancedness(fresh, w64, num_gpus)
    bal_prev = balancedness(prev, w64, num_gpus)
    goal = (bal_fresh - float(budget)).clamp(min=0.0)
    mean_load = w64.sum(1) / num_gpus
    # The max GPU load that meets the goal, per layer (a little slack for float rounding).
    target = torch.where(goal > 0, mean_load / goal.clamp(min=1e-12), torch.full_like(mean_load, float("inf")))

    # Local search from the current placement, inside each node (rows are (layer, node)).
    slots_node = num_replicas // nodes
    gpus_node = num_gpus // nodes
    node_of_slot = torch.arange(num_replicas) // slots_node
    # A layer conforms to the policy when each expert group (hierarchical) lives on one node;
    # only conforming layers may be kept or searched, the others are re-solved.
    unit = prev // (experts // num_groups) if hierarchical else torch.zeros_like(prev)
    units = num_groups if hierarchical else 1
    home = torch.full((layers, units), -1, dtype=torch.int64).scatter_reduce_(1, unit, node_of_slot.expand(layers, -1), "amax")
    low = torch.full((layers, units), nodes, dtype=torch.int64).scatter_reduce_(1, unit, node_of_slot.expand(layers, -1), "amin")
    conforming = (home == low).all(1)
    searchable = conforming & (bal_prev < goal)
    rows_w = w64.repeat_interleave(nodes, dim=0)
    rows_prev = prev.view(layers * nodes, slots_node)
    rows_target = target.repeat_interleave(nodes) * (1 + 1e-12)
    rows_active = searchable.repeat_interleave(nodes)
    plain = refine_placement(rows_w, rows_prev, gpus_node, target=rows_target, active=rows_active)
    # Second candidate: first give each expert the replica count the new loads call for (a few
    # slots change), then search; rows still short of the goal re-pack their hottest and coldest
    # GPUs together (2k GPUs, doubling k) and search again.
    present = replica_counts(rows_prev, experts) > 0
    repaired = repair_counts(rows_prev, _waterfill_subset(rows_w, present, slots_node))
    repaired = torch.where(rows_active.unsqueeze(1), repaired, rows_prev)
    repaired = refine_placement(rows_w, repaired, gpus_node, target=rows_target, active=rows_active)
    k = 1
    while k <= gpus_node // 2:
        _, _, load = placement_loads(rows_w, repaired, gpus_node)
        short = rows_active & (load.max(1).values > rows_target)
        if not bool(short.any()):
            break
        q = short.nonzero().squeeze(1)
        sub = repack_extremes(rows_w[q], repaired[q], gpus_node, k)
        repaired[q] = refine_placement(rows_w[q], sub, gpus_node, target=rows_target[q])
        k *= 2
    cands = [c.view(layers, num_replicas) for c in (plain, repaired)]
    bal_c = [balancedness(c, w64, num_gpus) for c in cands]
    moves_c = [count_moves(prev, c, num_gpus, experts) for c in cands]
    tol = 1e-12
    ok_c = [searchable & (b >= goal - tol) for b in bal_c]
    big = torch.iinfo(torch.int64).max
    cost = torch.stack([torch.where(ok, m, big) for ok, m in zip(ok_c, moves_c)])  # [2, L]
    best_c = cost.argmin(0)
    searched = torch.stack(cands)[best_c, torch.arange(layers)]
    search_moves = cost.min(0).values
    search_ok = search_moves < big

    # Per layer: keep if good enough; else the candidate meeting the goal with fewer moves.
    moves_fresh = count_moves(prev, fresh, num_gpus, experts)
    keep = conforming & (bal_prev >= goal - tol)
    search_ok = search_ok & (search_moves <= moves_fresh)
    source = torch.where(keep, 0, torch.where(search_ok, 1, 2))
    phy2log = torch.where((source == 0).unsqueeze(1), prev, torch.where((source == 1).unsqueeze(1), searched, fresh))
    log2phy, logcnt = logical_to_physical(phy2log, experts)
    return MigrationPlan(
        phy2log=phy2log, log2phy=log2phy, logcnt=logcnt,
        moves=count_moves(prev, phy2log, num_gpus, experts),
        balancedness_before=bal_prev, balancedness_after=balancedness(phy2log, w64, num_gpus),
        balancedness_fresh=bal_fresh, source=source, expert_bytes=expert_bytes,
    )
