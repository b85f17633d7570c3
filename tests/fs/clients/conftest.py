"""Fixtures for the 3FS client tests: one small real cluster per test module (processes on loopback).

Starting a cluster costs a few seconds on a loaded 2-core machine, so the client tests of a module
share one, each test working under its own directory. Timings are the core tests' FAST settings.
"""

from __future__ import annotations

import itertools
import os

import pytest

from tests.fs.conftest import FAST

_ids = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster: 2 storage nodes x 2 targets, replication 2 (2 chains), 1 meta, 1 mgmtd."""
    from openinfra.fs import ClusterSpec, LocalCluster

    spec = ClusterSpec(str(tmp_path_factory.mktemp("fs-clients")), storage_nodes=2, targets_per_node=2,
                       replication=2, chunk_size=1 << 20, **FAST)
    c = LocalCluster.start(spec, timeout=60)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fs_client(cluster):
    """A native client of the module's cluster (root)."""
    with cluster.client() as c:
        yield c


@pytest.fixture
def workdir(fs_client):
    """A fresh directory on the cluster for one test: ``/t<pid>-<n>``."""
    path = f"/t{os.getpid()}-{next(_ids)}"
    fs_client.mkdir(path, mode=0o777)
    return path
