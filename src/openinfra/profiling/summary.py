"""What a trace says: compute/communication overlap, pipeline bubble and idle time, per rank.

Definitions (all times are lengths of unions of intervals, so nested or repeated events never
count twice):

- window: from the first to the last counted event over all ranks (the step as a whole);
- compute / comm: time a rank spends in at least one compute / communication interval;
- overlap: communication time during which compute runs *on another lane* (thread or stream);
  ``overlap_fraction = overlap / comm`` (the share of communication hidden under compute; 1.0 =
  fully overlapped); exposed comm = comm - overlap. Compute on the communication's own lane does
  not hide it: there a communication interval inside a compute interval (a blocking collective
  called from inside an F phase, say) is that phase waiting for it;
- idle: window - time in any counted interval;
- bubble: per rank, ``1 - pipeline_busy / pipeline_window`` where pipeline_busy is the time in
  DualPipe's F/B/W phases and pipeline_window spans every rank's first to last F/B/W; when a trace
  has no F/B/W phases, compute stands in for them. The trace's bubble is the mean over ranks.

Which intervals count (``source``): ``device`` uses the GPU timeline (kernels: NCCL = comm, the rest
compute; GPU-side phase annotations for F/B/W); ``host`` uses our phase annotations plus
communication operators on the CPU timeline; ``auto`` takes device where a rank has GPU events.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

from openinfra.profiling.annotate import PIPELINE_PHASES
from openinfra.profiling.trace import Interval, Trace, load_trace

__all__ = ["RankSummary", "TraceSummary", "summarize", "union_length", "intersection_length", "format_summary"]

Source = Literal["auto", "host", "device"]


def _merged(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def union_length(spans: Iterable[tuple[float, float]]) -> float:
    """Total length covered by at least one ``(start, end)`` span."""
    return sum(b - a for a, b in _merged(spans))


def _intersection(xs: Iterable[tuple[float, float]], ys: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The spans covered by both span sets (each first merged into a union)."""
    a, b = _merged(xs), _merged(ys)
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def intersection_length(xs: Iterable[tuple[float, float]], ys: Iterable[tuple[float, float]]) -> float:
    """Length covered by both span sets (each first merged into a union)."""
    return sum(b - a for a, b in _intersection(xs, ys))


def _hidden_comm(ivs: list[Interval]) -> float:
    """Length of communication time covered by compute on another lane (see the module docstring)."""
    lanes = {iv.lane for iv in ivs if iv.kind == "comm"}
    pieces: list[tuple[float, float]] = []
    for lane in lanes:
        comm = [(iv.start_us, iv.end_us) for iv in ivs if iv.kind == "comm" and iv.lane == lane]
        other = [(iv.start_us, iv.end_us) for iv in ivs if iv.kind == "compute" and iv.lane != lane]
        pieces += _intersection(comm, other)
    return union_length(pieces)


@dataclass
class RankSummary:
    """One rank's figures; times in microseconds."""

    rank: int
    source: str
    compute_us: float
    comm_us: float
    overlap_us: float
    busy_us: float
    idle_us: float
    bubble: float
    pipeline_busy_us: float
    #: Time in each of our phases on this rank (union of its intervals, µs): dispatch, combine, F, ...
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def overlap_fraction(self) -> float | None:
        return self.overlap_us / self.comm_us if self.comm_us > 0 else None

    @property
    def exposed_comm_us(self) -> float:
        return self.comm_us - self.overlap_us


@dataclass
class TraceSummary:
    """The whole trace: per-rank rows, the window, the mean bubble and overall overlap, phase totals."""

    ranks: list[RankSummary]
    window_us: float
    pipeline_window_us: float
    bubble_basis: str  # "F/B/W" or "compute"
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        return sum(r.bubble for r in self.ranks) / len(self.ranks) if self.ranks else 0.0

    @property
    def overlap_fraction(self) -> float | None:
        comm = sum(r.comm_us for r in self.ranks)
        return sum(r.overlap_us for r in self.ranks) / comm if comm > 0 else None

    def to_dict(self) -> dict:
        return {
            "window_us": self.window_us, "pipeline_window_us": self.pipeline_window_us,
            "bubble": self.bubble, "bubble_basis": self.bubble_basis, "overlap_fraction": self.overlap_fraction,
            "ranks": [{**asdict(r), "overlap_fraction": r.overlap_fraction, "exposed_comm_us": r.exposed_comm_us}
                      for r in self.ranks],
            "phases": self.phases, "files": self.files,
        }


def _chosen(ivs: list[Interval], source: Source) -> tuple[list[Interval], str]:
    if source not in ("auto", "host", "device"):
        raise ValueError(f"source must be 'auto', 'host' or 'device', got {source!r}")
    has_device = any(iv.device for iv in ivs)
    use_device = source == "device" or (source == "auto" and has_device)
    return [iv for iv in ivs if iv.device == use_device], "device" if use_device else "host"


