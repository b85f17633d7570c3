"""The ``openinfra`` console script.

Each layer contributes subcommands through a module with ``register(subparsers)``; the modules are
listed in ``COMMAND_MODULES`` (command name -> module) in the order ``--help`` shows them. A module
that does not exist yet (a component still being built) is left out of ``--help``. When the first
argument names a command, only that command's module is imported, so ``openinfra fs ...`` does not
pay for importing PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from openinfra import __version__

__all__ = ["main", "build_parser", "COMMAND_MODULES", "picture_path"]

COMMAND_MODULES = {
    "demo": "openinfra.demo",
    "fs": "openinfra.fs.cli",
    "data": "openinfra.smallpond.cli",
    "train": "openinfra.training.cli",
    "serve": "openinfra.serving.cli",
    "eplb": "openinfra.parallel.eplb.cli",
    "profile": "openinfra.profiling.cli",
    "bench": "openinfra.bench.cli",
    "cost": "openinfra.serving.cost",
}


def picture_path(flag: str, path: str) -> str:
    """The file a picture option (``--png``) really writes, or ``ValueError`` naming ``flag``.

    Matplotlib adds ``.png`` to a name without a suffix (so that is the name to report) and
    refuses a suffix that is not an image format; a directory cannot be written as a file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file name such as {os.path.join(path, 'out.png')}")
    return path if os.path.splitext(path)[1] else path + ".png"


def not_a_directory(flag: str, path: str | None) -> str | None:
    """``"FLAG PATH: not a directory"`` when ``path`` names something that exists and is not a
    directory (a directory option given a file), else None (unset, missing or a directory)."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path}: not a directory"
    return None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only ``only``'s (what ``main`` does for speed)."""
    parser = argparse.ArgumentParser(
        prog="openinfra",
        description="The DeepSeek Open Infra stack as one Python package. `openinfra demo` runs the whole job.",
    )
    parser.add_argument("--version", action="version", version=f"openinfra {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command, module in COMMAND_MODULES.items():
        if (only is None or command == only) and _module_exists(module):
            importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    parser = build_parser(first if first in COMMAND_MODULES else None)
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
