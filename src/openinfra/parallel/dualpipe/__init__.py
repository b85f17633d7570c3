"""DualPipe and DualPipeV: bidirectional pipeline parallelism on torch.distributed (gloo or NCCL).

    from openinfra.parallel.dualpipe import DualPipeV
    pipe = DualPipeV((stage_down, stage_up), p2p_shapes=[(micro_batch, seq, hidden)])
    loss, _ = pipe.step(x, num_chunks=20, criterion=mse, labels=(y,))   # rank 0 holds x, y, loss

See docs/dualpipe.md.
"""

from .base import DualPipeBase
from .dualpipe import DualPipe
from .dualpipev import DualPipeV
from .moe import MoEConfig, MoEStage
from .p2p import P2PSpec
from .recorder import ScheduleEvent, ScheduleRecorder
from .schedule import PHASES, bubble_formula, compute_counts, phase_counts
from .utils import calc_diff, gather, run_backward, scatter
from .weight_grad import WeightGradStore, ZeroBubbleLinear

__all__ = [
    "DualPipe", "DualPipeV", "DualPipeBase", "WeightGradStore", "ZeroBubbleLinear", "P2PSpec",
    "ScheduleRecorder", "ScheduleEvent", "MoEConfig", "MoEStage", "PHASES", "phase_counts", "compute_counts", "bubble_formula",
    "run_backward", "scatter", "gather", "calc_diff",
]
