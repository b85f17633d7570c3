"""Profiling: phase annotations, Chrome traces, overlap / bubble / idle summaries and PNG timelines."""

from openinfra.profiling.annotate import (COMM_PHASES, COMPUTE_PHASES, PHASE_PREFIX, PIPELINE_PHASES, parse_phase, phase,
                                          phase_name)

__all__ = ["phase", "phase_name", "parse_phase", "PHASE_PREFIX", "COMPUTE_PHASES", "COMM_PHASES", "PIPELINE_PHASES"]
