"""Recording real traces (one process, and gloo ranks), the CLI, and PNG timelines."""

import json

import pytest
import torch

from openinfra.cli import main
from openinfra.profiling import load_trace, phase, plot_timeline, record_trace, summarize


def _tiny_step():
    from openinfra.model import Transformer, get_config

    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    tokens = torch.randint(0, 512, (2, 16))
    return lambda: model.loss(tokens, tokens).backward()


@pytest.mark.unit
def test_record_and_summarize_a_model_step(tmp_path):
    step = _tiny_step()
    step()  # warm-up outside the trace
    with record_trace(tmp_path / "step.json", rank=0):
        with phase("F"):
            step()
    trace = load_trace(tmp_path / "step.json")
    phases = {iv.phase for iv in trace.intervals[0]}
    assert {"F", "attn", "mlp", "dispatch", "combine"} <= phases
    s = summarize(trace)
    r = s.ranks[0]
    assert r.source == "host" and r.compute_us > 0 and r.comm_us > 0
    # single process, no async communication: dispatch/combine run inside F on the same thread, so
    # F is waiting for them and none of it is hidden
    assert r.overlap_us == 0 and r.overlap_fraction == 0
    assert 0 <= r.idle_us < s.window_us and s.bubble_basis == "F/B/W"


@pytest.mark.unit
def test_cli_summary_timeline_merge(tmp_path, capsys):
    from openinfra.profiling import write_chrome_trace

    ev = lambda n, ts, dur, pid, tid=1: {"name": f"openinfra:{n}", "ts": ts, "dur": dur, "pid": pid, "tid": tid}
    p = write_chrome_trace([ev("F", 0, 100, 1), ev("dispatch", 50, 100, 1, 2), ev("B", 0, 50, 2), ev("W", 120, 30, 2)],
                           tmp_path / "t.json", ranks={1: 0, 2: 1})
    assert main(["profile", "summary", str(p)]) == 0
    out = capsys.readouterr().out
    assert "pipeline bubble" in out and "50.0% of communication hidden" in out
    assert main(["profile", "summary", str(p), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ranks"][0]["overlap_us"] == 50 and data["ranks"][1]["bubble"] == pytest.approx(1 - 80 / 150)
    png = tmp_path / "out" / "t.png"
    assert main(["profile", "timeline", str(p), "--png", str(png), "--title", "test"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    # merge: per-rank files (each its own pid) become one trace with pid = rank, named "rank N",
    # holding every input's events with times aligned to the earliest start and lanes kept apart
    r0 = write_chrome_trace([ev("F", 1000, 100, 7), ev("dispatch", 1050, 100, 7, 2)], tmp_path / "r0.json",
                            ranks={7: 0})
    r1 = write_chrome_trace([ev("B", 1200, 50, 9), ev("W", 1320, 30, 9, 2)], tmp_path / "r1.json", ranks={9: 1})
    merged = tmp_path / "m.json"
    assert main(["profile", "merge", str(r0), str(r1), "--out", str(merged)]) == 0
    capsys.readouterr()
    events = json.loads(merged.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1"}
    xs = [e for e in events if e.get("ph") == "X"]
    assert sorted((e["pid"], e["name"], e["ts"], e["dur"]) for e in xs) == [
        (0, "openinfra:F", 0, 100), (0, "openinfra:dispatch", 50, 100),
        (1, "openinfra:B", 200, 50), (1, "openinfra:W", 320, 30)]
    tid = {e["name"]: e["tid"] for e in xs}  # B and W: both compute, on two threads of rank 1
    assert tid["openinfra:B"] != tid["openinfra:W"], "two threads of rank 1 were folded into one lane"
    back = load_trace(merged)  # and it reads back as the same ranks and intervals
    assert {r: [(iv.phase, iv.start_us, iv.end_us) for iv in ivs] for r, ivs in back.intervals.items()} == {
        0: [("F", 0, 100), ("dispatch", 50, 150)], 1: [("B", 200, 250), ("W", 320, 350)]}
    assert main(["profile", "summary", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def _rank_fn(rank, world_size, out_dir):
    """Each rank: compute (F) while an async all_reduce is in flight, then a blocking all_to_all."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    x = torch.randn(128, 128)
    buf = torch.randn(1 << 16)
    with record_trace(f"{out_dir}/trace_{rank}.json"):
        with phase("comm"):
            work = dist.all_reduce(buf, async_op=True)
        with phase("F"):
            for _ in range(4):
                x = torch.tanh(x @ x.T / 128)
        with phase("comm"):
            work.wait()
        with phase("dispatch"):
            out = torch.empty(world_size * 4)
            dist.all_to_all_single(out, torch.arange(world_size * 4, dtype=torch.float32) + rank)
    return float(out.sum())


@pytest.mark.distributed
def test_traces_of_gloo_ranks(distributed, tmp_path):
    distributed(_rank_fn, 2, str(tmp_path), timeout=120)
    s = summarize(tmp_path)
    assert [r.rank for r in s.ranks] == [0, 1]  # ranks from torch.profiler's distributedInfo
    for r in s.ranks:
        assert r.comm_us > 0 and r.compute_us > 0
    trace = load_trace(tmp_path)
    names = {iv.name for iv in trace.all() if iv.source == "op"}
    assert any("all_reduce" in n or "allreduce" in n for n in names), names
    png = plot_timeline(tmp_path, tmp_path / "ranks.png")
    assert png.stat().st_size > 2000
