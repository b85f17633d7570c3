"""Bubble measurement, formula comparison, the PNG drawer and ``openinfra profile pipeline``."""

from __future__ import annotations

import argparse
import gzip
import json

import pytest

from openinfra.parallel.dualpipe import ScheduleRecorder
from openinfra.parallel.dualpipe.profile_cli import format_stats, register_profile
from openinfra.parallel.dualpipe.recorder import ScheduleEvent, chrome_trace
from openinfra.parallel.dualpipe.timeline import bubble_stats, draw_timeline, load_trace, pipeline_report

pytestmark = pytest.mark.unit


def _trace():
    """Two ranks; rank 0 busy 0-10 and 20-30 (F, B), rank 1 busy 5-25 (F&B) with a W; window 0-30."""
    ev = [
        ScheduleEvent(0, "F", 0, 10, module=0, chunk=0),
        ScheduleEvent(0, "send", 10, 11, module=0, chunk=0, peer=1, nbytes=64),
        ScheduleEvent(0, "B", 20, 30, module=1, chunk=0),
        ScheduleEvent(1, "recv", 10, 11, module=0, chunk=0, peer=0, nbytes=64),
        ScheduleEvent(1, "F&B", 5, 20, module=0, chunk=0, module_b=1, chunk_b=0),
        ScheduleEvent(1, "W", 20, 25),
        ScheduleEvent(1, "B", 25, 27, module=0, chunk=1, zb=True),
    ]
    rec = ScheduleRecorder(meta={"schedule": "DualPipeV", "num_ranks": 2, "num_chunks": 4})
    return rec, rec.trace(ev)


def test_bubble_stats_measures_idle_inside_the_window():
    _, trace = _trace()
    s = bubble_stats(trace)
    assert s["window_us"] == 30
    assert s["idle_us"] == [10, 8]
    assert s["measured_bubble"] == pytest.approx(9 / 30)
    assert s["mean_us"]["F"] == 10 and s["mean_us"]["W"] == 5 and s["mean_us"]["F&B"] == 15
    # formula for DualPipeV on 2 ranks: (PP-1) * (F&B + B - 3W) = 15 + 10 - 15 = 10 us,
    # over (10 + mean busy 21) us
    assert s["formula_bubble"] == pytest.approx(10 / 31)


def test_round_trip_json_and_chrome(tmp_path):
    rec, trace = _trace()
    p = rec.to_json(tmp_path / "t.json", [ScheduleEvent(**e) for e in trace["events"]])
    assert load_trace(p)["events"] == trace["events"]
    c = tmp_path / "t.chrome.json"
    c.write_text(json.dumps(chrome_trace(trace)))
    back = load_trace(c)
    gz = tmp_path / "t.chrome.json.gz"
    gz.write_bytes(gzip.compress(c.read_bytes()))
    assert load_trace(gz)["events"] == back["events"]
    assert bubble_stats(back) == bubble_stats(trace)  # zb flags and all survive the round trip
    assert back["meta"]["schedule"] == "DualPipeV"


def test_draw_and_report(tmp_path):
    _, trace = _trace()
    png = draw_timeline(trace, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "t.json").write_text(json.dumps(trace))
    stats = pipeline_report(tmp_path / "t.json", tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    text = format_stats(stats)
    assert "measured bubble 30.0%" in text and "formula 32.3%" in text


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_trace(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_trace(bad)
    bad.write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="expected a schedule trace"):
        load_trace(bad)
    with pytest.raises(ValueError, match="no compute events"):
        bubble_stats({"meta": {}, "events": []})


def test_profile_pipeline_command(tmp_path, capsys):
    _, trace = _trace()
    (tmp_path / "t.json").write_text(json.dumps(trace))
    parser = argparse.ArgumentParser()
    register_profile(parser.add_subparsers())
    args = parser.parse_args(["pipeline", str(tmp_path / "t.json"), "--png", str(tmp_path / "o.png"), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_bubble"] == pytest.approx(0.3) and (tmp_path / "o.png").exists()
    args = parser.parse_args(["pipeline", str(tmp_path / "nope.json")])
    assert args.func(args) == 2
    assert "trace file not found" in capsys.readouterr().err