def summarize(trace: Trace | str | os.PathLike | list, source: Source = "auto", step: int | None = None) -> TraceSummary:
    """Compute the :class:`TraceSummary` of a trace (or of the trace files / directory given).

    ``step``: only the span of torch.profiler's ``ProfilerStep#<step>`` (earliest start to latest end
    over the ranks), events clipped to it; None = the whole trace.
    """
    if not isinstance(trace, Trace):
        trace = load_trace(trace)
    if step is not None:
        trace = trace.clipped(*trace.step_window(step))
    chosen = {r: _chosen(trace.intervals[r], source) for r in trace.ranks}
    counted = [iv for ivs, _ in chosen.values() for iv in ivs if iv.kind != "other"]
    if not counted:
        raise ValueError("the trace has no compute or communication events to summarize "
                         "(no openinfra phase annotations, GPU kernels or communication ops)")
    t0, t1 = min(iv.start_us for iv in counted), max(iv.end_us for iv in counted)
    window = t1 - t0
    pipe = [iv for ivs, _ in chosen.values() for iv in ivs if iv.phase in PIPELINE_PHASES]
    basis = "F/B/W" if pipe else "compute"
    if not pipe:
        pipe = [iv for iv in counted if iv.kind == "compute"]
    p0 = min((iv.start_us for iv in pipe), default=t0)
    p1 = max((iv.end_us for iv in pipe), default=t1)
    rows = []
    for r in trace.ranks:
        ivs, used = chosen[r]
        comp = [(iv.start_us, iv.end_us) for iv in ivs if iv.kind == "compute"]
        comm = [(iv.start_us, iv.end_us) for iv in ivs if iv.kind == "comm"]
        busy = union_length(comp + comm)
        mine = [(iv.start_us, iv.end_us) for iv in pipe if iv.rank == r]
        pipe_busy = union_length(mine)
        bubble = 1.0 - pipe_busy / (p1 - p0) if p1 > p0 else 0.0
        by_phase: dict[str, list[tuple[float, float]]] = {}
        for iv in ivs:
            if iv.phase is not None:
                by_phase.setdefault(iv.phase, []).append((iv.start_us, iv.end_us))
        rows.append(RankSummary(r, used, union_length(comp), union_length(comm), _hidden_comm(ivs), busy,
                                window - busy, bubble, pipe_busy,
                                {k: union_length(v) for k, v in sorted(by_phase.items())}))
    phases: dict[str, dict[str, float]] = {}
    for ivs, _ in chosen.values():
        for iv in ivs:
            key = iv.phase or iv.name
            row = phases.setdefault(key, {"kind": iv.kind, "count": 0, "total_us": 0.0})
            row["count"] += 1
            row["total_us"] += iv.dur_us
    return TraceSummary(rows, window, p1 - p0, basis, dict(sorted(phases.items(), key=lambda kv: -kv[1]["total_us"])),
                        list(trace.files))


def _ms(us: float) -> str:
    return f"{us / 1e3:.3f}"


def format_summary(s: TraceSummary, max_phases: int = 12) -> str:
    """A plain-text report: headline figures, a per-rank table and the largest phases."""
    ov = s.overlap_fraction
    lines = [
        f"trace window {_ms(s.window_us)} ms over {len(s.ranks)} rank(s)",
        f"pipeline bubble {s.bubble:.1%} (mean over ranks, basis {s.bubble_basis}, window {_ms(s.pipeline_window_us)} ms)",
        f"compute/communication overlap {'n/a (no communication)' if ov is None else f'{ov:.1%} of communication hidden'}",
        "",
        f"{'rank':>4} {'source':>6} {'compute ms':>11} {'comm ms':>9} {'overlap ms':>10} {'exposed ms':>10} "
        f"{'idle ms':>9} {'idle %':>7} {'bubble':>7}",
    ]
    for r in s.ranks:
        idle_pct = r.idle_us / s.window_us if s.window_us else 0.0
        lines.append(f"{r.rank:>4} {r.source:>6} {_ms(r.compute_us):>11} {_ms(r.comm_us):>9} {_ms(r.overlap_us):>10} "
                     f"{_ms(r.exposed_comm_us):>10} {_ms(r.idle_us):>9} {idle_pct:>7.1%} {r.bubble:>7.1%}")
    if s.phases:
        lines += ["", f"{'phase / event':<32} {'kind':>7} {'count':>6} {'total ms':>10}"]
        for name, row in list(s.phases.items())[:max_phases]:
            lines.append(f"{name[:32]:<32} {row['kind']:>7} {int(row['count']):>6} {_ms(row['total_us']):>10}")
    return "\n".join(lines)
