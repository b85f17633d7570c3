"""Profiling: phase annotations, Chrome traces, overlap / bubble / idle summaries and PNG timelines.

    from openinfra.profiling import phase, record_trace, summarize, format_summary, plot_timeline
    with record_trace("trace.json"):
        with phase("attn"): ...
        with phase("dispatch"): ...
    print(format_summary(summarize("trace.json")))
    plot_timeline("trace.json", "timeline.png")
"""

from openinfra.profiling.annotate import (COMM_PHASES, COMPUTE_PHASES, PHASE_PREFIX, PIPELINE_PHASES, parse_phase, phase,
                                          phase_name)
from openinfra.profiling.summary import (RankSummary, TraceSummary, format_summary, intersection_length, summarize,
                                         union_length)
from openinfra.profiling.timeline import PHASE_COLORS, plot_timeline
from openinfra.profiling.trace import (Interval, Trace, classify, export_chrome_trace, load_trace, merge_traces,
                                       record_trace, write_chrome_trace)

__all__ = [
    "phase", "phase_name", "parse_phase", "PHASE_PREFIX", "COMPUTE_PHASES", "COMM_PHASES", "PIPELINE_PHASES",
    "record_trace", "export_chrome_trace", "write_chrome_trace", "merge_traces", "load_trace", "classify",
    "Interval", "Trace", "summarize", "format_summary", "TraceSummary", "RankSummary", "union_length",
    "intersection_length", "plot_timeline", "PHASE_COLORS",
]
