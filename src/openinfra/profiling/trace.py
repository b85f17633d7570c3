"""Chrome traces: record them with torch.profiler, read them back as classified intervals per rank.

Reading accepts torch.profiler's JSON (optionally gzipped), a directory of them (one per rank), or
hand-built Chrome traces (``ph`` ``X`` complete events, or ``B``/``E`` pairs; ``ts``/``dur`` in
microseconds). A file's rank comes from, in order: its ``distributedInfo.rank`` (torch.profiler writes
it when torch.distributed is initialized), process-name metadata ``rank N`` (one pid per rank, the
layout :func:`merge_traces` writes), a top-level ``openinfra_rank``, a ``rank<N>`` in the file name,
and last the file's position in the list.

Each interval is classified ``compute``, ``comm`` or ``other`` (see :func:`classify`).

A malformed trace (an event that is not an object, an ``X`` event without a numeric ``ts`` and
``dur``, a negative duration, an unpaired ``B``/``E``, a non-integer rank) raises ``ValueError``
naming the file and the event's index. PyTorch is imported only by the recording functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:  # torch is imported lazily, by the recording functions only
    import torch

from openinfra.profiling.annotate import COMM_PHASES, COMPUTE_PHASES, parse_phase

__all__ = ["Interval", "Trace", "load_trace", "classify", "record_trace", "export_chrome_trace", "merge_traces",
           "write_chrome_trace"]

Kind = Literal["compute", "comm", "other"]

# Communication as torch.profiler names it: c10d collectives and p2p, NCCL kernels, gloo ops.
_COMM_RE = re.compile(r"(nccl|gloo|c10d|record_param_comms|all_to_all|alltoall|all_reduce|allreduce|all_gather|"
                      r"allgather|reduce_scatter|broadcast|isend|irecv|send|recv)", re.IGNORECASE)
_DEVICE_CATS = frozenset({"kernel", "gpu_user_annotation", "gpu_memcpy", "gpu_memset"})
_STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
_RANK_NAME_RE = re.compile(r"rank[ _-]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Interval:
    """One event: ``[start_us, end_us)`` on ``rank``, its name, phase (ours or None), kind, source."""

    rank: int
    name: str
    start_us: float
    end_us: float
    kind: Kind
    phase: str | None
    source: Literal["annotation", "kernel", "op"]
    lane: str = ""
    device: bool = False  # on the GPU timeline (kernels, GPU-side annotations) rather than the host's

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us


@dataclass
class Trace:
    """Intervals by rank, plus where they came from."""

    intervals: dict[int, list[Interval]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    #: torch.profiler's step ranges (``ProfilerStep#N``, host side) per rank: {rank: {N: (start_us, end_us)}}
    steps: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)

    def step_window(self, step: int) -> tuple[float, float]:
        """From the earliest start to the latest end of ``ProfilerStep#step`` over the ranks that have it."""
        spans = [st[step] for st in self.steps.values() if step in st]
        if not spans:
            have = sorted({n for st in self.steps.values() for n in st})
            raise ValueError(f"the trace has no ProfilerStep#{step}; steps present: {have or 'none'}")
        return min(a for a, _ in spans), max(b for _, b in spans)

    def clipped(self, start_us: float, end_us: float) -> "Trace":
        """A copy holding only the parts of intervals inside ``[start_us, end_us)``."""
        out = Trace(files=list(self.files), steps=self.steps)
        for r, ivs in self.intervals.items():
            kept = [dataclasses.replace(iv, start_us=max(iv.start_us, start_us), end_us=min(iv.end_us, end_us))
                    for iv in ivs if iv.end_us > start_us and iv.start_us < end_us]
            if kept:
                out.intervals[r] = kept
        return out

    @property
    def ranks(self) -> list[int]:
        return sorted(self.intervals)

    def all(self) -> list[Interval]:
        return [iv for r in self.ranks for iv in self.intervals[r]]


def classify(name: str, cat: str) -> tuple[Kind, str | None, Literal["annotation", "kernel", "op"]] | None:
    """(kind, phase, source) of a trace event, or None when the event is not one we count.

    - ``openinfra:<phase>`` annotations: compute / comm by :data:`COMPUTE_PHASES` / :data:`COMM_PHASES`;
    - GPU kernels (category ``kernel``): NCCL kernels are comm, every other kernel compute;
    - CPU operators (``cpu_op``): communication ops (c10d, gloo, nccl, all_to_all, send/recv, ...)
      are comm; other CPU ops are not counted (they nest inside the annotated phases);
    - hand-built events without a category count by their phase name when it is a known phase.
    """
    ph = parse_phase(name)
    if ph is None and cat in ("", "phase") and (name in COMPUTE_PHASES or name in COMM_PHASES):
        ph = name  # a hand-built trace may use bare phase names
    if ph is not None:
        kind: Kind = "compute" if ph in COMPUTE_PHASES else "comm" if ph in COMM_PHASES else "other"
        return kind, ph, "annotation"
    if cat == "kernel":
        return ("comm" if "nccl" in name.lower() else "compute"), None, "kernel"
    if cat in ("cpu_op", "") and _COMM_RE.search(name):
        return "comm", None, "op"
    return None


