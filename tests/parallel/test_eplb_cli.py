"""``openinfra eplb plan``: the README example from JSON and CSV, plans round-trip through
--output / --previous, --png draws, and bad input is one line on stderr with exit code 2."""

import json

import pytest

from openinfra.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensor ops: extra threads only contend on a 2-core runner
    yield
    torch.set_num_threads(before)

README = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
TOPOLOGY = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


@pytest.fixture
def loads_json(tmp_path):
    p = tmp_path / "loads.json"
    p.write_text(json.dumps({"loads": README}))
    return p


def test_plan_prints_placement_and_balancedness(loads_json, capsys, tmp_path):
    out_plan = tmp_path / "plan.json"
    rc = main(["eplb", "plan", "--loads", str(loads_json), *TOPOLOGY, "--solver", "faithful", "--output", str(out_plan), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "layer 0: balancedness 0.540 -> 0.828" in out
    assert "layer 1: balancedness 0.420 -> 0.805" in out
    assert "gpu   0 (node 0): experts [5, 6]  load 121.5" in out
    assert "gpu   7 (node 1): experts [3, 1]  load 117.5" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert round(summary["balancedness_after"], 4) == round((0.8277243589743589 + 0.8050139275766016) / 2, 4)
    saved = json.loads(out_plan.read_text())
    assert saved["phy2log"] == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert saved["num_gpus"] == 8 and saved["policy"] == "hierarchical"


def test_csv_with_header_and_previous_plan(tmp_path, capsys):
    csv = tmp_path / "loads.csv"
    csv.write_text("e0,e1,e2,e3,e4,e5,e6,e7,e8,e9,e10,e11\n" + "\n".join(",".join(map(str, r)) for r in README) + "\n")
    plan = tmp_path / "plan.json"
    assert main(["eplb", "plan", "--loads", str(csv), *TOPOLOGY, "--output", str(plan), "--summary-only"]) == 0
    capsys.readouterr()
    # Same loads against the plan in service: nothing moves.
    assert main(["eplb", "plan", "--loads", str(csv), *TOPOLOGY, "--previous", str(plan), "--summary-only", "--json"]) == 0
    out = capsys.readouterr().out
    assert "migration: 0 replicas moved" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["experts_moved"] == 0 and summary["layers_kept"] == 2


def test_png(loads_json, tmp_path, capsys):
    png = tmp_path / "loads.png"
    assert main(["eplb", "plan", "--loads", str(loads_json), *TOPOLOGY, "--png", str(png), "--png-layer", "0", "--summary-only"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png} (layer 0)" in capsys.readouterr().out


@pytest.mark.parametrize("content, args, message", [
    (README, ["--replicas", "15", "--groups", "4", "--nodes", "2", "--gpus", "8"], "num_replicas (15) must be a multiple of num_gpus (8)"),
    (README, ["--replicas", "16", "--groups", "5", "--nodes", "2", "--gpus", "8"], "num_groups (5) must divide the number of logical experts (12)"),
    (README, ["--replicas", "16", "--groups", "4", "--nodes", "3", "--gpus", "9"], "num_replicas (16) must be a multiple of num_gpus (9)"),
    ([[1, -2, 3, 4]], ["--replicas", "4", "--groups", "1", "--nodes", "1", "--gpus", "2"], "weight must be non-negative"),
    ([[1, 2], [3]], TOPOLOGY, "every layer must list the same number of experts"),
    ({"other": 1}, TOPOLOGY, "a JSON object needs a 'loads' key"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, content, args, message):
    p = tmp_path / "loads.json"
    p.write_text(json.dumps(content))
    assert main(["eplb", "plan", "--loads", str(p), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("openinfra eplb: error:")


def test_missing_file_and_bad_previous(tmp_path, loads_json, capsys):
    assert main(["eplb", "plan", "--loads", str(tmp_path / "nope.json"), *TOPOLOGY]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "prev.json"
    bad.write_text(json.dumps({"phy2log": [[0, 1, 2]]}))
    assert main(["eplb", "plan", "--loads", str(loads_json), *TOPOLOGY, "--previous", str(bad)]) == 2
    assert "previous must have shape [layers=2, replicas=16]" in capsys.readouterr().err


def test_bench_routine_smoke(capsys):
    # `openinfra bench eplb` at a tiny scale: the table and the last JSON line with the goals.
    assert main(["bench", "eplb", "--layers", "2", "--seeds", "1", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "eplb" and summary["never_worse"] is True
    assert set(summary["configs"]) == {"prefill EP32", "decode EP144"}
    for cfg in summary["configs"].values():
        assert cfg["moves_ratio"] <= 1.0 and cfg["best_s"] > 0
    assert any("prefill EP32" in line and "zipf" in line for line in lines)
