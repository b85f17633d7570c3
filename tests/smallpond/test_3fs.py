"""smallpond on 3FS: input, intermediate data and output on a live embedded 3FS cluster (fsspec)."""

from __future__ import annotations

import os

import pytest

from openinfra import smallpond
from openinfra.smallpond import graysort

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # In-tree packages: a failed import fails the tests, it does not skip them.
    import openinfra.fs as fs_mod
    import openinfra.fs.clients.fsspec  # noqa: F401 - registers the 3fs:// filesystem
    spec = fs_mod.ClusterSpec(str(tmp_path_factory.mktemp("sp3fs")), storage_nodes=2, replication=1, stripe=2,
                              chunk_size=1 << 20, heartbeat_s=0.2, failure_timeout_s=2.0, lease_s=1.0, fsync=False)
    c = fs_mod.LocalCluster.start(spec, timeout=90)
    old = os.environ.get("OPENINFRA_FS_MGMTD")
    os.environ["OPENINFRA_FS_MGMTD"] = c.address  # how 3fs:// URLs without options find the cluster
    yield c
    if old is None:
        os.environ.pop("OPENINFRA_FS_MGMTD", None)
    else:
        os.environ["OPENINFRA_FS_MGMTD"] = old
    c.stop()


def test_graysort_on_3fs(cluster, tmp_path):
    import fsspec

    inputs = graysort.generate(str(tmp_path / "in"), 4000, 2, seed=9)
    with smallpond.init(data_root="3fs:///sp/root", num_executors=2) as sp:
        graysort.graysort(sp, inputs, "3fs:///sp/out", npartitions=3)
        assert sp.stats.executed > 0
    fs = fsspec.filesystem("3fs", mgmtd=cluster.address, skip_instance_cache=True)
    try:
        names = sorted(n for n in fs.ls("/sp/out", detail=False) if n.endswith(".parquet"))
        assert len(names) == 3
        local = tmp_path / "back"
        local.mkdir()
        for n in names:
            fs.get(n, str(local / os.path.basename(n)))
        assert not fs.exists("/sp/root/" + sp.config.job_id), "a successful job removes its intermediate data"
    finally:
        fs.client.close()
    check = graysort.validate(str(local))
    assert check.ok and (check.records, check.checksum) == graysort.checksum(inputs)


def test_dataframe_reads_3fs_input(cluster, tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("3fs", mgmtd=cluster.address, skip_instance_cache=True)
    try:
        pq.write_table(pa.table({"k": [i % 4 for i in range(100)], "v": list(range(100))}), "/sp/in/t.parquet", filesystem=fs)
    finally:
        fs.client.close()
    with smallpond.init(data_root=str(tmp_path / "root"), num_executors=2) as sp:
        df = sp.read_parquet("3fs:///sp/in/*.parquet").repartition(2, hash_by="k")
        got = sp.partial_sql("select k, count(*) as n from {0} group by k", df).take_all()
    assert sorted((r["k"], r["n"]) for r in got) == [(k, 25) for k in range(4)]


def test_demo_data_stage_writes_shards_to_3fs(cluster, tmp_path, monkeypatch):
    import fsspec

    from openinfra.demo import DemoContext
    from openinfra.smallpond import corpus, demo_stage

    files = corpus.stdlib_files()[:20]
    monkeypatch.setattr(demo_stage, "stdlib_files", lambda limit=None: files)
    ctx = DemoContext(data_dir=tmp_path / "demo", quick=True)
    ctx.results["cluster"] = {"mgmtd": [cluster.address]}
    summary = demo_stage.run_stage(ctx)
    assert summary["storage"] == "3FS" and summary["shards_dir"].startswith("3fs://")
    fs = fsspec.filesystem("3fs", mgmtd=cluster.address, skip_instance_cache=True)
    try:
        names = fs.ls("/demo/data/shards", detail=False)
        assert any(n.endswith(".parquet") for n in names) and any(n.endswith("_meta.json") for n in names)
    finally:
        fs.client.close()
