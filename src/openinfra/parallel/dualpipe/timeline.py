"""Read a recorded pipeline schedule, measure its bubble, compare with the formula, draw it.

``openinfra profile pipeline TRACE --png OUT`` is ``pipeline_report(TRACE, OUT)``: TRACE is a
JSON written by ``ScheduleRecorder.to_json`` (all ranks, after ``gather``) or its Chrome-trace
form; OUT gets a per-rank timeline in the style of the DualPipe README's figure (one row per
rank, forward chunks of the two directions/arms in two colours, backward chunks, W chunks, and
overlapped F&B cells drawn as one bordered cell split in two).

Bubble, measured: the step window is [first compute start, last compute end] over all ranks;
a rank's idle time is the window minus the union of its compute intervals (F, B, W, F&B), so
waiting for a peer, p2p time and the ramp up/down all count as bubble. Bubble, formula: the
README's per-rank expression evaluated with the mean F, B, W and F&B durations of the same
trace, as a fraction of (formula bubble + the rank's mean busy time).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from statistics import mean
from typing import Any

from .recorder import COMPUTE_KINDS
from .schedule import bubble_formula

__all__ = ["load_trace", "bubble_stats", "draw_timeline", "pipeline_report"]


def load_trace(path: str | Path) -> dict[str, Any]:
    """Our trace JSON (``{"meta", "events"}``), also accepting its Chrome-trace form (``.gz`` too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "events" in data:
        return data
    if isinstance(data, dict) and "traceEvents" in data:
        events = []
        for e in data["traceEvents"]:
            if e.get("ph") != "X":
                continue
            args = e.get("args", {})
            events.append({
                "rank": e["pid"], "kind": e["cat"], "start_us": e["ts"], "end_us": e["ts"] + e["dur"],
                "module": args.get("module"), "chunk": args.get("chunk"), "module_b": args.get("module_b"),
                "chunk_b": args.get("chunk_b"), "peer": args.get("peer"), "nbytes": args.get("nbytes", 0),
                "phase": args.get("phase", 0), "zb": bool(args.get("zb", False)),
            })
        return {"meta": data.get("otherData", {}), "events": events}
    raise ValueError(f"{path}: expected a schedule trace ({{'meta', 'events'}}) or a Chrome trace ({{'traceEvents'}})")


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def bubble_stats(trace: dict[str, Any]) -> dict[str, Any]:
    """Measured vs formula bubble of a recorded step (see the module docstring).

    Returns ``{"ranks", "window_us", "idle_us" [per rank], "measured_bubble", "formula_bubble",
    "mean_us": {"F", "B", "W", "F&B"}, "schedule"}``; fractions are in [0, 1].
    """
    events = [e for e in trace["events"] if e["kind"] in COMPUTE_KINDS]
    if not events:
        raise ValueError("the trace has no compute events (F, B, W, F&B); was the recorder enabled?")
    ranks = sorted({e["rank"] for e in events})
    t0 = min(e["start_us"] for e in events)
    t1 = max(e["end_us"] for e in events)
    window = t1 - t0
    busy = {r: _union_length([(e["start_us"], e["end_us"]) for e in events if e["rank"] == r]) for r in ranks}
    idle = [window - busy[r] for r in ranks]

    def avg(kind: str, **cond) -> float | None:
        d = [e["end_us"] - e["start_us"] for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in cond.items())]
        return mean(d) if d else None

    f, w, fb = avg("F"), avg("W") or 0.0, avg("F&B")
    b_full, b_zb = avg("B", zb=False), avg("B", zb=True)
    if b_full is None and b_zb is not None:
        b_full = b_zb + w
    schedule = str(trace.get("meta", {}).get("schedule", "DualPipeV")).lower()
    formula = None
    if f is not None and b_full is not None and schedule in ("dualpipe", "dualpipev"):
        bubble = bubble_formula(schedule, len(ranks), f, b_full, w, fb)
        mean_busy = mean(busy.values())
        formula = bubble / (bubble + mean_busy) if bubble + mean_busy > 0 else 0.0
    return {
        "schedule": schedule, "ranks": len(ranks), "window_us": window, "idle_us": idle,
        "measured_bubble": mean(idle) / window if window > 0 else 0.0, "formula_bubble": formula,
        "mean_us": {"F": f, "B": b_full, "B_input_only": b_zb, "W": w, "F&B": fb},
    }


