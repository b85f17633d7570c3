"""The benchmark harness: routine registry, timing helpers, table / JSON output, result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import pkgutil
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "BenchResult", "Routine", "routine", "routines", "gpu_time_ms", "cpu_time_s", "copy_bandwidth_gbps",
    "hardware_name", "save_result", "format_table", "RESULTS_DIR",
]

RESULTS_DIR = Path(os.environ.get("OPENINFRA_RESULTS_DIR", "benchmarks/results"))


@dataclass
class BenchResult:
    """What a routine returns: table rows (dicts with the same keys) and a summary for the JSON line."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Routine:
    name: str
    help: str
    fn: Callable[[argparse.Namespace], BenchResult]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    needs_gpu: bool


_ROUTINES: dict[str, Routine] = {}


def routine(name: str, help: str, add_arguments=None, needs_gpu: bool = False):
    """Decorator registering ``fn(args) -> BenchResult`` as ``openinfra bench <name>``."""

    def deco(fn):
        if name in _ROUTINES:
            raise ValueError(f"benchmark routine {name!r} registered twice")
        _ROUTINES[name] = Routine(name, help, fn, add_arguments, needs_gpu)
        return fn

    return deco


def routines() -> dict[str, Routine]:
    """All routines, after importing every module of ``openinfra.bench.routines``."""
    import openinfra.bench.routines as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(sorted(_ROUTINES.items()))


# --- timing ------------------------------------------------------------------------------------

def gpu_time_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of ``fn`` in ms: warm-up, CUDA events, L2 flushed between runs.

    Uses ``triton.testing.do_bench`` (which zeroes a 256 MB buffer between runs, more than the
    H200's 50 MB L2) when Triton is present, else an equivalent loop of our own.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(max(10, int(rep_ms))):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > rep_ms * 4:
            break
    return statistics.median(times)


def cpu_time_s(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, max_seconds: float = 60.0) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` runs (bounded by ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget_end = time.monotonic() + max_seconds
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.monotonic() > budget_end:
            break
    return statistics.median(times)


def copy_bandwidth_gbps(device: str | torch.device = "cuda", nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), the memory ceiling.

    A 2 GiB buffer is 40x the H200's L2, so this is HBM bandwidth, measured with random data.
    """
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --- hardware, output, files -------------------------------------------------------------------

def hardware_name() -> str:
    """A short slug for file names: the GPU's name, or ``cpu<cores>``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
    return f"cpu{os.cpu_count()}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def save_result(name: str, result: BenchResult, command: str, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>_<hardware>_<date>.json`` with the command and environment."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = results_dir / f"{name}_{hardware_name()}_{date}.json"
    payload = {
        "benchmark": name,
        "command": command,
        "hardware": hardware_name(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": date,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "summary": result.summary,
        "rows": result.rows,
    }
    try:
        import triton

        payload["triton"] = triton.__version__
    except ImportError:
        pass
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
