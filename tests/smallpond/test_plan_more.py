"""The rest of smallpond's plan API: @udf / UDFType, RangePartitionNode, UserDefinedPartitionNode,
LoadPartitionedDataSetNode."""

from __future__ import annotations

import os
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra.smallpond import (
    Context, DataSinkNode, DataSourceNode, Driver, HashPartitionNode, LoadPartitionedDataSetNode, LogicalPlan,
    ParquetDataSet, RangePartitionNode, SqlEngineNode, UDFAnyParameters, UDFListType, UDFMapType, UDFStructType,
    UDFType, UserDefinedPartitionNode, udf,
)
from openinfra.smallpond.task import SqlError
from openinfra.smallpond.udf import to_duckdb_params

pytestmark = pytest.mark.unit


def _run(tmp_path, ctx, node, name="out") -> pa.Table:
    out = tmp_path / name
    driver = Driver()
    driver.get_arguments(["--data_root", str(tmp_path / "root"), "--num_executors", "2"])
    driver.run(LogicalPlan(ctx, DataSinkNode(ctx, (node,), str(out))))
    return pq.read_table(out)


def _inputs(root, nfiles=3, rows=40):
    paths = []
    for i in range(nfiles):
        p = root / f"in-{i}.parquet"
        ids = list(range(i * rows, (i + 1) * rows))
        pq.write_table(pa.table({"id": ids, "name": [f"n{j:04d}" for j in ids]}), p)
        paths.append(str(p))
    return paths


# --- @udf and UDFType -----------------------------------------------------------------------

@udf(params=[UDFType.BIGINT, UDFType.BIGINT], return_type=UDFType.BIGINT, name="py_gcd")
def gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@udf(params=[UDFType.VARCHAR], return_type=UDFListType(UDFType.VARCHAR), name="split_n")
def split_on_n(s):
    return s.split("n")


@udf(params=[UDFType.BIGINT], return_type=UDFType.BIGINT, use_arrow_type=True)
def times3(arr):
    import pyarrow.compute as pc

    return pc.multiply(arr, 3)


def test_udf_decorator_in_sql_nodes(tmp_path):
    assert gcd(12, 18) == 6 and gcd.name == "py_gcd" and split_on_n.name == "split_n"
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    node = SqlEngineNode(ctx, (src,), "select id, py_gcd(id, 12) as g, split_n(name) as parts, times3(id) as t from {0}",
                         udfs=[gcd, split_on_n, times3])
    got = _run(tmp_path, ctx, node).sort_by("id").to_pydict()
    assert got["id"] == list(range(120))
    assert got["g"] == [gcd.func(i, 12) for i in range(120)]
    assert got["parts"][7] == ["", "0007"]
    assert got["t"] == [3 * i for i in range(120)]


def test_udf_types_map_to_duckdb():
    assert str(UDFType.BIGINT.to_duckdb_type()) == "BIGINT"
    assert str(UDFType.TIMESTAMP_TZ.to_duckdb_type()) == "TIMESTAMP WITH TIME ZONE"
    assert str(UDFListType(UDFType.INTEGER).to_duckdb_type()) == "INTEGER[]"
    assert str(UDFMapType(UDFType.VARCHAR, UDFType.DOUBLE).to_duckdb_type()) == "MAP(VARCHAR, DOUBLE)"
    assert str(UDFStructType({"host": "VARCHAR", "port": "INTEGER"}).to_duckdb_type()) == "STRUCT(host VARCHAR, port INTEGER)"
    assert to_duckdb_params(UDFAnyParameters()) is None
    assert [str(t) for t in to_duckdb_params([UDFType.DOUBLE, UDFType.BLOB])] == ["DOUBLE", "BLOB"]


def test_udf_bad_arguments():
    with pytest.raises(TypeError, match="params"):
        udf(params=["BIGINT"], return_type=UDFType.BIGINT, name="f")(lambda x: x)
    with pytest.raises(TypeError, match="return_type"):
        udf(params=[UDFType.BIGINT], return_type=int, name="f")(lambda x: x)
    with pytest.raises(ValueError, match="udf name"):
        udf(params=[UDFType.BIGINT], return_type=UDFType.BIGINT, name="bad-name")(lambda x: x)
    with pytest.raises(TypeError, match="child"):
        UDFListType("INTEGER")


