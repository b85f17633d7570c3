"""The console script: --help, --version, the demo driver and `python -m openinfra`."""

import subprocess
import sys

import pytest

from openinfra import __version__
from openinfra.cli import main
from openinfra.demo import STAGES, DemoContext, run_demo

pytestmark = pytest.mark.unit


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "cost", "bench"):
        assert command in out


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "openinfra", "cost", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"cost_per_day": 87072.0' in out.stdout


def test_demo_runs_built_stages_and_names_the_rest(tmp_path, capsys):
    outcomes = run_demo(DemoContext(data_dir=tmp_path, quick=True), only=["report"])
    by_name = {o.stage.name: o for o in outcomes}
    assert [o.stage.name for o in outcomes] == [s.name for s in STAGES]
    assert by_name["report"].status == "ok"
    assert "$87,072" in (tmp_path / "report.md").read_text()
    for o in outcomes:
        assert o.status in ("ok", "skipped", "not built")


def test_demo_stage_failure_stops_and_is_reported(tmp_path, monkeypatch, capsys):
    import openinfra.serving.report_stage as report_stage

    def boom(ctx):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report_stage, "run_stage", boom)
    assert main(["demo", "--data-dir", str(tmp_path), "--only", "report"]) == 1
    assert "disk on fire" in capsys.readouterr().out
