"""``rebalance_experts``: EPLB's entry point, with the policy rule and a choice of solvers.

Solvers (``solver=`` by name, see :data:`SOLVERS`):

* ``"faithful"``: the original algorithm, output for output (greedy LPT packing, greedy
  replication); vectorised over layers and nodes.
* ``"fast"``: vectorised steps only (round-robin packing, one-shot water-filling replication)
  plus local search with swaps and replica moves; no per-item Python loop anywhere.
* ``"best"`` (default): the faithful steps, then local search (swaps and replica moves inside
  each node). The group -> node packing is the original's and the search only ever lowers a
  node's hottest GPU, so every layer is at least as balanced as with ``"faithful"``. The
  original's greedy loops over items remain (vectorised over layers and nodes), except where
  heaviest-with-lightest pairing is provably optimal (<= 2 slots per GPU).
* ``"portfolio"``: ``"best"`` and ``"fast"`` in one batched search, the better kept per layer
  (a little better on skewed loads, twice the search time).
"""

from __future__ import annotations

from typing import Callable

import torch

from openinfra.parallel.eplb._checks import check_topology, check_weight
from openinfra.parallel.eplb.layout import balancedness, logical_to_physical
from openinfra.parallel.eplb.packing import greedy_pack, round_pack
from openinfra.parallel.eplb.pipeline import Steps, draft_placement, finish_placement, hierarchical_placement
from openinfra.parallel.eplb.refine import refine_placement
from openinfra.parallel.eplb.replication import greedy_replicate, waterfill_replicate

__all__ = ["rebalance_experts", "solve_placement", "choose_policy", "SOLVERS", "DEFAULT_SOLVER"]


def choose_policy(num_groups: int, num_nodes: int) -> str:
    """``"hierarchical"`` when the groups split evenly over the nodes, else ``"global"``."""
    return "hierarchical" if num_groups % num_nodes == 0 else "global"


def _refine_groups(pack: Callable) -> Callable:
    """Group -> node packing followed by swap refinement of the node loads."""

    def pack_groups(tokens_per_group: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
        node, rank = pack(tokens_per_group, num_nodes)
        per_node = tokens_per_group.shape[1] // num_nodes
        if per_node == 1:
            return node, rank
        # Express the packing GPU-major ("slot" = node * per_node + rank) and swap groups.
        slot2group = torch.empty_like(node).scatter_(1, node * per_node + rank, torch.arange(node.shape[1]).expand_as(node).contiguous())
        slot2group = refine_placement(tokens_per_group, slot2group, num_nodes, replica_moves=False)
        slots = torch.empty_like(slot2group).scatter_(1, slot2group, torch.arange(node.shape[1]).expand_as(node).contiguous())
        return slots // per_node, slots % per_node

    return pack_groups


def _refine_step(tokens: torch.Tensor, slot2exp: torch.Tensor, gpus: int) -> torch.Tensor:
    return refine_placement(tokens, slot2exp, gpus)


_FAITHFUL = Steps(greedy_pack, greedy_replicate, greedy_pack)
_FAST = Steps(_refine_groups(round_pack), waterfill_replicate, round_pack, _refine_step)


def _pairs_or_greedy(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """With at most two items per pack, heaviest-with-lightest pairing (one vectorised pass) is
    optimal, so it is never worse than the greedy; otherwise the original's greedy."""
    if weight.shape[1] <= 2 * num_packs:
        return round_pack(weight, num_packs)
    return greedy_pack(weight, num_packs)


# The faithful steps with local search on top. Its group -> node packing is the original's, and
# the search only ever lowers a node's hottest GPU, so every layer is at least as balanced as
# the original's.
_SEEDED = Steps(greedy_pack, greedy_replicate, _pairs_or_greedy, _refine_step)


def _place(steps: Steps) -> Callable:
    def solve(weight, num_replicas, num_groups, num_nodes, num_gpus):
        if choose_policy(num_groups, num_nodes) == "global":
            num_groups, num_nodes = 1, 1
        return hierarchical_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, steps)

    return solve


def _portfolio(weight, num_replicas, num_groups, num_nodes, num_gpus):
    if choose_policy(num_groups, num_nodes) == "global":
        num_groups, num_nodes = 1, 1
    # With <= 2 slots per GPU and one node the two candidates coincide (optimal pairing, the
    # same replica counts up to ties): skip the second.
    both = num_nodes > 1 or num_replicas > 2 * num_gpus
    drafts = [draft_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, steps) for steps in ((_SEEDED, _FAST) if both else (_SEEDED,))]
    # One local search over both drafts' rows: the per-iteration cost is mostly fixed overhead.
    refined = _refine_step(torch.cat([d.tokens for d in drafts]), torch.cat([d.slot2mlog for d in drafts]), drafts[0].gpus_per_node)
    cands = [finish_placement(d, part) for d, part in zip(drafts, refined.chunk(len(drafts)))]
    if len(cands) == 1:
        return cands[0]
    scores = torch.stack([balancedness(c[0], weight, num_gpus) for c in cands])  # [2, L]
    pick = scores.argmax(0)  # a tie keeps the seeded (never-worse) candidate
    rows = torch.arange(weight.shape[0])
    return tuple(torch.stack([c[k] for c in cands])[pick, rows] for k in range(3))


SOLVERS: dict[str, Callable] = {
    "faithful": _place(_FAITHFUL),
    "fast": _place(_FAST),
    "best": _place(_SEEDED),
    "portfolio": _portfolio,
}
DEFAULT_SOLVER = "best"


def solve_placement(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                    solver: str = DEFAULT_SOLVER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated placement: ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])`` int64."""
    w = check_weight(weight)
    check_topology(w.shape[1], num_replicas, num_groups, num_nodes, num_gpus)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver](w, num_replicas, num_groups, num_nodes, num_gpus)


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      solver: str = DEFAULT_SOLVER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical experts on ``num_gpus`` GPUs for the loads ``weight``.

    Args:
        weight: [layers, num_logical_experts] non-negative load statistics (e.g. token counts);
            any real dtype or device (computed in float32 on the CPU, as the original does).
        num_replicas: physical expert slots, a multiple of ``num_gpus`` and >= the experts.
        num_groups: expert groups (group-limited routing); must divide the experts.
        num_nodes: server nodes (fast intra-node links); must divide ``num_gpus``. When the
            groups split evenly over the nodes the hierarchical policy keeps each group, and
            every replica of its experts, on one node; otherwise the global policy is used.
        num_gpus: GPUs; GPU g owns slots ``[g * P / G, (g + 1) * P / G)``.
        solver: ``"best"`` (default), ``"fast"`` or ``"faithful"`` (the original's outputs).

    Returns:
        ``(phy2log [layers, num_replicas], log2phy [layers, experts, max_replicas] padded with
        -1, logcnt [layers, experts])``, all int64 on the CPU.
    """
    phy2log, phyrank, logcnt = solve_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, solver)
    log2phy, _ = logical_to_physical(phy2log, logcnt.shape[1], phyrank)
    return phy2log, log2phy, logcnt
