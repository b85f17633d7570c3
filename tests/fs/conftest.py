"""Fixtures for the 3FS tests: a private PostgreSQL server and embedded clusters.

PostgreSQL: we run as root, so the server runs as the ``postgres`` user from a temporary data
directory on a free 127.0.0.1 port, one per xdist worker, and is stopped at session end. Tests
that need it skip with the reason when the binaries or the user are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PG_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    for d in PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--"] + cmd


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:<port>/postgres`` of a private server for this session."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; `make test` installs the postgresql package")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="openinfra-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, timeout=120)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True, timeout=90)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_postgres_db(postgres_url):
    """A new empty database on the session's server; yields its URL."""
    import psycopg

    name = f"t{int(time.time() * 1e6)}_{os.getpid()}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- embedded clusters ------------------------------------------------------------------------

# Test timings: heartbeats every 0.2 s, nodes failed after T = 2 s and fenced after T/2; lease 1 s.
# Loose enough for a loaded 2-core CI machine, short enough that failovers take seconds.
FAST = dict(heartbeat_s=0.2, failure_timeout_s=2.0, lease_s=1.0, fsync=False, gc_interval_s=0.5,
            forward_timeout_s=2.0)


@pytest.fixture
def make_cluster(tmp_path):
    """``make_cluster(**spec_overrides) -> LocalCluster`` (stopped at test end, whatever happens)."""
    from openinfra.fs import ClusterSpec, LocalCluster

    started = []

    def make(**overrides):
        spec = ClusterSpec(str(tmp_path / f"cluster{len(started)}"), **{**FAST, **overrides})
        cluster = LocalCluster.start(spec, timeout=60)
        started.append(cluster)
        return cluster

    yield make
    for c in started:
        c.stop()


def replica_metas(cluster, layout: dict, inode: int, index: int) -> list[dict | None]:
    """Chunk metadata of one chunk on every target of its chain (serving or not)."""
    from openinfra.fs.client.storage_client import chunk_chain
    from openinfra.fs.cluster import call

    r = cluster.routing()
    chain = r.chain(chunk_chain(layout, index))
    out = []
    for t in chain["targets"]:
        addr = r.address(t["node"])
        out.append(call(addr, "chunk_meta", {"target_id": t["id"], "inode": inode, "index": index}))
    return out


def target_dump(cluster, node_name: str, target_id: int) -> dict:
    """``{(inode, index): (version, crc)}`` of every committed chunk of a target."""
    from openinfra.fs.cluster import call

    rows = call(cluster.services[node_name]["address"], "dump_target", {"target_id": target_id}, timeout=30)
    return {(i, x): (v, c) for i, x, v, c in rows}
