"""The main job end to end: `openinfra demo --quick` runs every stage on a fresh data directory."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.service


def test_demo_quick_runs_all_stages(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "openinfra", "demo", "--quick", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "5 of 5 stages ran" in proc.stdout
    report = (tmp_path / "report.md").read_text()
    for section in ("Expert balance (EPLB)", "Pipeline bubble and overlap", "Cost vs theoretical income"):
        assert section in report
    for picture in ("eplb.png", "pipeline.png", "timeline.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["losses"][-1] < train["losses"][0]
    serve = json.loads((tmp_path / "serve.json").read_text())
    assert serve["stats"]["prefix_hit_rate"] > 0 and serve["stats"]["decode_tokens"] > 0
