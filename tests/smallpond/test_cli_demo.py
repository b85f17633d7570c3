"""`openinfra data ...`, the demo's data stage and a smoke run of `openinfra bench smallpond`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra.cli import main
from openinfra.demo import DemoContext
from openinfra.smallpond import corpus, demo_stage

pytestmark = pytest.mark.unit


@pytest.fixture
def parquet_input(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"k": [i % 4 for i in range(100)], "v": list(range(100))}), path)
    return path


def test_data_sql_writes_output(tmp_path, parquet_input, capsys):
    out = tmp_path / "out"
    rc = main(["data", "sql", "select k, sum(v) as s from {0} group by k", "-i", str(parquet_input), "-n", "2",
               "--hash-by", "k", "-o", str(out), "--data-root", str(tmp_path / "root")])
    assert rc == 0
    got = {r["k"]: r["s"] for r in pq.read_table(out).to_pylist()}
    assert got == {k: sum(v for v in range(100) if v % 4 == k) for k in range(4)}
    assert "wrote 4 rows" in capsys.readouterr().out


def test_data_sql_errors_are_one_line_exit_2(tmp_path, parquet_input, capsys):
    assert main(["data", "sql", "select k,, from {0}", "-i", str(parquet_input), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openinfra data:") and "select k,, from {0}" in err and "\n" not in err
    assert main(["data", "sql", "select 1", "-i", str(tmp_path / "missing.parquet"), "--data-root", str(tmp_path)]) == 2
    assert "missing.parquet" in capsys.readouterr().err


def test_data_explain_draws_plan(tmp_path, parquet_input, capsys):
    png = tmp_path / "plan.png"
    assert main(["data", "explain", "select * from {0} where v > 3", "-i", str(parquet_input), "-n", "2",
                 "--png", str(png), "--data-root", str(tmp_path / "root")]) == 0
    assert "== optimized plan ==" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_data_graysort(tmp_path, capsys):
    assert main(["data", "graysort", "--records", "3000", "--partitions", "3", "--files", "2",
                 "--workdir", str(tmp_path / "gs"), "--data-root", str(tmp_path / "root")]) == 0
    assert "order ok, count ok, checksum ok" in capsys.readouterr().out


def test_byte_tokenizer_roundtrip():
    tok = corpus.ByteTokenizer()
    ids = tok.encode("def f():\n    return 'é'\n")
    assert ids[-1] == tok.eos_id and ids.dtype.name == "uint16" and int(ids.max()) == 256
    assert tok.decode(ids) == "def f():\n    return 'é'\n"


def test_demo_data_stage(tmp_path, monkeypatch):
    files = corpus.stdlib_files()[:60]
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "copy.py").write_bytes(Path(files[5]).read_bytes())  # an exact duplicate to drop
    monkeypatch.setattr(demo_stage, "stdlib_files", lambda limit=None: files + [str(dup / "copy.py")])
    ctx = DemoContext(data_dir=tmp_path / "demo", quick=True)
    summary = demo_stage.run_stage(ctx)
    assert summary["storage"] == "local disk" and "local disk" in summary["shards"]
    shards = Path(summary["shards_dir"])
    meta = json.loads((shards / "_meta.json").read_text())
    table = pq.read_table(shards)
    assert table.num_rows == meta["sequences"] > 0
    lengths = {len(t) for t in table.column("tokens").to_pylist()[:50]}
    assert lengths == {summary["seq_len"]}
    contents = [Path(f).read_bytes() for f in files if os.path.getsize(f) > 0]
    assert meta["documents"] == len(set(contents))  # exact duplicates (and our copy) were dropped
    assert f"{len(contents) + 1 - len(set(contents))} exact duplicates dropped" in summary["deduplicated"]
    text = corpus.ByteTokenizer().decode([i for row in table.column("tokens").to_pylist()[:20] for i in row])
    assert "def " in text or "import " in text


def test_bench_routine_smoke(tmp_path):
    from openinfra.bench.routines.smallpond import bench_smallpond

    args = argparse.Namespace(gib=0.0005, partitions=2, workers=2, readme_rows=2000, workdir=str(tmp_path),
                              smallpond_venv=str(tmp_path / "no-venv"), install_smallpond=False, fs_url=None, start_3fs=False,
                              repeat=1, skip=["pandas", "readme"])  # readme: one subprocess less; same _run_script path
    result = bench_smallpond(args)
    assert result.summary["graysort_valid"] is True
    assert "not measured" in result.summary["smallpond_peer"]
    engines = {r["engine"] for r in result.rows}
    assert {"openinfra.smallpond", "duckdb COPY ORDER BY"} <= engines
