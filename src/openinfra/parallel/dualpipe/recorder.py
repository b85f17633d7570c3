"""Schedule recording: every F, B, W, F&B, send and recv a pipeline rank executes, with timestamps.

A ``ScheduleRecorder`` passed to ``DualPipe``/``DualPipeV`` (``recorder=``) collects one
``ScheduleEvent`` per compute step and per p2p operation. Times are microseconds since the
step's start, which every rank takes right after a barrier, so ranks line up to within the
barrier's skew. On a GPU the recorder synchronizes the device around each event so the times
are device times (this serializes the host; record for pictures and bubble numbers, not for
peak throughput). ``gather`` brings all ranks' events to every rank; ``to_json`` and
``to_chrome_trace`` write them out (the latter opens in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["ScheduleEvent", "ScheduleRecorder", "COMPUTE_KINDS", "COMM_KINDS", "chrome_trace"]

COMPUTE_KINDS = ("F", "B", "W", "F&B")
COMM_KINDS = ("send", "recv")


@dataclass
class ScheduleEvent:
    """One executed schedule step on one rank.

    ``kind``: "F", "B", "W", "F&B" (a forward and a backward chunk run as one overlapped step),
    "send" or "recv". ``module``: 0 (the stage of the forward direction / first arm of the V) or 1;
    for "F&B" it is the forward chunk's module and ``module_b``/``chunk_b`` name the backward one.
    ``start_us``/``end_us``: microseconds since the step began. ``peer``: the other rank (p2p).
    ``phase``: which of the eight schedule phases issued it (1..8), 0 when unknown.
    ``zb``: a "B" whose weight gradient was deferred to a later "W" (input gradient only).
    """

    rank: int
    kind: str
    start_us: float
    end_us: float
    module: int | None = None
    chunk: int | None = None
    module_b: int | None = None
    chunk_b: int | None = None
    peer: int | None = None
    nbytes: int = 0
    phase: int = 0
    zb: bool = False


    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


@dataclass
class ScheduleRecorder:
    """Collects ``ScheduleEvent``s for the steps of one pipeline on one rank.

    ``enabled=False`` turns recording off without unplugging the recorder. Each ``step()`` of the
    pipeline clears the previous step's events unless ``keep_steps=True``.
    """

    enabled: bool = True
    keep_steps: bool = False
    events: list[ScheduleEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    _t0: int = 0
    _sync: bool = False
    rank: int = 0
    phase: int = 0

    # --- used by the schedules ------------------------------------------------------------------

    def begin(self, rank: int, group, device: torch.device, meta: dict[str, Any]) -> None:
        """Start a step: align ranks with a barrier and reset the clock."""
        if not self.keep_steps:
            self.events = []
        self.rank = rank
        self.meta = dict(meta)
        self._sync = device.type == "cuda"
        if self._sync:
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        self._t0 = time.perf_counter_ns()

    def now_us(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return (time.perf_counter_ns() - self._t0) / 1e3

    @contextmanager
    def span(self, kind: str, **fields: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = self.now_us()
        yield
        self.events.append(ScheduleEvent(self.rank, kind, start, self.now_us(), phase=self.phase, **fields))

    def add(self, kind: str, start_us: float, end_us: float, **fields: Any) -> None:
        if self.enabled:
            self.events.append(ScheduleEvent(self.rank, kind, start_us, end_us, phase=self.phase, **fields))

    # --- results -------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of events per kind on this rank."""
        out: dict[str, int] = {}
        for e in self.events:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def gather(self, group=None) -> list[ScheduleEvent]:
        """All ranks' events (collective: every rank of ``group`` must call it)."""
        group = group or dist.group.WORLD
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, [asdict(e) for e in self.events], group=group)
        return [ScheduleEvent(**d) for part in parts for d in part]

    def trace(self, events: list[ScheduleEvent] | None = None) -> dict[str, Any]:
        """The JSON-able trace: ``{"meta": {...}, "events": [...]}``."""
        events = self.events if events is None else events
        return {"meta": self.meta, "events": [asdict(e) for e in events]}

    def to_json(self, path: str | Path, events: list[ScheduleEvent] | None = None) -> Path:
        """Write the trace (our own format, read by ``timeline.load_trace``)."""
        path = Path(path)
        path.write_text(json.dumps(self.trace(events), indent=1))
        return path

    def to_chrome_trace(self, path: str | Path, events: list[ScheduleEvent] | None = None) -> Path:
        """Write a Chrome trace (one process per rank, compute and comm on separate rows)."""
        path = Path(path)
        path.write_text(json.dumps(chrome_trace(self.trace(events))))
        return path


def _row(kind: str) -> int:
    if kind in COMPUTE_KINDS:
        return 0
    if kind in COMM_KINDS:
        return 1
    return 3 if kind.startswith("a2a:") else 2


def chrome_trace(trace: dict[str, Any]) -> dict[str, Any]:
    """Convert our trace dict to the Chrome trace-event format (``ph: "X"`` complete events)."""
    out = []
    ranks = sorted({e["rank"] for e in trace["events"]})
    for r in ranks:
        out.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"pp rank {r}"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "compute"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "p2p"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 2, "args": {"name": "stage segments"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 3, "args": {"name": "all-to-all in flight"}})
    for e in trace["events"]:
        name = e["kind"] if e["chunk"] is None else f"{e['kind']}{e['module']}.{e['chunk']}"
        if e["kind"] == "F&B":
            name = f"F{e['module']}.{e['chunk']}&B{e['module_b']}.{e['chunk_b']}"
        out.append({
            "ph": "X", "name": name, "cat": e["kind"], "pid": e["rank"], "tid": _row(e["kind"]),
            "ts": e["start_us"], "dur": max(e["end_us"] - e["start_us"], 0.0),
            "args": {k: e[k] for k in ("module", "chunk", "module_b", "chunk_b", "peer", "nbytes", "phase", "zb") if e.get(k) is not None},
        })
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": trace.get("meta", {})}
