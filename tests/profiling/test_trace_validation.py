"""Malformed traces: a ValueError naming the file, the event and the problem (API), exit 2 and one
line (CLI); and ``import openinfra.profiling`` / ``openinfra profile summary`` without PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openinfra.parallel.dualpipe.timeline import load_trace as load_schedule
from openinfra.parallel.dualpipe.timeline import bubble_stats, pipeline_report
from openinfra.profiling import load_trace, merge_traces, summarize

pytestmark = pytest.mark.unit


def _x(**kw):
    return {"ph": "X", "name": "openinfra:F", "cat": "user_annotation", "ts": 0, "dur": 10, "pid": 1, "tid": 1, **kw}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "openinfra", "profile", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


# --- Chrome traces (openinfra.profiling) ------------------------------------------------------------

CHROME_BAD = {
    "not_object": ([_x(), 42], r"event 1: expected an object"),
    "no_ts": ([_x(), {k: v for k, v in _x().items() if k != "ts"}], r"event 1 .*no 'ts' field"),
    "no_dur": ([{k: v for k, v in _x().items() if k != "dur"}], r"event 0 .*no 'dur' field"),
    "ts_text": ([_x(ts="soon")], r"event 0 .*'ts' must be a number, got 'soon'"),
    "dur_list": ([_x(dur=[1])], r"event 0 .*'dur' must be a number, got \[1\]"),
    "dur_bool": ([_x(dur=True)], r"event 0 .*'dur' must be a number, got True"),
    "dur_null": ([_x(dur=None)], r"event 0 .*'dur' must be a number, got None"),
    "negative_dur": ([_x(), _x(ts=20, dur=-5)], r"event 1 .*negative duration -5"),
    "e_before_b": ([{"ph": "B", "name": "openinfra:F", "ts": 10, "pid": 1, "tid": 1},
                    {"ph": "E", "ts": 5, "pid": 1, "tid": 1}], r"event 1: 'E' at ts=5 ends before its 'B' \(event 0"),
    "b_without_e": ([_x(), {"ph": "B", "name": "openinfra:B", "ts": 10, "pid": 1, "tid": 1}],
                    r"event 1: 'B' event 'openinfra:B' without a matching 'E'"),
    "e_without_b": ([{"ph": "E", "ts": 1, "pid": 1, "tid": 1}], r"event 0: 'E' event at ts=1 without a matching 'B'"),
    "b_no_ts": ([{"ph": "B", "name": "openinfra:F", "pid": 1, "tid": 1}], r"event 0 .*no 'ts' field"),
    "pid_list": ([_x(pid=[1])], r"event 0: pid must be a string or a number"),
}


@pytest.mark.parametrize("case", sorted(CHROME_BAD))
def test_malformed_chrome_event_names_file_and_event(tmp_path, case):
    events, pattern = CHROME_BAD[case]
    p = _write(tmp_path, f"{case}.json", {"traceEvents": events})
    with pytest.raises(ValueError, match=pattern) as info:
        load_trace(p)
    assert str(info.value).startswith(f"{p}: ")
    with pytest.raises(ValueError, match=pattern):  # merging reads the same way
        merge_traces([p], tmp_path / "merged.json")


@pytest.mark.parametrize("top, pattern", [
    ({"openinfra_rank": "zero"}, r"openinfra_rank must be a rank .*'zero'"),
    ({"distributedInfo": {"rank": -1}}, r"distributedInfo.rank must be a rank .*-1"),
    ({"baseTimeNanoseconds": "later"}, r"baseTimeNanoseconds must be a number, got 'later'"),
])
def test_malformed_file_fields(tmp_path, top, pattern):
    p = _write(tmp_path, "t.json", {"traceEvents": [_x()], **top})
    with pytest.raises(ValueError, match=pattern) as info:
        summarize(p)
    assert str(info.value).startswith(f"{p}: ")


def test_non_finite_time_is_refused(tmp_path):
    p = tmp_path / "nan.json"
    p.write_text('{"traceEvents": [{"ph": "X", "name": "openinfra:F", "ts": NaN, "dur": 1, "pid": 1, "tid": 1}]}')
    with pytest.raises(ValueError, match=r"nan.json: not a valid trace: event 0 .*'ts' must be finite"):
        load_trace(p)


def test_odd_but_valid_events_still_read(tmp_path):
    """A nameless kernel, metadata with odd args, a B/E pair: no error, the right intervals."""
    p = _write(tmp_path, "ok.json", {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": "rank 0"},
        {"ph": "X", "cat": "kernel", "ts": 0, "dur": 4, "pid": 1, "tid": 7},
        {"ph": "B", "name": "openinfra:dispatch", "ts": 2, "pid": 1, "tid": 1},
        {"ph": "E", "ts": 6, "pid": 1, "tid": 1},
    ]})
    ivs = load_trace(p).intervals[0]
    assert [(iv.name, iv.start_us, iv.end_us, iv.kind) for iv in ivs] == [("", 0, 4, "compute"),
                                                                         ("openinfra:dispatch", 2, 6, "comm")]


def test_cli_summary_malformed_trace(tmp_path):
    p = _write(tmp_path, "bad.json", {"traceEvents": [_x(dur="long")]})
    r = _cli("summary", p)
    assert r.returncode == 2
    assert r.stderr.strip() == f"openinfra profile: {p}: not a valid trace: event 0 ('X' 'openinfra:F'): 'dur' must be a number, got 'long'"
    assert "Traceback" not in r.stderr and r.stdout == ""


# --- schedule traces (openinfra profile pipeline) ---------------------------------------------------

def _sev(**kw):
    return {"rank": 0, "kind": "F", "start_us": 0, "end_us": 10, "module": 0, "chunk": 0, **kw}


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


SCHED_BAD = {
    "events_not_list": ({"meta": {}, "events": {"0": _sev()}}, r"'events' must be a list of events, got dict"),
    "meta_not_object": ({"meta": [], "events": [_sev()]}, r"'meta' must be an object, got list"),
    "event_not_object": ({"events": [_sev(), "F"]}, r"event 1: expected an object, got str"),
    "no_rank": ({"events": [_drop(_sev(), "rank")]}, r"event 0 \('F'\): missing 'rank'"),
    "no_times": ({"events": [_drop(_drop(_sev(), "start_us"), "end_us")]}, r"event 0 \('F'\): missing 'start_us', 'end_us'"),
    "rank_text": ({"events": [_sev(rank="0")]}, r"event 0 \('F'\): 'rank' must be an integer >= 0, got '0'"),
    "kind_number": ({"events": [_sev(kind=1)]}, r"event 0: 'kind' must be a string, got 1"),
    "start_text": ({"events": [_sev(start_us="0")]}, r"event 0 \('F'\): 'start_us' must be a finite number, got '0'"),
    "end_before_start": ({"events": [_sev(), _sev(kind="W", start_us=30, end_us=20)]},
                         r"event 1 \('W'\): negative duration \(end_us 20 < start_us 30\)"),
    "f_without_module": ({"events": [_drop(_sev(), "module")]}, r"event 0 \('F'\): a F chunk needs 'module' 0 or 1, got None"),
    "b_module_2": ({"events": [_sev(kind="B", module=2)]}, r"event 0 \('B'\): a B chunk needs 'module' 0 or 1, got 2"),
    "fb_without_module_b": ({"events": [_sev(kind="F&B")]}, r"event 0 \('F&B'\): a F&B chunk needs 'module_b' 0 or 1"),
    "chunk_text": ({"events": [_sev(chunk="3")]}, r"event 0 \('F'\): 'chunk' must be an integer or null, got '3'"),
    "zb_text": ({"events": [_sev(kind="B", zb="yes")]}, r"event 0 \('B'\): 'zb' must be true or false, got 'yes'"),
    "chrome_event_not_object": ({"traceEvents": [None]}, r"traceEvents\[0\]: expected an object, got NoneType"),
    "chrome_no_dur": ({"traceEvents": [{"ph": "M"}, {"ph": "X", "pid": 0, "cat": "F", "ts": 0}]},
                      r"traceEvents\[1\]: an 'X' event needs 'dur'"),
    "chrome_ts_text": ({"traceEvents": [{"ph": "X", "pid": 0, "cat": "F", "ts": "0", "dur": 1}]},
                       r"traceEvents\[0\]: 'ts' must be a finite number, got '0'"),
    "chrome_args_list": ({"traceEvents": [{"ph": "X", "pid": 0, "cat": "F", "ts": 0, "dur": 1, "args": []}]},
                         r"traceEvents\[0\]: 'args' must be an object"),
    "chrome_negative_dur": ({"traceEvents": [{"ph": "X", "pid": 0, "cat": "W", "ts": 5, "dur": -1}]},
                            r"traceEvents\[0\] \('W'\): negative duration"),
    "chrome_pid_text": ({"traceEvents": [{"ph": "X", "pid": "r0", "cat": "W", "ts": 5, "dur": 1}]},
                        r"traceEvents\[0\] \('W'\): 'rank' must be an integer >= 0, got 'r0'"),
    "chrome_f_without_module": ({"traceEvents": [{"ph": "X", "pid": 0, "cat": "F", "ts": 5, "dur": 1, "args": {}}]},
                                r"traceEvents\[0\] \('F'\): a F chunk needs 'module' 0 or 1, got None"),
}


@pytest.mark.parametrize("case", sorted(SCHED_BAD))
def test_malformed_schedule_trace_names_file_and_event(tmp_path, case):
    data, pattern = SCHED_BAD[case]
    p = _write(tmp_path, f"{case}.json", data)
    with pytest.raises(ValueError, match=pattern) as info:
        load_schedule(p)
    assert str(info.value).startswith(f"{p}: ")
    with pytest.raises(ValueError, match=pattern):
        pipeline_report(p)


def test_schedule_optional_fields_default(tmp_path):
    """A hand-built trace may leave out zb/phase/...: a B without zb is a full backward (counted)."""
    p = _write(tmp_path, "t.json", {"meta": {"schedule": "DualPipeV"}, "events": [
        _sev(), {"rank": 1, "kind": "B", "start_us": 10, "end_us": 30, "module": 1}]})
    s = bubble_stats(load_schedule(p))
    assert s["mean_us"]["B"] == 20 and s["formula_bubble"] is not None


def test_cli_pipeline_malformed_and_png(tmp_path):
    bad = _write(tmp_path, "bad.json", {"events": [_sev(end_us=None)]})
    r = _cli("pipeline", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"openinfra profile pipeline: {bad}: not a valid trace: event 0 ('F'): 'end_us' must be a finite number, "
                                "got None")
    good = _write(tmp_path, "t.json", {"meta": {}, "events": [_sev(), _sev(rank=1, kind="B", start_us=10, end_us=20)]})
    (tmp_path / "d").mkdir()
    r = _cli("pipeline", good, "--png", tmp_path / "d")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--png {tmp_path / 'd'}: is a directory" in r.stderr
    r = _cli("pipeline", good, "--png", tmp_path / "pic")  # matplotlib writes pic.png: that is reported
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'pic.png'}" in r.stdout and (tmp_path / "pic.png").is_file()


# --- no PyTorch to read traces ----------------------------------------------------------------------

def test_import_profiling_does_not_import_torch():
    code = "import sys, openinfra.profiling; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