def _open_json(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable Chrome trace ({exc})") from None
    if isinstance(data, list):  # the JSON Array Format of the Chrome trace spec
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return data


def _pid_ranks(events: list[dict]) -> dict[object, int]:
    out = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            args = e.get("args")
            m = _RANK_NAME_RE.search(str(args.get("name", ""))) if isinstance(args, dict) else None
            if m:
                out[e.get("pid")] = int(m.group(1))
    return out


def _number(path: Path, where: str, value: object, what: str) -> float:
    """``value`` as a finite float, or ValueError naming the file, the event and the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{path}: not a valid trace: {where}: {what} must be a number, got {value!r}")
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"{path}: not a valid trace: {where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{path}: not a valid trace: {where}: {what} must be finite, got {value!r}")
    return out


def _rank_field(path: Path, value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: not a valid trace: {what} must be a rank (an integer >= 0), got {value!r}")
    return value


def _check_events(events: list, path: Path) -> None:
    """Every event an object, with scalar ``pid``/``tid`` (they key dictionaries)."""
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: not a valid trace: event {i}: expected an object, got {type(e).__name__} {e!r:.80}")
        for key in ("pid", "tid", "ph", "name", "cat"):
            if isinstance(e.get(key), (dict, list)):
                raise ValueError(f"{path}: not a valid trace: event {i}: {key} must be a string or a number, got {e[key]!r:.80}")


def _events_to_intervals(data: dict, default_rank: int, path: Path,
                         steps: dict[int, dict[int, tuple[float, float]]] | None = None) -> dict[int, list[Interval]]:
    events = data["traceEvents"]
    _check_events(events, path)
    # aligns files of different processes
    base_us = _number(path, "trace", data.get("baseTimeNanoseconds", 0), "baseTimeNanoseconds") / 1e3
    file_rank = None
    if isinstance(data.get("distributedInfo"), dict) and "rank" in data["distributedInfo"]:
        file_rank = _rank_field(path, data["distributedInfo"]["rank"], "distributedInfo.rank")
    elif "openinfra_rank" in data:
        file_rank = _rank_field(path, data["openinfra_rank"], "openinfra_rank")
    pid_rank = {} if file_rank is not None else _pid_ranks(events)
    if file_rank is None and not pid_rank:
        m = _RANK_NAME_RE.search(path.name)
        file_rank = int(m.group(1)) if m else default_rank
    out: dict[int, list[Interval]] = {}
    open_b: dict[tuple, list[tuple[int, dict, float]]] = {}

    def add(e: dict, start: float, dur: float) -> None:
        rank = file_rank if file_rank is not None else pid_rank.get(e.get("pid"))
        if rank is None:
            return  # a process that is not a rank (torch's "Spans" / "Traces" rows)
        sm = _STEP_RE.match(str(e.get("name", "")))
        if sm is not None and steps is not None and str(e.get("cat", "")) not in _DEVICE_CATS:
            steps.setdefault(rank, {})[int(sm.group(1))] = (base_us + start, base_us + start + dur)
            return
        hit = classify(str(e.get("name", "")), str(e.get("cat", "")))
        if hit is None:
            return
        kind, ph, source = hit
        lane = f"{e.get('pid')}:{e.get('tid')}"
        device = str(e.get("cat", "")) in _DEVICE_CATS
        out.setdefault(rank, []).append(
            Interval(rank, str(e.get("name", "")), base_us + start, base_us + start + dur, kind, ph, source, lane, device))

    def field_(i: int, e: dict, key: str) -> float:
        where = f"event {i} ({e.get('ph')!r} {str(e.get('name', ''))[:60]!r})"
        if key not in e:
            raise ValueError(f"{path}: not a valid trace: {where}: no {key!r} field")
        return _number(path, where, e[key], repr(key))

    for i, e in enumerate(events):
        kind = e.get("ph")
        if kind == "X":
            ts, dur = field_(i, e, "ts"), field_(i, e, "dur")
            if dur < 0:
                raise ValueError(f"{path}: not a valid trace: event {i} ({str(e.get('name', ''))[:60]!r}): negative duration {e['dur']!r}")
            add(e, ts, dur)
        elif kind == "B":
            open_b.setdefault((e.get("pid"), e.get("tid")), []).append((i, e, field_(i, e, "ts")))
        elif kind == "E":
            end = field_(i, e, "ts")
            stack = open_b.get((e.get("pid"), e.get("tid")))
            if not stack:
                raise ValueError(f"{path}: not a valid trace: event {i}: 'E' event at ts={e.get('ts')} without a matching 'B'")
            j, b, start = stack.pop()
            if end < start:
                raise ValueError(f"{path}: not a valid trace: event {i}: 'E' at ts={e['ts']!r} ends before its 'B' (event {j}, "
                                 f"ts={b['ts']!r}): negative duration")
            add(b, start, end - start)
    unclosed = sorted(j for stack in open_b.values() for j, _, _ in stack)
    if unclosed:
        j = unclosed[0]
        raise ValueError(f"{path}: not a valid trace: event {j}: 'B' event {str(events[j].get('name', ''))[:60]!r} without a matching 'E'"
                         + (f" (and {len(unclosed) - 1} more)" if len(unclosed) > 1 else ""))
    return out


def load_trace(paths: str | os.PathLike | list[str | os.PathLike]) -> Trace:
    """Read one trace, several (one per rank), or every ``*.json`` / ``*.json.gz`` in a directory."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no trace files given")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted([*p.glob("*.json"), *p.glob("*.json.gz")])
            if not found:
                raise FileNotFoundError(f"no *.json traces in directory {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"trace {p} does not exist")
    trace = Trace(files=[str(f) for f in files])
    owner: dict[int, Path] = {}
    for i, f in enumerate(files):
        for rank, ivs in _events_to_intervals(_open_json(f), i, f, trace.steps).items():
            if owner.setdefault(rank, f) != f:
                raise ValueError(f"rank {rank} appears in two trace files: {owner[rank]} and {f}")
            trace.intervals.setdefault(rank, []).extend(ivs)
    for ivs in trace.intervals.values():
        ivs.sort(key=lambda iv: (iv.start_us, -iv.end_us))
    return trace


# --- recording -------------------------------------------------------------------------------------

def export_chrome_trace(prof: torch.profiler.profile, path: str | os.PathLike, rank: int | None = None) -> Path:
    """Write ``prof``'s Chrome trace to ``path`` (tagging the rank when torch.distributed is not up)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    if rank is not None:
        data = _open_json(path)
        data.setdefault("openinfra_rank", rank)
        path.write_text(json.dumps(data))
    return path


@contextlib.contextmanager
def record_trace(path: str | os.PathLike, rank: int | None = None, record_shapes: bool = False,
                 with_stack: bool = False) -> Iterator[torch.profiler.profile]:
    """Profile the enclosed code (CPU, plus CUDA when present) and write a Chrome trace to ``path``.

    ``rank`` defaults to torch.distributed's rank when it is initialized.
    """
    import torch.distributed
    import torch.profiler

    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes, with_stack=with_stack) as prof:
        yield prof
    export_chrome_trace(prof, path, rank)


def write_chrome_trace(events: list[dict], path: str | os.PathLike, ranks: dict[int, int] | None = None) -> Path:
    """Write a minimal Chrome trace of ``events`` (dicts with name, ts, dur, pid, tid[, cat]);
    ``ranks`` maps pid -> rank and becomes ``process_name`` metadata ("rank N")."""
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {r}"}}
            for pid, r in (ranks or {}).items()]
    body = [{"ph": "X", "cat": e.get("cat", "phase"), **e} for e in events]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": meta + body, "displayTimeUnit": "ms"}))
    return path


def merge_traces(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One Chrome trace holding every rank (pid = rank, named ``rank N``) of the classified events
    from per-rank traces, times aligned; open it in Perfetto to see all ranks at once."""
    trace = load_trace(paths)
    t0 = min((iv.start_us for iv in trace.all()), default=0.0)
    cats = {"annotation": "user_annotation", "kernel": "kernel", "op": "cpu_op"}
    events = [{"name": iv.name, "cat": "gpu_user_annotation" if iv.device and iv.source == "annotation" else cats[iv.source],
               "ts": iv.start_us - t0, "dur": iv.dur_us, "pid": iv.rank,
               "tid": iv.lane or iv.kind} for iv in trace.all()]
    return write_chrome_trace(events, out, {r: r for r in trace.ranks})
