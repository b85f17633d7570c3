"""The benchmark harness: registry, CPU timing, table, JSON-last output and result files."""

import argparse
import json

import pytest

from openinfra.bench import harness
from openinfra.bench.harness import BenchResult, cpu_time_s, format_table, routine, save_result

pytestmark = pytest.mark.unit


def test_cpu_time_is_a_median_of_real_runs():
    """``cpu_time_s`` times each run with the wall clock (perf_counter), so runs that sleep known,
    different lengths have known times: the result is the middle one, not the min, max or mean, and
    the warm-up runs are not timed. A sleep never ends early, and the median only exceeds the band
    if one of the three short runs oversleeps by more than 0.145 s."""
    import time

    # two untimed warm-ups (0 s), then five timed runs: sorted 0.005, 0.01, 0.05, 0.55, 0.6
    lengths = [0.0, 0.0, 0.6, 0.005, 0.05, 0.55, 0.01]
    calls = []

    def run():
        time.sleep(lengths[len(calls)])
        calls.append(1)

    t = cpu_time_s(run, repeat=5, warmup=2)
    assert len(calls) == 7
    # median 0.05; min 0.005, max 0.6, mean 0.243, median of the first five runs 0.005: all outside
    assert 0.045 <= t < 0.2, t


def test_table_aligns_all_keys():
    text = format_table([{"a": 1, "b": 2.5}, {"a": 10, "c": "x"}])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b", "c"] and len(lines) == 4


def test_routine_runs_through_the_cli_with_json_last(tmp_path, capsys, monkeypatch):
    @routine("_test_sum", "test-only routine")
    def _bench(args: argparse.Namespace) -> BenchResult:
        seconds = cpu_time_s(lambda: sum(range(1000)), repeat=3)
        return BenchResult([{"n": 1000, "s": seconds}], {"ours_over_peer": 1.0, "s": seconds})

    try:
        from openinfra.cli import main

        assert main(["bench", "_test_sum", "--save", "--results-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        last = json.loads(out[-1])
        assert last["benchmark"] == "_test_sum" and last["ours_over_peer"] == 1.0
        files = list(tmp_path.glob("_test_sum_*_*.json"))
        assert len(files) == 1
        saved = json.loads(files[0].read_text())
        assert saved["command"].startswith("openinfra") and saved["rows"][0]["n"] == 1000
    finally:
        harness._ROUTINES.pop("_test_sum", None)


def test_duplicate_registration_is_refused():
    routine("_test_dup", "x")(lambda a: BenchResult())
    try:
        with pytest.raises(ValueError, match="registered twice"):
            routine("_test_dup", "x")(lambda a: BenchResult())
    finally:
        harness._ROUTINES.pop("_test_dup", None)


def test_gpu_routine_refuses_cleanly_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal path is for CPU-only machines")
    from openinfra.cli import main

    assert main(["bench", "fp8_cast"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_save_result_names_file_by_hardware_and_date(tmp_path):
    path = save_result("x", BenchResult([{"a": 1}], {"b": 2}), "openinfra bench x", tmp_path)
    assert path.name.startswith(f"x_{harness.hardware_name()}_") and path.suffix == ".json"
