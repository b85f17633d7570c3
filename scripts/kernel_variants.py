"""Copies of a kernel module with pieces of its source replaced: the variant-timing probes'
(``gemm_variant_probe.py``, ``mla_variant_probe.py``) way of removing one piece of work at a time.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from types import ModuleType


def load_variant(module: ModuleType, name: str, edits: list[tuple[str, str]]) -> ModuleType:
    """A fresh module from ``module``'s source with each ``(old, new)`` of ``edits`` applied to
    every occurrence (each ``old`` must occur), importable under the name ``<module>_<name>``."""
    src = open(module.__file__).read()
    for old, new in edits:
        assert old in src, (name, old[:60])
        src = src.replace(old, new)
    tag = f"{module.__name__.rsplit('.', 1)[-1]}_{name}"
    path = os.path.join(tempfile.mkdtemp(), f"{tag}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(tag, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
