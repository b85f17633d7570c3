"""Profiling summaries against hand-built traces with known overlap, bubble and idle time."""

import gzip
import json
import random

import pytest

from openinfra.profiling import (format_summary, intersection_length, load_trace, merge_traces, summarize, union_length,
                                 write_chrome_trace)

pytestmark = pytest.mark.unit


def _ev(name, ts, dur, pid, tid=1):
    return {"name": f"openinfra:{name}", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "cat": "user_annotation"}


def _pipeline_trace(path):
    """rank 0: F[0,100) B[150,250) W[300,350) dispatch[80,120); rank 1: F[100,200) B[200,300) recv[90,110)."""
    events = [
        _ev("F", 0, 100, 10), _ev("attn", 10, 30, 10), _ev("B", 150, 100, 10), _ev("W", 300, 50, 10),
        _ev("dispatch", 80, 40, 10, tid=2),
        _ev("F:mb0", 100, 100, 20), _ev("B", 200, 100, 20), _ev("recv", 90, 20, 20, tid=2),
        {"name": "aten::mm", "ts": 5, "dur": 1, "pid": 10, "tid": 1, "cat": "cpu_op"},  # not counted
    ]
    return write_chrome_trace(events, path, ranks={10: 0, 20: 1})


def test_known_overlap_bubble_and_idle(tmp_path):
    s = summarize(_pipeline_trace(tmp_path / "t.json"))
    assert s.window_us == 350 and s.pipeline_window_us == 350 and s.bubble_basis == "F/B/W"
    r0, r1 = s.ranks
    assert (r0.rank, r1.rank) == (0, 1)
    assert (r0.compute_us, r0.comm_us, r0.overlap_us, r0.busy_us, r0.idle_us) == (250, 40, 20, 270, 80)
    assert (r1.compute_us, r1.comm_us, r1.overlap_us, r1.busy_us, r1.idle_us) == (200, 20, 10, 210, 140)
    assert r0.overlap_fraction == 0.5 and r1.overlap_fraction == 0.5 and s.overlap_fraction == 0.5
    assert r0.bubble == pytest.approx(1 - 250 / 350) and r1.bubble == pytest.approx(1 - 200 / 350)
    assert s.bubble == pytest.approx((100 / 350 + 150 / 350) / 2)
    assert s.phases["F"]["count"] == 2 and s.phases["F"]["total_us"] == 200  # the ":mb0" tag folds into F
    assert r0.phases == {"B": 100, "F": 100, "W": 50, "attn": 30, "dispatch": 40}
    assert s.to_dict()["ranks"][1]["phases"] == {"B": 100, "F": 100, "recv": 20}
    assert "aten::mm" not in s.phases
    text = format_summary(s)
    assert "bubble 35.7%" in text and "50.0% of communication hidden" in text


def test_communication_inside_compute_on_its_own_lane_is_not_hidden(tmp_path):
    """A blocking collective inside a compute phase of the same thread is the phase waiting for it:
    exposed. The same collective on another thread under that phase is hidden."""
    same = write_chrome_trace([_ev("F", 0, 100, 1), _ev("dispatch", 20, 30, 1), _ev("combine", 60, 10, 1)],
                              tmp_path / "same.json", ranks={1: 0})
    r = summarize(same).ranks[0]
    assert (r.compute_us, r.comm_us, r.overlap_us, r.exposed_comm_us) == (100, 40, 0, 40)
    mixed = write_chrome_trace([_ev("F", 0, 100, 1), _ev("dispatch", 20, 30, 1), _ev("combine", 60, 10, 1, tid=2),
                                _ev("recv", 90, 20, 1, tid=2)], tmp_path / "mixed.json", ranks={1: 0})
    r = summarize(mixed).ranks[0]
    # combine [60, 70) and recv [90, 100) lie under F on another thread; dispatch is F's own wait
    assert (r.comm_us, r.overlap_us) == (60, 20) and r.overlap_fraction == pytest.approx(1 / 3)


def test_compute_basis_without_pipeline_phases_and_no_comm(tmp_path):
    p = write_chrome_trace([_ev("attn", 0, 10, 1), _ev("mlp", 20, 10, 1)], tmp_path / "c.json", ranks={1: 0})
    s = summarize(p)
    assert s.bubble_basis == "compute" and s.ranks[0].bubble == pytest.approx(1 - 20 / 30)
    assert s.overlap_fraction is None and "n/a" in format_summary(s)


