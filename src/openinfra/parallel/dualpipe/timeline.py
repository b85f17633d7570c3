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

A malformed trace (an event that is not an object, lacks ``rank``/``kind``/``start_us``/``end_us``,
has a field of the wrong type, ends before it starts, or is an F/B/F&B chunk without its module 0
or 1) raises ``ValueError`` naming the file and the event's index.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from statistics import mean
from typing import Any

from .recorder import COMPUTE_KINDS
from .schedule import bubble_formula

__all__ = ["load_trace", "bubble_stats", "draw_timeline", "pipeline_report"]


_OPTIONAL = {"module": None, "chunk": None, "module_b": None, "chunk_b": None, "peer": None, "nbytes": 0, "phase": 0,
             "zb": False}


def _bad(path: Path, i: int, e: dict, msg: str) -> ValueError:
    kind = e.get("kind", e.get("cat"))
    return ValueError(f"{path}: not a valid trace: event {i}" + (f" ({kind!r})" if isinstance(kind, str) else "") + f": {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_events(path: Path, events: Any, where: str = "events") -> list[dict[str, Any]]:
    """The schedule events, each checked for what :func:`bubble_stats` and :func:`draw_timeline` read."""
    if not isinstance(events, list):
        raise ValueError(f"{path}: not a valid trace: '{where}' must be a list of events, got {type(events).__name__}")
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: not a valid trace: event {i}: expected an object, got {type(e).__name__} {e!r:.80}")
        missing = [k for k in ("rank", "kind", "start_us", "end_us") if k not in e]
        if missing:
            raise _bad(path, i, e, f"missing {', '.join(map(repr, missing))}")
        if not _is_int(e["rank"]) or e["rank"] < 0:
            raise _bad(path, i, e, f"'rank' must be an integer >= 0, got {e['rank']!r}")
        if not isinstance(e["kind"], str):
            raise _bad(path, i, e, f"'kind' must be a string, got {e['kind']!r}")
        for k in ("start_us", "end_us"):
            v = e[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad(path, i, e, f"{k!r} must be a finite number, got {v!r}")
        if e["end_us"] < e["start_us"]:
            raise _bad(path, i, e, f"negative duration (end_us {e['end_us']!r} < start_us {e['start_us']!r})")
        for k in ("chunk", "chunk_b", "peer", "module", "module_b"):
            if e.get(k) is not None and not _is_int(e[k]):
                raise _bad(path, i, e, f"{k!r} must be an integer or null, got {e[k]!r}")
        for k in ("nbytes", "phase"):
            if k in e and not _is_int(e[k]):
                raise _bad(path, i, e, f"{k!r} must be an integer, got {e[k]!r}")
        if "zb" in e and not isinstance(e["zb"], bool):
            raise _bad(path, i, e, f"'zb' must be true or false, got {e['zb']!r}")
        for k, default in _OPTIONAL.items():  # what ScheduleEvent defaults them to (bubble_stats matches zb=False)
            e.setdefault(k, default)
        need = {"F": ("module",), "B": ("module",), "F&B": ("module", "module_b")}.get(e["kind"], ())
        for k in need:
            if e.get(k) not in (0, 1):
                raise _bad(path, i, e, f"a {e['kind']} chunk needs {k!r} 0 or 1, got {e.get(k)!r}")
    return events


def load_trace(path: str | Path) -> dict[str, Any]:
    """Our trace JSON (``{"meta", "events"}``), also accepting its Chrome-trace form (``.gz`` too).

    Raises ``ValueError`` naming the file (and the event's index) when the trace is malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "events" in data:
        if not isinstance(data.get("meta", {}), dict):
            raise ValueError(f"{path}: not a valid trace: 'meta' must be an object, got {type(data['meta']).__name__}")
        _check_events(path, data["events"])
        return data
    if isinstance(data, dict) and "traceEvents" in data:
        if not isinstance(data["traceEvents"], list):
            raise ValueError(f"{path}: not a valid trace: 'traceEvents' must be a list, got {type(data['traceEvents']).__name__}")
        if not isinstance(data.get("otherData", {}), dict):
            raise ValueError(f"{path}: not a valid trace: 'otherData' must be an object, got {type(data['otherData']).__name__}")
        events, index = [], []
        for i, e in enumerate(data["traceEvents"]):
            if not isinstance(e, dict):
                raise ValueError(f"{path}: not a valid trace: traceEvents[{i}]: expected an object, got {type(e).__name__} {e!r:.80}")
            if e.get("ph") != "X":
                continue
            missing = [k for k in ("pid", "cat", "ts", "dur") if k not in e]
            if missing:
                raise ValueError(f"{path}: not a valid trace: traceEvents[{i}]: an 'X' event needs {', '.join(map(repr, missing))}")
            for k in ("ts", "dur"):
                v = e[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{path}: not a valid trace: traceEvents[{i}]: {k!r} must be a finite number, got {v!r}")
            args = e.get("args", {})
            if not isinstance(args, dict):
                raise ValueError(f"{path}: not a valid trace: traceEvents[{i}]: 'args' must be an object, got {args!r:.80}")
            index.append(i)
            events.append({
                "rank": e["pid"], "kind": e["cat"], "start_us": e["ts"], "end_us": e["ts"] + e["dur"],
                "module": args.get("module"), "chunk": args.get("chunk"), "module_b": args.get("module_b"),
                "chunk_b": args.get("chunk_b"), "peer": args.get("peer"), "nbytes": args.get("nbytes", 0),
                "phase": args.get("phase", 0), "zb": bool(args.get("zb", False)),
            })
        for i, e in zip(index, events):
            try:
                _check_events(path, [e])
            except ValueError as exc:  # name the Chrome event, not its position among the X events
                head = f"{path}: not a valid trace: "
                raise ValueError(str(exc).replace(head + "event 0", head + f"traceEvents[{i}]", 1)) from None
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
    if not out_png.suffix:  # matplotlib writes NAME.png then: report that file
        out_png = out_png.with_name(out_png.name + ".png")
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
