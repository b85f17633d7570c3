"""``openinfra profile pipeline TRACE [--png OUT] [--json]``: a recorded schedule's bubble and picture.

Found by ``openinfra.profiling.cli`` through its ``EXTENSION_MODULES`` hook (``register_profile``).
TRACE is the JSON of ``ScheduleRecorder.to_json`` (all ranks) or its Chrome-trace form.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register_profile", "format_stats"]


def format_stats(stats: dict) -> str:
    """Human-readable lines for ``timeline.bubble_stats`` output."""
    lines = [
        f"schedule {stats['schedule']}, {stats['ranks']} ranks, step window {stats['window_us'] / 1e3:.2f} ms",
        "idle per rank (ms): " + ", ".join(f"{x / 1e3:.2f}" for x in stats["idle_us"]),
        f"measured bubble {stats['measured_bubble']:.1%}"
        + (f" | formula {stats['formula_bubble']:.1%}" if stats["formula_bubble"] is not None else " | formula n/a"),
        "mean chunk time (ms): " + ", ".join(
            f"{k} {v / 1e3:.3f}" for k, v in stats["mean_us"].items() if v is not None),
    ]
    if "png" in stats:
        lines.append(f"wrote {stats['png']}")
    return "\n".join(lines)


def _pipeline(args: argparse.Namespace) -> int:
    from openinfra.cli import picture_path

    try:
        # a directory is refused, a name without a suffix reported as the NAME.png matplotlib writes
        png = None if args.png is None else picture_path("--png", args.png)
        from .timeline import pipeline_report

        stats = pipeline_report(args.trace, png)
    except (ValueError, FileNotFoundError) as exc:
        msg = f"--png {args.png}: {exc}" if str(exc).startswith("Format ") else str(exc)
        print(f"openinfra profile pipeline: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def register_profile(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pipeline", help="DualPipe schedule trace: per-rank timeline picture and measured vs formula bubble",
        description="Read a ScheduleRecorder trace (JSON or Chrome trace), report the measured pipeline bubble "
                    "next to the DualPipe formula's, and draw the per-rank timeline.")
    p.add_argument("trace", help="trace JSON written by ScheduleRecorder.to_json / to_chrome_trace")
    p.add_argument("--png", default=None, help="write the timeline picture here")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_pipeline)