def test_udf_signature_change_reruns_the_task():
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(["/nonexistent/x.parquet"]))
    a = SqlEngineNode(ctx, (src,), "select f(1)", udfs=[udf([UDFType.BIGINT], UDFType.BIGINT, name="f")(abs)])
    ctx2 = Context()
    src2 = DataSourceNode(ctx2, ParquetDataSet(["/nonexistent/x.parquet"]))
    b = SqlEngineNode(ctx2, (src2,), "select f(1)", udfs=[udf([UDFType.DOUBLE], UDFType.DOUBLE, name="f")(abs)])
    assert a.spec() != b.spec()  # the checkpoint key covers the declared types, not just the code


# --- RangePartitionNode ------------------------------------------------------------------------

def test_range_partition_int_keys_and_nulls(tmp_path):
    paths = _inputs(tmp_path)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"id": pa.array([None, None], pa.int64()), "name": ["x", "y"]}), nulls)
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(paths + [str(nulls)]))
    rp = RangePartitionNode(ctx, (src,), [30, 75, 100], column="id")
    assert rp.num_partitions == 4
    node = SqlEngineNode(ctx, (rp,), "select id, __data_partition__ as p, {__data_partition__} as task_p from {0}")
    got = _run(tmp_path, ctx, node).to_pydict()
    assert len(got["id"]) == 122
    bounds = [None, 30, 75, 100, None]
    for i, p, tp in zip(got["id"], got["p"], got["task_p"]):
        assert p == tp
        if i is None:
            assert p == 0
            continue
        lo, hi = bounds[p], bounds[p + 1]
        assert (lo is None or i >= lo) and (hi is None or i < hi), (i, p)
    assert sorted(i for i in got["id"] if i is not None) == list(range(120))


def test_range_partition_sorts_globally_on_binary_keys(tmp_path):
    # the GraySort pattern: range-partition by key, sort each partition, concatenate in order
    keys = [zlib.crc32(str(i).encode()).to_bytes(4, "big") for i in range(300)]
    p = tmp_path / "keys.parquet"
    pq.write_table(pa.table({"key": keys, "v": list(range(300))}), p)
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet([str(p)]))
    rp = RangePartitionNode(ctx, (src,), [b"\x40", b"\x80", b"\xc0"], column="key", drop_partition_column=True)
    node = SqlEngineNode(ctx, (rp,), "select key, v, {__data_partition__} as part from {0} order by key")
    got = _run(tmp_path, ctx, node).sort_by([("part", "ascending")])
    assert "__data_partition__" not in got.column_names
    per_part: dict[int, list[bytes]] = {}
    for k, part in zip(got.column("key").to_pylist(), got.column("part").to_pylist()):
        per_part.setdefault(part, []).append(k)
    assert set(per_part) == {0, 1, 2, 3}
    concatenated = [k for part in sorted(per_part) for k in sorted(per_part[part])]
    assert concatenated == sorted(keys)


def test_range_partition_strings_and_expression(tmp_path):
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    rp = RangePartitionNode(ctx, (src,), ["n0050", "n0090"], column="name")
    node = SqlEngineNode(ctx, (rp,), "select min(id) as lo, max(id) as hi, {__data_partition__} as p from {0}")
    got = _run(tmp_path, ctx, node, "o1").sort_by("p").to_pydict()
    assert (got["lo"], got["hi"]) == ([0, 50, 90], [49, 89, 119])
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    rp = RangePartitionNode(ctx, (src,), [10], column="id % 20")
    node = SqlEngineNode(ctx, (rp,), "select count(*) as n, {__data_partition__} as p from {0}")
    assert _run(tmp_path, ctx, node, "o2").sort_by("p").column("n").to_pylist() == [60, 60]


