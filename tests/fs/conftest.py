"""Fixtures for the 3FS tests: a private PostgreSQL server and embedded clusters.

PostgreSQL: we run as root, so the server runs as the ``postgres`` user from a temporary data
directory on a free 127.0.0.1 port, one per xdist worker, and is stopped at session end. Tests
that need it skip with the reason when the binaries or the user are missing.
"""

from __future__ import annotations

import os
import time

import pytest


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server for this session (one per xdist worker)."""
    from openinfra.fs.pg import PrivatePostgres, find_pg_bin

    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; `make test` installs the postgresql package")
    try:
        server = PrivatePostgres.start()
    except RuntimeError as exc:
        pytest.skip(f"cannot start PostgreSQL here: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """``postgresql://postgres@127.0.0.1:<port>/postgres`` of the session's private server."""
    return postgres_server.url


@pytest.fixture
def fresh_postgres_db(postgres_server):
    """A new empty database on the session's server; yields its URL."""
    name = f"t{int(time.time() * 1e6)}_{os.getpid()}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


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


def storage_node_name(cluster, node_id: int) -> str:
    """The cluster's service name of storage node ``node_id``."""
    return next(n for n, s in cluster.services.items() if s["role"] == "storage" and s["node_id"] == node_id)


def chain_dumps_equal(cluster, chain_id: int) -> list[dict]:
    """Asserts that every replica of chain ``chain_id`` holds the same committed chunks (versions
    and CRCs); returns their dumps."""
    r = cluster.routing()
    dumps = [target_dump(cluster, storage_node_name(cluster, t["node"]), t["id"]) for t in r.chain(chain_id)["targets"]]
    assert all(d == dumps[0] for d in dumps), "replicas differ"
    return dumps
