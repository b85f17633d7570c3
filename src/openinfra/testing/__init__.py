"""Helpers shared by openinfra's tests and benchmarks (multi-process runs, free ports)."""

from openinfra.testing.distributed import free_port, run_on_ranks

__all__ = ["free_port", "run_on_ranks"]
