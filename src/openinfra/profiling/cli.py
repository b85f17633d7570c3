"""``openinfra profile ...``: read Chrome traces and report overlap, bubble and idle time, or draw them.

    openinfra profile summary TRACE [TRACE ...] [--source auto|host|device] [--step N] [--json]
    openinfra profile timeline TRACE [TRACE ...] --png OUT [--step N] [--title T]
    openinfra profile merge TRACE [TRACE ...] --out MERGED.json

TRACE is a torch.profiler Chrome trace (.json or .json.gz), several of them (one per rank) or a
directory of them. Other components add ``profile`` subcommands without editing this file: a module
listed in ``EXTENSION_MODULES`` that exists and defines ``register_profile(subparsers)`` is called
with this command's subparsers (DualPipe's schedule recorder adds ``profile pipeline`` that way).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

__all__ = ["register", "EXTENSION_MODULES"]

EXTENSION_MODULES = ("openinfra.parallel.dualpipe.profile_cli",)


def _fail(msg: str) -> int:
    print(f"openinfra profile: {msg}", file=sys.stderr)
    return 2


def _guard(fn):
    """Bad input as one line on stderr, never a traceback: a path that cannot be read or written
    (OSError), and a trace whose events are not the dicts with the fields a Chrome trace has (the
    readers index them: KeyError, TypeError, AttributeError)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except OSError as exc:
            return _fail(str(exc))
        except (KeyError, TypeError, AttributeError) as exc:
            traces = args.trace if isinstance(args.trace, list) else [args.trace]
            detail = f"an event lacks the field {exc}" if isinstance(exc, KeyError) else str(exc)
            return _fail(f"{', '.join(map(str, traces))}: not a valid trace ({detail})")
    return run


def _summary(args: argparse.Namespace) -> int:
    from openinfra.profiling.summary import format_summary, summarize

    if args.phases < 0:
        return _fail(f"--phases: expected a count >= 0, got {args.phases}")
    try:
        s = summarize(args.trace, source=args.source, step=args.step)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(json.dumps(s.to_dict(), indent=2) if args.json else format_summary(s, args.phases))
    return 0


def _timeline(args: argparse.Namespace) -> int:
    from openinfra.cli import picture_path
    from openinfra.profiling.timeline import plot_timeline

    try:
        png = picture_path("--png", args.png)
        out = plot_timeline(args.trace, png, source=args.source, title=args.title, step=args.step)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(f"--png {args.png}: {exc}" if str(exc).startswith("Format ") else str(exc))
    print(f"wrote {out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from openinfra.profiling.trace import merge_traces

    if os.path.isdir(args.out):
        return _fail(f"--out {args.out}: is a directory; give a file name such as {os.path.join(args.out, 'merged.json')}")
    try:
        out = merge_traces(args.trace, args.out)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}")
    return 0


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``profile`` and its subcommands to the ``openinfra`` parser."""
    p = subparsers.add_parser("profile", help="summarize and draw profiler traces (overlap, bubble, idle per rank)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="profile commands", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])

    def traces(q: argparse.ArgumentParser) -> None:
        q.add_argument("trace", nargs="+", help="Chrome trace file(s) (.json / .json.gz), one per rank, or a directory")
        q.add_argument("--source", choices=("auto", "host", "device"), default="auto",
                       help="count GPU-timeline events (device), our annotations + comm ops on the CPU (host), "
                            "or device where a rank has GPU events (auto, default)")
        q.add_argument("--step", type=int, default=None,
                       help="only torch.profiler's ProfilerStep#STEP (events clipped to it); default: the whole trace")

    s = sub.add_parser("summary", help="compute/communication overlap, pipeline bubble and idle time per rank")
    traces(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--phases", type=int, default=12, help="how many phases/events to list (default 12)")
    s.set_defaults(func=_summary)

    t = sub.add_parser("timeline", help="draw a per-rank timeline PNG")
    traces(t)
    t.add_argument("--png", required=True, help="output PNG path")
    t.add_argument("--title", default=None, help="title prefix")
    t.set_defaults(func=_timeline)

    m = sub.add_parser("merge", help="merge per-rank traces into one Chrome trace (pid = rank) for Perfetto")
    m.add_argument("trace", nargs="+", help="Chrome trace file(s) or a directory")
    m.add_argument("--out", required=True, help="output .json path")
    m.set_defaults(func=_merge)

    for name in EXTENSION_MODULES:
        if _module_exists(name):
            mod = importlib.import_module(name)
            if hasattr(mod, "register_profile"):
                mod.register_profile(sub)
    for q in sub.choices.values():  # ours and the extensions' subcommands
        if q.get_default("func") is not None:
            q.set_defaults(func=_guard(q.get_default("func")))
