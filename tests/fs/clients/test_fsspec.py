"""fsspec filesystem against a real cluster: the fsspec API, pandas, pyarrow.dataset and DuckDB."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def fs(cluster):
    import fsspec

    return fsspec.filesystem("3fs", mgmtd=cluster.address)


def test_url_parsing_and_instance_from_url(cluster, monkeypatch):
    import fsspec

    from openinfra.fs.clients.fsspec import ThreeFSFileSystem

    assert ThreeFSFileSystem._strip_protocol(f"3fs://{cluster.address}/a/b/") == "/a/b"
    assert ThreeFSFileSystem._strip_protocol("3fs:///a") == "/a"
    assert ThreeFSFileSystem._strip_protocol("a/b") == "/a/b"
    assert ThreeFSFileSystem._strip_protocol("3fs://a/b") == "/a/b"  # not an address: a path component
    assert ThreeFSFileSystem._strip_protocol(f"threefs://{cluster.address}/c") == "/c"
    fs, path = fsspec.core.url_to_fs(f"3fs://{cluster.address}/x/y")
    assert isinstance(fs, ThreeFSFileSystem) and path == "/x/y" and fs.mgmtd == [cluster.address]
    assert fs.unstrip_protocol("/x") == f"3fs://{cluster.address}/x"
    monkeypatch.delenv("OPENINFRA_FS_MGMTD", raising=False)
    monkeypatch.delenv("OPENINFRA_FS_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="mgmtd"):
        ThreeFSFileSystem(skip_instance_cache=True)
    with pytest.raises(ValueError, match="address"):
        ThreeFSFileSystem("nonsense", skip_instance_cache=True)
    monkeypatch.setenv("OPENINFRA_FS_DATA_DIR", str(cluster.root))
    assert ThreeFSFileSystem(skip_instance_cache=True).mgmtd == cluster.mgmtd_addresses


def test_basic_api_roundtrip(fs, workdir):
    rng = np.random.default_rng(0)
    big = rng.bytes(3 * (1 << 20) + 12345)  # several chunks and several write blocks
    with fs.open(f"{workdir}/big.bin", "wb", block_size=1 << 20) as f:
        for i in range(0, len(big), 300_000):
            f.write(big[i:i + 300_000])
    assert fs.size(f"{workdir}/big.bin") == len(big)
    assert fs.cat_file(f"{workdir}/big.bin") == big
    assert fs.cat_file(f"{workdir}/big.bin", start=1_000_000, end=1_100_000) == big[1_000_000:1_100_000]
    assert fs.cat_file(f"{workdir}/big.bin", start=-10) == big[-10:]
    with fs.open(f"{workdir}/big.bin", "rb", block_size=65536) as f:
        f.seek(2_500_000)
        assert f.read(70_000) == big[2_500_000:2_570_000]
    fs.pipe_file(f"{workdir}/small", b"abc")
    with fs.open(f"{workdir}/small", "ab") as f:
        f.write(b"def")
    assert fs.cat(f"{workdir}/small") == b"abcdef"
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{workdir}/small", b"x", mode="create")
    fs.makedirs(f"{workdir}/d/e", exist_ok=True)
    fs.touch(f"{workdir}/d/e/f")
    assert fs.isdir(f"{workdir}/d") and fs.isfile(f"{workdir}/d/e/f")
    assert sorted(fs.ls(workdir, detail=False)) == [f"{workdir}/big.bin", f"{workdir}/d", f"{workdir}/small"]
    assert fs.find(workdir) == [f"{workdir}/big.bin", f"{workdir}/d/e/f", f"{workdir}/small"]
    assert fs.glob(f"{workdir}/*.bin") == [f"{workdir}/big.bin"]
    fs.mv(f"{workdir}/small", f"{workdir}/d")
    assert fs.cat(f"{workdir}/d/small") == b"abcdef" and not fs.exists(f"{workdir}/small")
    fs.cp_file(f"{workdir}/d/small", f"{workdir}/copy")
    assert fs.cat(f"{workdir}/copy") == b"abcdef"
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{workdir}/d")
    fs.rm(f"{workdir}/d", recursive=True)
    assert not fs.exists(f"{workdir}/d")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{workdir}/nope")
    with pytest.raises(FileNotFoundError):
        fsspec_nomk = type(fs)(mgmtd=fs.mgmtd, auto_mkdir=False, skip_instance_cache=True)
        fsspec_nomk.open(f"{workdir}/nodir/x", "wb")
    with pytest.raises(ValueError, match="mode"):
        fs.open(f"{workdir}/x", "r+b")
    fs2 = pickle.loads(pickle.dumps(fs))
    assert fs2.cat(f"{workdir}/copy") == b"abcdef"


def test_pandas_csv_and_parquet(fs, cluster, workdir):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": np.arange(10_000), "b": np.random.default_rng(1).random(10_000),
                       "s": [f"row{i}" for i in range(10_000)]})
    # pandas takes only letter-led schemes for URLs: threefs:// is the same filesystem as 3fs://.
    url = f"threefs://{cluster.address}{workdir}"
    df.to_parquet(f"{url}/t.parquet")
    df.to_csv(f"{url}/t.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(f"{url}/t.parquet"), df)
    pd.testing.assert_frame_equal(pd.read_csv(f"{url}/t.csv"), df)
    assert fs.size(f"{workdir}/t.parquet") > 0
    # With a 3fs:// filesystem object: parquet through filesystem=, CSV through an open file.
    df.to_parquet(f"{workdir}/u.parquet", filesystem=fs)
    pd.testing.assert_frame_equal(pd.read_parquet(f"{workdir}/u.parquet", filesystem=fs), df)
    with fs.open(f"3fs://{cluster.address}{workdir}/u.csv", "w") as f:
        df.to_csv(f, index=False)
    with fs.open(f"{workdir}/u.csv", "r") as f:
        pd.testing.assert_frame_equal(pd.read_csv(f), df)


def test_pyarrow_dataset_write_and_read(fs, workdir):
    pa = pytest.importorskip("pyarrow")
    ds = pytest.importorskip("pyarrow.dataset")
    table = pa.table({"k": pa.array(np.arange(6000) % 3), "v": pa.array(np.arange(6000, dtype=np.float64))})
    ds.write_dataset(table, f"{workdir}/ds", format="parquet", filesystem=fs, partitioning=["k"],
                     max_rows_per_file=1500, max_rows_per_group=1500)
    assert len(fs.find(f"{workdir}/ds")) >= 6  # 3 partitions x >= 2 files
    back = ds.dataset(f"{workdir}/ds", format="parquet", filesystem=fs, partitioning=["k"]).to_table()
    assert back.num_rows == 6000
    assert sorted(back.column("v").to_pylist()) == list(np.arange(6000, dtype=np.float64))
    flt = ds.dataset(f"{workdir}/ds", format="parquet", filesystem=fs, partitioning=["k"]).to_table(
        filter=ds.field("k") == 1)
    assert flt.num_rows == 2000


def test_duckdb_reads_and_writes(fs, cluster, workdir):
    duckdb = pytest.importorskip("duckdb")
    pd = pytest.importorskip("pandas")
    url = f"3fs://{cluster.address}{workdir}"
    pd.DataFrame({"x": np.arange(1000), "g": np.arange(1000) % 7}).to_parquet(f"{workdir}/in.parquet", filesystem=fs)
    con = duckdb.connect()
    con.register_filesystem(fs)
    assert con.execute(f"SELECT count(*), sum(x) FROM '{url}/in.parquet'").fetchone() == (1000, 499500)
    con.execute(f"COPY (SELECT g, count(*) AS n FROM '{url}/in.parquet' GROUP BY g ORDER BY g) "
            f"TO '{url}/out.parquet' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * FROM range(5) t(i)) TO '{url}/out.csv' (FORMAT csv, HEADER)")
    assert fs.exists(f"{workdir}/out.parquet")
    got = con.execute(f"SELECT * FROM '{url}/out.parquet' ORDER BY g").fetchall()
    assert got == [(g, len(range(g, 1000, 7))) for g in range(7)]
    assert con.execute(f"SELECT sum(i) FROM read_csv('{url}/out.csv')").fetchone() == (10,)
    assert con.execute(f"SELECT count(*) FROM '{url}/*.parquet'").fetchone() == (1007,)
    con.close()


def test_more_api_and_fork_safety(fs, workdir):
    import datetime
    import os

    fs.pipe_file(f"{workdir}/a/x.txt", b"hello")  # auto_mkdir creates /a
    assert fs.ls(f"{workdir}/a/x.txt", detail=False) == [f"{workdir}/a/x.txt"]
    info = fs.ls(f"{workdir}/a", detail=True)[0]
    assert (info["name"], info["type"], info["size"]) == (f"{workdir}/a/x.txt", "file", 5)
    before = fs.modified(f"{workdir}/a/x.txt")
    assert isinstance(before, datetime.datetime) and isinstance(fs.created(f"{workdir}/a/x.txt"), datetime.datetime)
    fs.touch(f"{workdir}/a/x.txt", truncate=False)
    assert fs.cat(f"{workdir}/a/x.txt") == b"hello" and fs.modified(f"{workdir}/a/x.txt") >= before
    with fs.open(f"{workdir}/a/t.txt", "w") as f:  # text mode
        f.write("line1\nline2\n")
    with fs.open(f"{workdir}/a/t.txt", "r") as f:
        assert f.readlines() == ["line1\n", "line2\n"]
    fs.symlink(f"{workdir}/a/x.txt", f"{workdir}/a/link")
    assert fs.islink(f"{workdir}/a/link") and not fs.islink(f"{workdir}/a/x.txt")
    assert fs.cat(f"{workdir}/a/link") == b"hello"
    fs.chmod(f"{workdir}/a/x.txt", 0o640)
    assert fs.info(f"{workdir}/a/x.txt")["mode"] & 0o777 == 0o640
    fs.rm(f"{workdir}/a/*.txt")
    assert fs.ls(f"{workdir}/a", detail=False) == [f"{workdir}/a/link"]
    # A forked child (smallpond's executors fork) gets its own connection, not the parent's loop.
    fs.pipe_file(f"{workdir}/keep", b"hello")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fs.pipe_file(f"{workdir}/from-child", b"child")
            os.write(wfd, fs.cat(f"{workdir}/keep"))
            os._exit(0)
        except BaseException as exc:
            os.write(wfd, repr(exc).encode())
            os._exit(1)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as f:
        assert f.read() == b"hello"
    assert os.WEXITSTATUS(status) == 0
    assert fs.cat(f"{workdir}/from-child") == b"child"