def test_range_partition_bad_arguments(tmp_path):
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    with pytest.raises(ValueError, match="column="):
        RangePartitionNode(ctx, (src,), [1, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        RangePartitionNode(ctx, (src,), [5, 2], column="id")
    with pytest.raises(ValueError, match="non-empty"):
        RangePartitionNode(ctx, (src,), [], column="id")
    with pytest.raises(TypeError, match="SQL literal"):
        RangePartitionNode(ctx, (src,), [object()], column="id")
    with pytest.raises(TypeError, match="comparable"):
        RangePartitionNode(ctx, (src,), [1, "a"], column="id")
    rp = RangePartitionNode(ctx, (src,), [1], column="missing_col")
    with pytest.raises(SqlError, match="missing_col"):
        _run(tmp_path, ctx, SqlEngineNode(ctx, (rp,), "select * from {0}"))


# --- UserDefinedPartitionNode ------------------------------------------------------------------

class ByFileIndex(UserDefinedPartitionNode):
    """smallpond's test partitions files by a hash of the name; a stable digest keeps runs repeatable."""

    def partition(self, runtime_ctx, dataset):
        out = [ParquetDataSet([]) for _ in range(self.npartitions)]
        for path in dataset.resolved_paths:
            out[zlib.crc32(os.path.basename(path).encode()) % self.npartitions].paths.append(path)
        return out


def test_user_defined_partition_subclass(tmp_path):
    paths = _inputs(tmp_path, nfiles=6, rows=10)
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(paths))
    parts = ByFileIndex(ctx, (src,), npartitions=3)
    node = SqlEngineNode(ctx, (parts,), "select count(*) as n, {__data_partition__} as p from {0}")
    got = _run(tmp_path, ctx, node).sort_by("p").to_pydict()
    expect = [0, 0, 0]
    for path in paths:
        expect[zlib.crc32(os.path.basename(path).encode()) % 3] += 10
    assert got["p"] == [0, 1, 2] and got["n"] == expect


def test_user_defined_partition_func_over_partitions_with_empty_outputs(tmp_path):
    # two input partitions (a hash shuffle), each split by the user into 2; one output is empty
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    shuffled = HashPartitionNode(ctx, (src,), 2, ["id"])
    seen = []

    def keep_all_in_first(runtime_ctx, dataset):
        seen.append(runtime_ctx.partition)
        return [dataset, ParquetDataSet([])]

    parts = UserDefinedPartitionNode(ctx, (shuffled,), 2, partition_func=keep_all_in_first)
    node = SqlEngineNode(ctx, (parts,), "select count(*) as n, {__data_partition__} as p from {0}")
    got = _run(tmp_path, ctx, node).sort_by("p").to_pydict()
    assert got == {"n": [120, 0], "p": [0, 1]}
    assert sorted(seen) == [0, 1]


def test_user_defined_partition_errors(tmp_path):
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    with pytest.raises(ValueError, match="override partition"):
        UserDefinedPartitionNode(ctx, (src,), 2)
    with pytest.raises(TypeError, match="partition_func"):
        UserDefinedPartitionNode(ctx, (src,), 2, partition_func=3)
    bad = UserDefinedPartitionNode(ctx, (src,), 3, partition_func=lambda rt, ds: [ds])
    with pytest.raises(ValueError, match="list of 3 datasets, got 1"):
        _run(tmp_path, ctx, SqlEngineNode(ctx, (bad,), "select * from {0}"))


# --- LoadPartitionedDataSetNode ----------------------------------------------------------------

def _keyed_files(root, keys):
    paths = []
    for i, k in enumerate(keys):
        p = root / f"k-{i}.parquet"
        pq.write_table(pa.table({"v": [i * 10 + j for j in range(5)], "__data_partition__": [k] * 5}), p)
        paths.append(str(p))
    return paths


def test_load_partitioned_by_column(tmp_path):
    paths = _keyed_files(tmp_path, [2, 0, 2, 1, 0])
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"v": pa.array([], pa.int64()), "__data_partition__": pa.array([], pa.int64())}), empty)
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(paths + [str(empty)]))
    parts = LoadPartitionedDataSetNode(ctx, (src,), 4, data_partition_column="__data_partition__")
    node = SqlEngineNode(ctx, (parts,), "select count(*) as n, coalesce(min(__data_partition__), -1) as key, "
                                        "{__data_partition__} as p from {0}")
    got = _run(tmp_path, ctx, node).sort_by("p").to_pydict()
    assert got == {"n": [10, 5, 10, 0], "key": [0, 1, 2, -1], "p": [0, 1, 2, 3]}


def test_load_partitioned_hive_directories(tmp_path):
    paths = []
    for k in (0, 1, 1):
        d = tmp_path / "ds" / f"bucket={k}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{len(paths)}.parquet"
        pq.write_table(pa.table({"v": [k] * 3}), p)
        paths.append(str(p))
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(paths))
    parts = LoadPartitionedDataSetNode(ctx, (src,), 2, dimension="bucket", hive_partitioning=True)
    node = SqlEngineNode(ctx, (parts,), "select sum(v) as s, count(*) as n, {__data_partition__} as p from {0}")
    got = _run(tmp_path, ctx, node).sort_by("p").to_pydict()
    assert got == {"s": [0, 6], "n": [3, 6], "p": [0, 1]}


