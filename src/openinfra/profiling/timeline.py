"""PNG timelines: one row per rank, a compute lane above a communication lane, coloured by phase.

Only the counted intervals are drawn (see :mod:`openinfra.profiling.summary`); the title carries the
bubble and overlap figures so the picture and the numbers come together in the report.
"""

from __future__ import annotations

import os
from pathlib import Path

from openinfra.profiling.summary import Source, _chosen, summarize
from openinfra.profiling.trace import Trace, load_trace

__all__ = ["plot_timeline", "PHASE_COLORS"]

PHASE_COLORS = {
    "F": "#4878d0", "B": "#ee854a", "W": "#6acc64", "attn": "#4878d0", "mlp": "#82c6e2", "compute": "#8c8c8c",
    "dispatch": "#d65f5f", "combine": "#956cb4", "send": "#dc7ec0", "recv": "#d5bb67", "comm": "#797979",
}
_KERNEL_COLOR = {"compute": "#4c72b0", "comm": "#c44e52", "other": "#bbbbbb"}


def plot_timeline(trace: Trace | str | os.PathLike | list, png: str | os.PathLike, source: Source = "auto",
                  title: str | None = None, width: float = 14.0, dpi: int = 120, step: int | None = None) -> Path:
    """Draw ``trace`` (or one ``ProfilerStep#step`` of it) to ``png`` and return its path. Times on the x
    axis in ms from the window start."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or the GPU box
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(trace, Trace):
        trace = load_trace(trace)
    if step is not None:
        trace = trace.clipped(*trace.step_window(step))
    summary = summarize(trace, source)
    ranks = trace.ranks
    chosen = {r: _chosen(trace.intervals[r], source)[0] for r in ranks}
    t0 = min(iv.start_us for ivs in chosen.values() for iv in ivs if iv.kind != "other")
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.75 * len(ranks)))
    used: dict[str, str] = {}
    for row, r in enumerate(ranks):
        y = (len(ranks) - 1 - row) * 1.0
        for iv in chosen[r]:
            if iv.kind == "other":
                continue
            color = PHASE_COLORS.get(iv.phase or "", _KERNEL_COLOR[iv.kind])
            label = iv.phase or f"{iv.kind} ({iv.source})"
            used.setdefault(label, color)
            lane_y = y + (0.45 if iv.kind == "compute" else 0.05)
            ax.broken_barh([((iv.start_us - t0) / 1e3, iv.dur_us / 1e3)], (lane_y, 0.38), facecolors=color,
                           edgecolors="black" if iv.phase in ("F", "B", "W") else "none", linewidth=0.3)
    ax.set_yticks([(len(ranks) - 1 - i) + 0.45 for i in range(len(ranks))])
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.set_xlabel("time (ms); upper lane compute, lower lane communication")
    ov = summary.overlap_fraction
    head = title or "timeline"
    ax.set_title(f"{head} - bubble {summary.bubble:.1%} ({summary.bubble_basis}), "
                 f"overlap {'n/a' if ov is None else f'{ov:.1%}'}")
    ax.set_xlim(0, summary.window_us / 1e3 * 1.01 or 1.0)
    ax.set_ylim(-0.1, len(ranks))
    ax.legend(handles=[Patch(color=c, label=n) for n, c in used.items()], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
