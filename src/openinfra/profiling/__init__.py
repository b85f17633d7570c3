"""Profiling: phase annotations, Chrome traces, overlap / bubble / idle summaries and PNG timelines."""