def test_load_partitioned_errors(tmp_path):
    with pytest.raises(ValueError, match="dimension= or data_partition_column="):
        LoadPartitionedDataSetNode(Context(), (DataSourceNode(Context(), None),), 2)
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"v": [1, 2], "__data_partition__": [0, 1]}), mixed)
    for files, npart, msg in (([str(mixed)], 2, "not unique"), (_keyed_files(tmp_path, [5]), 2, "out of range 0-1")):
        ctx = Context()
        src = DataSourceNode(ctx, ParquetDataSet(files))
        parts = LoadPartitionedDataSetNode(ctx, (src,), npart, data_partition_column="__data_partition__")
        with pytest.raises(ValueError, match=msg):
            _run(tmp_path, ctx, SqlEngineNode(ctx, (parts,), "select * from {0}"))
    ctx = Context()
    parts = LoadPartitionedDataSetNode(ctx, (DataSourceNode(ctx, ParquetDataSet([str(mixed)])),), 2, dimension="nope")
    with pytest.raises(ValueError, match="no column 'nope'"):
        _run(tmp_path, ctx, SqlEngineNode(ctx, (parts,), "select * from {0}"))


def test_reload_a_hash_partitioned_output_by_its_stored_keys(tmp_path):
    # smallpond's test_load_partitioned_datasets: write a hash partitioning, then regroup its files
    # with DataSetPartitionNode(data_partition_column=...) without moving rows
    from openinfra.smallpond import DataSetPartitionNode

    ctx = Context()
    hashed = HashPartitionNode(ctx, (DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path))),), 4, ["id"])
    first = _run(tmp_path, ctx, SqlEngineNode(ctx, (hashed,), "select * from {0}"), "hashed")
    expect = sorted(zip(first.column("id").to_pylist(), first.column("__data_partition__").to_pylist()))
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet([str(tmp_path / "hashed" / "*.parquet")]))
    parts = DataSetPartitionNode(ctx, (src,), 4, data_partition_column="__data_partition__")
    assert isinstance(parts, LoadPartitionedDataSetNode)
    got = _run(tmp_path, ctx, SqlEngineNode(ctx, (parts,), "select id, {__data_partition__} as p from {0}"), "again")
    assert sorted(zip(got.column("id").to_pylist(), got.column("p").to_pylist())) == expect


def test_udf_module_paths(tmp_path):
    # smallpond's udf_module_paths: a Python file whose create_duckdb_udfs(conn) registers functions
    module = tmp_path / "my_udfs.py"
    module.write_text("import duckdb\n\n"
                      "def create_duckdb_udfs(conn):\n"
                      "    conn.create_function('plus_k', lambda x: x + 1000, [duckdb.sqltype('BIGINT')], duckdb.sqltype('BIGINT'))\n")
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))
    node = SqlEngineNode(ctx, (src,), "select plus_k(id) as v from {0}", udf_module_paths=[str(module)])
    got = _run(tmp_path, ctx, node)
    assert sorted(got.column("v").to_pylist()) == [i + 1000 for i in range(120)]
    with pytest.raises(FileNotFoundError, match="udf module not found"):
        SqlEngineNode(ctx, (src,), "select 1", udf_module_paths=[str(tmp_path / "missing.py")])
    spec_before = node.spec()
    module.write_text(module.read_text().replace("1000", "2000"))
    assert node.spec() != spec_before  # an edited module reruns the tasks that use it


def test_user_partition_exception_names_the_node(tmp_path):
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(_inputs(tmp_path)))

    def broken(runtime_ctx, dataset):
        raise KeyError("no such host")

    node = UserDefinedPartitionNode(ctx, (src,), 2, partition_func=broken)
    from openinfra.smallpond import TaskFailed

    with pytest.raises(TaskFailed, match=r"UserDefinedPartitionNode-\d+\[0/1\].*partition\(\) raised KeyError"):
        _run(tmp_path, ctx, SqlEngineNode(ctx, (node,), "select * from {0}"))
