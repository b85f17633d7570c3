"""Shared test configuration: tiers (markers), hardware skips, and shared fixtures.

Tiers (pyproject.toml declares the markers): unit, interpreter, distributed, service run in CI;
gpu needs a Hopper GPU; multigpu needs 2+ GPUs. On a machine without CUDA, Triton's interpreter is
switched on here, before any kernel module is imported, so the interpreter tier runs the real
kernels on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker is its own process: one intra-op thread each keeps N workers on
# N cores from oversubscribing them (two threads per worker on 2 cores made CPU tests ~10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from openinfra.testing.distributed import run_on_ranks  # noqa: E402


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _hopper() -> bool:
    return _gpu_count() > 0 and torch.cuda.get_device_capability(0)[0] >= 9


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a Hopper GPU (compute capability >= 9.0); none visible here")
    no_multi = pytest.mark.skip(reason=f"needs 2+ GPUs for NCCL; {_gpu_count()} visible here")
    no_interp = pytest.mark.skip(reason="interpreter tier runs only on CPU machines (TRITON_INTERPRET=1); this machine has a GPU")
    for item in items:
        if "gpu" in item.keywords and not _hopper():
            item.add_marker(no_gpu)
        if "multigpu" in item.keywords and _gpu_count() < 2:
            item.add_marker(no_multi)
        if "interpreter" in item.keywords and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            item.add_marker(no_interp)


@pytest.fixture
def distributed():
    """``distributed(fn, world_size, *args, timeout=...)`` runs ``fn(rank, world_size, *args)``
    on real gloo ranks (spawned processes on 127.0.0.1) and returns the values by rank.
    ``fn`` must be a module-level function of the test module."""
    return run_on_ranks


@pytest.fixture
def data_root(tmp_path):
    """A fresh temporary data directory for services and jobs."""
    root = tmp_path / "data"
    root.mkdir()
    return root