def test_per_rank_files_begin_end_pairs_and_gzip(tmp_path):
    d = tmp_path / "traces"
    d.mkdir()
    # rank 0 as torch.profiler writes it when torch.distributed is up; times relative to baseTimeNanoseconds
    r0 = {"distributedInfo": {"rank": 0, "world_size": 2}, "baseTimeNanoseconds": 1_000_000_000,
          "traceEvents": [_ev("F", 0, 100, 7), {"name": "gloo:all_to_all", "cat": "cpu_op", "ph": "X", "ts": 50, "dur": 100, "pid": 7, "tid": 3}]}
    for e in r0["traceEvents"]:
        e.setdefault("ph", "X")
    (d / "a.json").write_text(json.dumps(r0))
    # rank 1 from its file name, B/E pairs, gzipped
    r1 = {"baseTimeNanoseconds": 1_000_000_000, "traceEvents": [
        {"name": "openinfra:F", "ph": "B", "ts": 100, "pid": 1, "tid": 1},
        {"name": "openinfra:send", "ph": "B", "ts": 150, "pid": 1, "tid": 2},
        {"name": "openinfra:send", "ph": "E", "ts": 250, "pid": 1, "tid": 2},
        {"name": "openinfra:F", "ph": "E", "ts": 200, "pid": 1, "tid": 1}]}
    with gzip.open(d / "trace_rank1.json.gz", "wt") as fh:
        json.dump(r1, fh)
    s = summarize(d)
    assert [r.rank for r in s.ranks] == [0, 1] and s.window_us == 250
    assert s.ranks[0].comm_us == 100 and s.ranks[0].overlap_us == 50   # gloo op counted as communication
    assert s.ranks[1].comm_us == 100 and s.ranks[1].overlap_us == 50
    merged = merge_traces([d], tmp_path / "merged.json")
    s2 = summarize(merged)
    assert s2.to_dict()["ranks"] == s.to_dict()["ranks"]


def test_device_source_counts_kernels(tmp_path):
    events = [
        {"name": "openinfra:attn", "ts": 0, "dur": 100, "pid": 1, "tid": 1, "cat": "user_annotation"},
        {"name": "sm90_xmma_gemm", "ts": 10, "dur": 50, "pid": 0, "tid": 7, "cat": "kernel"},
        {"name": "ncclDevKernel_SendRecv", "ts": 40, "dur": 40, "pid": 0, "tid": 20, "cat": "kernel"},
    ]
    p = write_chrome_trace(events, tmp_path / "g.json")
    data = json.loads(p.read_text())
    data["openinfra_rank"] = 3
    p.write_text(json.dumps(data))
    dev = summarize(p)
    assert dev.ranks[0].source == "device" and dev.ranks[0].rank == 3
    assert (dev.ranks[0].compute_us, dev.ranks[0].comm_us, dev.ranks[0].overlap_us) == (50, 40, 20)
    host = summarize(p, source="host")
    assert host.ranks[0].compute_us == 100 and host.ranks[0].comm_us == 0


def test_union_and_intersection_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        xs = [(a, a + rng.randint(0, 20)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 8)))]
        ys = [(a, a + rng.randint(0, 20)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 8)))]
        cover_x = {t for a, b in xs for t in range(a, b)}
        cover_y = {t for a, b in ys for t in range(a, b)}
        assert union_length(xs) == len(cover_x)
        assert intersection_length(xs, ys) == len(cover_x & cover_y)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable Chrome trace"):
        load_trace(bad)
    (tmp_path / "empty.json").write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "aten::add", "ts": 0, "dur": 1, "pid": 1, "tid": 1, "cat": "cpu_op"}]}))
    with pytest.raises(ValueError, match="no compute or communication"):
        summarize(tmp_path / "empty.json")
    (tmp_path / "unpaired.json").write_text(json.dumps({"traceEvents": [{"ph": "E", "name": "x", "ts": 1, "pid": 1, "tid": 1}]}))
    with pytest.raises(ValueError, match="without a matching"):
        load_trace(tmp_path / "unpaired.json")
    with pytest.raises(ValueError, match="source"):
        summarize(_pipeline_trace(tmp_path / "t.json"), source="gpu")
    a = write_chrome_trace([_ev("F", 0, 1, 1)], tmp_path / "x" / "r0.json", ranks={1: 0})
    b = write_chrome_trace([_ev("F", 0, 1, 1)], tmp_path / "x" / "r0b.json", ranks={1: 0})
    with pytest.raises(ValueError, match="two trace files"):
        load_trace([a, b])


def test_step_selection(tmp_path, capsys):
    from openinfra.cli import main

    events = [
        {"name": "ProfilerStep#1", "ts": 0, "dur": 100, "pid": 1, "tid": 1, "cat": "cpu_op"},
        {"name": "ProfilerStep#2", "ts": 100, "dur": 100, "pid": 1, "tid": 1, "cat": "cpu_op"},
        _ev("F", 10, 40, 1), _ev("F", 90, 60, 1), _ev("dispatch", 120, 20, 1, tid=2),
    ]
    p = write_chrome_trace(events, tmp_path / "steps.json", ranks={1: 0})
    whole = summarize(p)
    assert whole.window_us == 140 and "ProfilerStep#1" not in whole.phases
    s2 = summarize(p, step=2)  # [100, 200): F clipped to 100..150, dispatch 120..140
    assert s2.window_us == 50 and s2.ranks[0].compute_us == 50 and s2.ranks[0].overlap_us == 20
    s1 = summarize(p, step=1)  # [0, 100): F 10..50 and 90..100
    assert s1.ranks[0].compute_us == 50 and s1.ranks[0].comm_us == 0
    with pytest.raises(ValueError, match=r"no ProfilerStep#7; steps present: \[1, 2\]"):
        summarize(p, step=7)
    assert main(["profile", "summary", str(p), "--step", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["window_us"] == 50
    assert main(["profile", "summary", str(p), "--step", "7"]) == 2
