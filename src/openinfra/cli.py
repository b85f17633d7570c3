"""The ``openinfra`` console script.

Each layer contributes subcommands through a module with ``register(subparsers)``; the modules are
listed in ``COMMAND_MODULES`` in the order ``--help`` shows them. A module that does not exist yet
(a component still being built) is left out of ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from openinfra import __version__

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

COMMAND_MODULES = (
    "openinfra.demo",                # demo
    "openinfra.fs.cli",              # fs ...
    "openinfra.smallpond.cli",       # data ...
    "openinfra.training.cli",        # train
    "openinfra.serving.cli",         # serve
    "openinfra.parallel.eplb.cli",   # eplb ...
    "openinfra.profiling.cli",       # profile ...
    "openinfra.bench.cli",           # bench ...
    "openinfra.serving.cost",        # cost
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openinfra",
        description="The DeepSeek Open Infra stack as one Python package. `openinfra demo` runs the whole job.",
    )
    parser.add_argument("--version", action="version", version=f"openinfra {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if _module_exists(name):
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
