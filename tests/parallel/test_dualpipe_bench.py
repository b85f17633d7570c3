"""Smoke run of ``openinfra bench dualpipe`` at a tiny size: every schedule runs, rows and ratios come back."""

from __future__ import annotations

import argparse

import pytest

pytestmark = pytest.mark.distributed


def _args(**kw) -> argparse.Namespace:
    from openinfra.bench.routines.dualpipe import _add_arguments

    p = argparse.ArgumentParser()
    _add_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return p.parse_args(argv)


def test_bench_smoke(tmp_path):
    from openinfra.bench.routines.dualpipe import bench_dualpipe

    args = _args(model="mlp", pp=2, chunks=4, mb=1, seq=2, hidden=8, steps=1, timeout=150,
                 schedules=["1F1B", "ZBV", "torch-DualPipeV", "DualPipeV", "DualPipe"], trace_dir=tmp_path)
    res = bench_dualpipe(args)
    assert [r["schedule"] for r in res.rows] == ["1F1B", "ZBV", "torch-DualPipeV", "DualPipeV", "DualPipe"]
    assert all(r["step_ms"] > 0 and 0 <= r["bubble_est"] <= 1 for r in res.rows)
    ours = [r for r in res.rows if r["schedule"].startswith("DualPipe")]
    assert all(0 <= r["bubble_trace"] < 1 for r in ours)
    assert res.summary["DualPipeV_over_torch_DualPipeV"] > 0
    assert (tmp_path / "DualPipeV.png").exists() and (tmp_path / "DualPipe.chrome.json").exists()


def test_bench_argument_errors():
    from openinfra.bench.routines.dualpipe import bench_dualpipe

    with pytest.raises(ValueError, match="--pp must be even"):
        bench_dualpipe(_args(pp=3))
    with pytest.raises(ValueError, match="--chunks must be even and >= 2\\*pp"):
        bench_dualpipe(_args(pp=2, chunks=2))
    with pytest.raises(ValueError, match="unknown"):
        bench_dualpipe(_args(schedules=["GPipe"]))


def _docs_example_rank(rank: int, world: int, code: str, workdir: str):
    import os

    os.chdir(workdir)
    scope: dict = {}
    exec(compile(code, "docs/dualpipe.md", "exec"), scope)
    return None if scope["loss"] is None else scope["loss"].tolist()


def test_docs_example_runs(distributed, tmp_path):
    """The example in docs/dualpipe.md runs as written, and its trace feeds ``profile pipeline``."""
    import re
    from pathlib import Path

    from openinfra.parallel.dualpipe.timeline import pipeline_report

    doc = (Path(__file__).resolve().parents[2] / "docs" / "dualpipe.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    losses = distributed(_docs_example_rank, 2, code, str(tmp_path), timeout=150)
    assert len(losses[0]) == 20 and losses[1] is None
    stats = pipeline_report(tmp_path / "trace.json", tmp_path / "timeline.png")
    assert stats["ranks"] == 2 and (tmp_path / "timeline.png").exists()
