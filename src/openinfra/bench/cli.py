"""``openinfra bench``: list routines, run one, print the table and a last JSON line, save results."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from openinfra.bench.harness import format_table, routines, save_result

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    r = args.routine
    if r.needs_gpu:
        import torch

        if not torch.cuda.is_available():
            print(f"openinfra bench {r.name}: error: needs a CUDA GPU and none is visible", file=sys.stderr)
            return 2
    try:
        result = r.fn(args)
    except ValueError as exc:  # a routine's check of its arguments (a count, a config name, a budget)
        print(f"openinfra bench {r.name}: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result.rows))
    command = "openinfra " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else f"openinfra bench {r.name}"
    if args.save:
        path = save_result(r.name, result, command, Path(args.results_dir) if args.results_dir else None)
        print(f"saved {path}", file=sys.stderr)
    print(json.dumps({"benchmark": r.name, **result.summary}, default=str))
    return 0


def _list(args: argparse.Namespace) -> int:
    for name, r in routines().items():
        print(f"{name:14} {'[gpu] ' if r.needs_gpu else ''}{r.help}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: ours against peers and physical limits, in one run")
    p.set_defaults(func=_list)
    sub = p.add_subparsers(title="routines", metavar="NAME")
    for name, r in routines().items():
        rp = sub.add_parser(name, help=r.help, description=r.help)
        rp.add_argument("--save", action="store_true", help="write benchmarks/results/<name>_<hardware>_<date>.json")
        rp.add_argument("--results-dir", default=None, help="directory for --save (default benchmarks/results)")
        if r.add_arguments:
            r.add_arguments(rp)
        rp.set_defaults(func=_run, routine=r)
