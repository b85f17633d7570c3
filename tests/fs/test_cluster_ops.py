"""Operations: a cluster on PostgreSQL with two meta processes, the CLI end to end, the demo
stage, metrics and structured logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]


def test_cluster_on_postgresql_with_two_meta(make_cluster, fresh_postgres_db):
    cluster = make_cluster(storage_nodes=2, replication=2, meta_count=2, meta_db=fresh_postgres_db)
    with cluster.client() as fs:
        fs.mkdir("/pg/dir", parents=True)
        data = os.urandom(3_000_000)
        fs.write_bytes("/pg/dir/f", data)
        assert fs.read_bytes("/pg/dir/f") == data
        for i in range(20):  # round-robins over both meta processes
            fs.write_bytes(f"/pg/dir/s{i}", b"%d" % i)
        assert len(fs.listdir("/pg/dir")) == 21
        fs.rename("/pg/dir", "/pg/moved")
        assert fs.read_bytes("/pg/moved/s7") == b"7"


def _cli(*args, check=True):
    # `python -m openinfra.fs.cli ARGS` runs the same parser as `openinfra fs ARGS` without importing
    # the other layers (PyTorch): seconds instead of ~10 s per call on a loaded 2-core machine.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    p = subprocess.run([sys.executable, "-m", "openinfra.fs.cli", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"openinfra fs {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_cli_start_status_put_get_admin_stop(tmp_path):
    d = str(tmp_path / "fs")
    out = _cli("start", "--data-dir", d, "--fast", "--no-fsync", "--storage-nodes", "2", "--replication", "2").stdout
    try:
        assert "3FS cluster started" in out
        st = json.loads(_cli("status", "--data-dir", d, "--json").stdout)
        assert {p["running"] for p in st["processes"].values()} == {True}
        assert all(t["state"] == "serving" for c in st["chains"].values() for t in c["targets"])
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(2_500_000))
        _cli("mkdir", "-p", "/a/b", "--data-dir", d)
        _cli("put", str(src), "/a/b/x", "--data-dir", d)
        assert "x" in _cli("ls", "/a/b", "--data-dir", d).stdout
        _cli("get", "/a/b/x", str(tmp_path / "out.bin"), "--data-dir", d)
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        bad = _cli("get", "/missing", "-", "--data-dir", d, check=False)
        assert bad.returncode == 2 and "does not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        _cli("admin", "kill", "storage-2", "--data-dir", d)
        _cli("admin", "restart", "storage-2", "--data-dir", d)
        _cli("admin", "wait-healthy", "--data-dir", d)
        # metrics endpoint per service, and JSON-lines logs
        metrics = st["processes"]["storage-1"]["metrics"]
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
        assert "openinfra_fs_rpc_requests_total" in text and 'method="write_batch"' in text  # put: multi-chunk
        for line in (Path(d) / "logs" / "mgmtd-1.log").read_text().splitlines():
            rec = json.loads(line)
            assert {"ts", "level", "service", "msg"} <= rec.keys()
    finally:
        _cli("stop", "--data-dir", d)
    st = json.loads(_cli("status", "--data-dir", d, "--json").stdout)  # exit status 0, JSON on stdout
    assert st["processes"] and not any(p["running"] for p in st["processes"].values()), st["processes"]
    nope = _cli("status", "--data-dir", str(tmp_path / "none"), check=False)
    assert nope.returncode == 2 and "no cluster" in nope.stderr


def test_demo_stage_starts_a_usable_cluster(tmp_path):
    from openinfra.demo import DemoContext
    from openinfra.fs import Client
    from openinfra.fs.demo_stage import run_stage, stop_stage

    ctx = DemoContext(data_dir=tmp_path, quick=True)
    try:
        out = run_stage(ctx)
        assert json.loads((tmp_path / "fs.json").read_text())["mgmtd"] == out["mgmtd"]
        with Client(out["mgmtd"]) as fs:  # what a later stage does
            fs.write_bytes("/later-stage", b"ok")
            assert fs.read_bytes("/later-stage") == b"ok"
    finally:
        stop_stage(ctx)
