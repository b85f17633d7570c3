"""fsspec ``3fs://``: pandas, pyarrow and DuckDB read and write files on a live cluster."""

from __future__ import annotations

import fsspec
import pytest

import openinfra.fs.clients.fsspec  # noqa: F401  (registers the "threefs" alias)

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster

    from .conftest import FAST

    c = LocalCluster.start(ClusterSpec(str(tmp_path_factory.mktemp("fsspec")), storage_nodes=2, replication=2,
                                       chunk_size=256 << 10, stripe=2, **FAST), timeout=60)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fs(cluster):
    fs = fsspec.filesystem("3fs", mgmtd=cluster.address, skip_instance_cache=True)
    yield fs
    fs.client.close()


def test_fsspec_basic_operations(fs, cluster):
    fs.makedirs("/t/sub", exist_ok=True)
    with fs.open("3fs:///t/a.bin", "wb", block_size=100_000) as f:   # several blocks streamed
        for i in range(10):
            f.write(bytes([i]) * 50_000)
    assert fs.info("/t/a.bin")["size"] == 500_000 and fs.info("/t")["type"] == "directory"
    with fs.open("/t/a.bin", "rb") as f:
        f.seek(149_999)
        assert f.read(2) == b"\x02\x03"
    assert fs.cat_file("/t/a.bin", start=50_000, end=50_003) == b"\x01\x01\x01"
    with fs.open("/t/a.bin", "ab") as f:
        f.write(b"tail")
    assert fs.cat("/t/a.bin")[-6:] == b"\x09\x09tail"
    fs.pipe("/t/sub/p.txt", b"piped")
    assert sorted(fs.ls("/t", detail=False)) == ["/t/a.bin", "/t/sub"]
    assert fs.find("/t") == ["/t/a.bin", "/t/sub/p.txt"]
    fs.mv("/t/sub/p.txt", "/t/q.txt")
    assert fs.cat("3fs://t/q.txt") == b"piped"
    fs.rm("/t", recursive=True)
    assert not fs.exists("/t")
    with pytest.raises(FileNotFoundError):
        fs.info("/t")
    # the same cluster found through storage options / the data directory
    with fsspec.open("3fs:///x.txt", "wb", data_dir=str(cluster.root)) as f:
        f.write(b"via data_dir")
    assert fs.cat("/x.txt") == b"via data_dir"


def test_pandas_and_pyarrow_roundtrip(fs, cluster):
    pd = pytest.importorskip("pandas")
    pq = pytest.importorskip("pyarrow.parquet")
    df = pd.DataFrame({"id": range(5000), "text": [f"row {i}" for i in range(5000)], "x": [i / 7 for i in range(5000)]})
    opts = {"mgmtd": cluster.address}
    # pandas passes only URLs whose scheme starts with a letter to fsspec: "threefs://" (or a
    # filesystem / an open file for "3fs://").
    df.to_parquet("threefs:///pd/t.parquet", storage_options=opts)
    df.to_csv("threefs:///pd/t.csv", index=False, storage_options=opts)
    pd.testing.assert_frame_equal(pd.read_parquet("threefs:///pd/t.parquet", storage_options=opts), df)
    pd.testing.assert_frame_equal(pd.read_csv("threefs:///pd/t.csv", storage_options=opts), df)
    pd.testing.assert_frame_equal(pd.read_parquet("/pd/t.parquet", filesystem=fs), df)
    with fs.open("3fs:///pd/t.csv") as f:
        pd.testing.assert_frame_equal(pd.read_csv(f), df)
    table = pq.read_table("/pd/t.parquet", filesystem=fs)
    assert table.num_rows == 5000 and table.column("id").to_pylist()[-1] == 4999
    pq.write_table(table.slice(0, 10), "/pd/small.parquet", filesystem=fs)
    assert pq.read_table("/pd/small.parquet", filesystem=fs).num_rows == 10


def test_duckdb_reads_and_writes(fs):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register_filesystem(fs)
    con.execute("COPY (SELECT range AS i, range * 2 AS j FROM range(10000)) TO '3fs:///duck/t.parquet' (FORMAT PARQUET)")
    assert fs.exists("/duck/t.parquet")
    assert con.execute("SELECT count(*), sum(j) FROM read_parquet('3fs:///duck/t.parquet')").fetchall()[0] == (10000, 99990000)
    fs.pipe("/duck/c.csv", b"a,b\n1,x\n2,y\n")
    assert con.execute("SELECT sum(a) FROM read_csv('3fs:///duck/c.csv')").fetchall()[0] == (3,)
