"""EPLB: the expert-parallel load balancer (DeepSeek's EPLB, rebuilt and extended).

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` keeps the
original's API and outputs (``solver="faithful"`` reproduces them exactly); the default solver
adds local search and never does worse. ``rebalance_with_migration`` keeps experts where they
are unless moving them buys balance; ``ExpertLoadTracker`` turns per-expert token counts into
the load estimate; ``balancedness`` is the metric (mean GPU load / max GPU load).
"""

from openinfra.parallel.eplb.files import read_loads, read_plan, write_plan
from openinfra.parallel.eplb.layout import balancedness, gpu_loads, logical_to_physical, replica_counts
from openinfra.parallel.eplb.migration import (
    DEEPSEEK_V3_EXPERT_BYTES, MigrationPlan, align_to_previous, count_moves, rebalance_with_migration,
)
from openinfra.parallel.eplb.tracker import ExpertLoadTracker
from openinfra.parallel.eplb.solver import DEFAULT_SOLVER, SOLVERS, choose_policy, rebalance_experts, solve_placement

__all__ = [
    "rebalance_experts", "solve_placement", "SOLVERS", "DEFAULT_SOLVER", "choose_policy",
    "balancedness", "gpu_loads", "logical_to_physical", "replica_counts",
    "rebalance_with_migration", "MigrationPlan", "count_moves", "align_to_previous", "DEEPSEEK_V3_EXPERT_BYTES",
    "ExpertLoadTracker", "read_loads", "read_plan", "write_plan",
]