_COLORS = {"F0": "#f6c177", "F1": "#9ccfd8", "B0": "#eb6f92", "B1": "#c4a7e7", "W": "#86c166"}


def draw_timeline(trace: dict[str, Any], out_png: str | Path, title: str | None = None) -> Path:
    """Draw the per-rank timeline to ``out_png`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    events = [e for e in trace["events"] if e["kind"] in COMPUTE_KINDS]
    if not events:
        raise ValueError("the trace has no compute events to draw")
    ranks = sorted({e["rank"] for e in events})
    t0 = min(e["start_us"] for e in events)
    t1 = max(e["end_us"] for e in events)
    scale = 1e3  # draw in ms
    fig, ax = plt.subplots(figsize=(min(28, 6 + len(events) / max(len(ranks), 1) * 0.35), 0.7 * len(ranks) + 1.6))
    for e in events:
        y = ranks.index(e["rank"])
        x0, width = (e["start_us"] - t0) / scale, (e["end_us"] - e["start_us"]) / scale
        if e["kind"] == "F&B":
            top = _COLORS[f"F{e['module']}"]
            bottom = _COLORS[f"B{e['module_b']}"]
            # the y axis is inverted (rank 0 on top): y - 0.4 is the upper half
            ax.add_patch(Rectangle((x0, y - 0.4), width, 0.4, facecolor=top, linewidth=0))
            ax.add_patch(Rectangle((x0, y), width, 0.4, facecolor=bottom, linewidth=0))
            ax.add_patch(Rectangle((x0, y - 0.4), width, 0.8, fill=False, edgecolor="black", linewidth=1.2))
            label = f"{e['chunk']}/{e['chunk_b']}"
        else:
            key = "W" if e["kind"] == "W" else f"{e['kind']}{e['module']}"
            ax.add_patch(Rectangle((x0, y - 0.4), width, 0.8, facecolor=_COLORS[key], edgecolor="white", linewidth=0.5))
            label = "" if e["chunk"] is None else str(e["chunk"])
        if label and width > (t1 - t0) / scale / 120:
            ax.text(x0 + width / 2, y, label, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, (t1 - t0) / scale)
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_xlabel("time (ms)")
    stats = bubble_stats(trace)
    meta = trace.get("meta", {})
    subtitle = f"measured bubble {stats['measured_bubble']:.1%}"
    if stats["formula_bubble"] is not None:
        subtitle += f", formula {stats['formula_bubble']:.1%}"
    ax.set_title(title or f"{meta.get('schedule', 'pipeline')}: PP={len(ranks)}, {meta.get('num_chunks', '?')} chunks — {subtitle}")
    ax.legend(handles=[
        Patch(color=_COLORS["F0"], label="F (dir/arm 0)"), Patch(color=_COLORS["F1"], label="F (dir/arm 1)"),
        Patch(color=_COLORS["B0"], label="B (dir/arm 0)"), Patch(color=_COLORS["B1"], label="B (dir/arm 1)"),
        Patch(color=_COLORS["W"], label="W"), Patch(fill=False, edgecolor="black", label="F&B overlapped (top F, bottom B; F/B chunk)"),
    ], loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=6, fontsize=7, frameon=False)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return out_png


def pipeline_report(trace_path: str | Path, png: str | Path | None = None) -> dict[str, Any]:
    """Load TRACE, compute bubble stats, draw the PNG if asked; returns the stats (JSON-able)."""
    trace = load_trace(trace_path)
    stats = bubble_stats(trace)
    if png is not None:
        stats["png"] = str(draw_timeline(trace, png))
    return stats
