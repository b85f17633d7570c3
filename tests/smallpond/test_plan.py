"""The low-level plan API, the optimizer, explain / plot, and the error messages."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra import smallpond
from openinfra.smallpond import (
    ArrowComputeNode, Context, DataSetPartitionNode, DataSinkNode, DataSourceNode, Driver, HashPartitionNode,
    LimitNode, LogicalPlan, PandasComputeNode, ParquetDataSet, ProjectionNode, PythonScriptNode, SqlEngineNode,
    UnionNode, optimize,
)

pytestmark = pytest.mark.unit


def _write_inputs(root, nfiles=4, rows=50):
    paths = []
    for i in range(nfiles):
        p = root / f"in-{i}.parquet"
        pq.write_table(pa.table({"id": list(range(i * rows, (i + 1) * rows)), "g": [j % 7 for j in range(rows)]}), p)
        paths.append(str(p))
    return paths


def test_low_level_pipeline_from_the_docs(tmp_path):
    # smallpond's docs: DataSourceNode -> DataSetPartitionNode -> SqlEngineNode, run by a Driver
    inputs = _write_inputs(tmp_path)
    ctx = Context()
    node = DataSourceNode(ctx, ParquetDataSet(inputs))
    node = DataSetPartitionNode(ctx, (node,), npartitions=2)
    node = SqlEngineNode(ctx, (node,), "SELECT * FROM {0}")
    out = tmp_path / "out"
    plan = LogicalPlan(ctx, DataSinkNode(ctx, (node,), str(out)))
    driver = Driver()
    driver.get_arguments(["--data_root", str(tmp_path / "root"), "--num_executors", "2"])
    driver.run(plan)
    got = pq.read_table(out)
    assert sorted(got.column("id").to_pylist()) == list(range(200))
    assert (out / "_manifest.txt").read_text().count(".parquet") == 2


class Doubler(ArrowComputeNode):
    def process(self, runtime_ctx, input_tables):
        t = input_tables[0]
        return t.set_column(0, "id", pa.compute.multiply(t.column("id"), 2))


class CountRows(PythonScriptNode):
    def process(self, runtime_ctx, input_datasets, output_path):
        n = sum(ds.num_rows for ds in input_datasets)
        pq.write_table(pa.table({"partition": [runtime_ctx.partition], "rows": [n]}), os.path.join(output_path, "count.parquet"))
        return True


def test_compute_nodes_hash_partition_union_projection(tmp_path):
    inputs = _write_inputs(tmp_path)
    ctx = Context()
    src = DataSourceNode(ctx, ParquetDataSet(inputs))
    parts = HashPartitionNode(ctx, (src,), 3, ["g"], drop_partition_column=True)
    doubled = Doubler(ctx, (parts,))
    pandas = PandasComputeNode(ctx, (parts,), process_func=lambda rt, dfs: dfs[0].assign(id=dfs[0].id + 1))
    union = UnionNode(ctx, (doubled, pandas))
    counted = CountRows(ctx, (union,))
    projected = ProjectionNode(ctx, parts, ["g"])
    grouped = SqlEngineNode(ctx, (projected,), "select g, count(*) as n from {0} group by g")
    root = DataSinkNode(ctx, (counted, grouped), str(tmp_path / "sink"), type="manifest")
    driver = Driver()
    driver.get_arguments(["--data_root", str(tmp_path / "root"), "--num_executors", "2"])
    [sink] = driver.run(LogicalPlan(ctx, root))
    tables = [pq.read_table(p) for p in sink.resolved_paths]
    counts = [t for t in tables if "rows" in t.column_names]
    groups = pa.concat_tables([t for t in tables if "n" in t.column_names])
    assert sum(sum(t.column("rows").to_pylist()) for t in counts) == 400  # 200 doubled + 200 incremented
    assert sorted(groups.column("g").to_pylist()) == list(range(7))
    assert sum(groups.column("n").to_pylist()) == 200
    assert len(counts) == 3  # one per partition


def test_optimizer_fuses_sql_chains(sp):
    df = sp.from_items([{"a": i, "b": i % 3} for i in range(30)])
    chained = df.filter("a > 3").map("a, b, a * 2 as c").filter("b = 1").map("c")
    opt = chained._optimized()
    assert isinstance(opt, SqlEngineNode) and len(opt.fused_from) == 4
    assert isinstance(opt.input_deps[0], DataSourceNode)
    text = chained.explain()
    assert "== optimized plan ==" in text and "__fused_" in text
    assert sorted(r["c"] for r in chained.take_all()) == [2 * a for a in range(4, 30) if a % 3 == 1]
    before = sp.stats.executed
    assert chained.count() == len([a for a in range(4, 30) if a % 3 == 1])
    assert sp.stats.executed == before, "a computed DataFrame is not run again"


def test_optimizer_keeps_shared_and_computed_nodes(sp):
    df = sp.from_items(list(range(10)))
    shared = df.filter("item > 2")
    a, b = shared.map("item * 2 as x"), shared.map("item * 3 as y")
    plan = LogicalPlan(sp._ctx, UnionNode(sp._ctx, (a.plan, b.plan)))
    opt = optimize(plan).root_node
    assert all(d.input_deps[0] is shared.plan for d in opt.input_deps), "a node used twice is not inlined"
    shared.compute()
    assert a._optimized().input_deps[0] is shared.plan, "a computed node is reused, not fused"
    assert sorted(r["x"] for r in a.take_all()) == [2 * i for i in range(3, 10)]


def test_plan_picture(sp, tmp_path):
    left = sp.from_items([{"k": i} for i in range(10)]).repartition(2, hash_by="k")
    right = sp.from_items([{"k": i} for i in range(10)]).repartition(2, hash_by="k")
    joined = sp.partial_sql("select * from {0} join {1} using (k)", left, right).filter("k > 2")
    path = tmp_path / "plan.png"
    joined.explain(path=str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_error_mismatched_partitions(sp):
    a = sp.from_items(list(range(10))).repartition(2, by_rows=True)
    b = sp.from_items(list(range(10))).repartition(3, by_rows=True)
    with pytest.raises(ValueError, match="same number of partitions.*2.*3"):
        sp.partial_sql("select * from {0} join {1} using (item)", a, b)


def test_error_missing_files(sp, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        sp.read_parquet(str(tmp_path / "nothing-here" / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        sp.read_csv(str(tmp_path / "missing.tsv"), schema={"a": "varchar"})


def test_error_bad_sql_names_query_and_does_not_retry(sp):
    df = sp.from_items([1, 2, 3]).map("no_such_column + 1 as x")
    with pytest.raises(smallpond.SqlError) as info:
        df.to_arrow()
    msg = str(info.value)
    assert "no_such_column + 1 as x" in msg and "after 1 attempt" in msg


def test_error_bad_arguments(sp):
    df = sp.from_items([1, 2, 3])
    with pytest.raises(ValueError, match="npartitions"):
        df.repartition(0)
    with pytest.raises(ValueError, match="either by= or hash_by="):
        df.repartition(2, by="item", hash_by="item")
    with pytest.raises(TypeError, match="SQL expression or a function"):
        df.map(42)
    with pytest.raises(ValueError, match="refers to \\{1\\}"):
        sp.partial_sql("select * from {0} join {1} using (item)", df)
    with pytest.raises(ValueError, match="limit"):
        df.limit(-1)
    with pytest.raises(ValueError, match="num_executors"):
        smallpond.init(num_executors=0)
    with pytest.raises(ValueError, match="process_func"):
        ArrowComputeNode(Context(), ())


def test_env_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setenv("SP_DATA_ROOT", str(tmp_path / "envroot"))
    monkeypatch.setenv("SP_NUM_EXECUTORS", "3")
    monkeypatch.setenv("SP_JOBID", "envjob")
    monkeypatch.setenv("SP_MAX_RETRIES", "5")
    sp = smallpond.init()
    try:
        assert sp.config.data_root == str(tmp_path / "envroot")
        assert (sp.config.num_executors, sp.config.job_id, sp.config.max_retries) == (3, "envjob", 5)
        assert os.path.isdir(tmp_path / "envroot" / "envjob")
    finally:
        sp.shutdown()
    monkeypatch.setenv("SP_NUM_EXECUTORS", "many")
    with pytest.raises(ValueError, match="SP_NUM_EXECUTORS"):
        smallpond.init()


def test_limit_and_take_on_many_partitions(sp):
    df = sp.from_items(list(range(100))).repartition(5, by_rows=True)
    assert isinstance(df.limit(7).plan, LimitNode)
    assert len(df.take(7)) == 7
    assert df.limit(1000).count() == 100


def test_read_json_and_union_by_name(sp, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1, "s": "a"}\n{"x": 2, "s": "b"}\n')
    df = sp.read_json(str(tmp_path / "a.jsonl"), schema={"x": "BIGINT", "s": "VARCHAR"})
    assert df.take_all() == [{"x": 1, "s": "a"}, {"x": 2, "s": "b"}]
    pq.write_table(pa.table({"x": [1]}), tmp_path / "p1.parquet")
    pq.write_table(pa.table({"y": [2]}), tmp_path / "p2.parquet")
    df = sp.read_parquet([str(tmp_path / "p1.parquet"), str(tmp_path / "p2.parquet")], union_by_name=True)
    assert df.take_all() == [{"x": 1, "y": None}, {"x": None, "y": 2}]
    assert sp.read_parquet(str(tmp_path / "p1.parquet"), columns=["x"]).count() == 1


def test_computed_fused_chain_is_reused_by_consumers(sp):
    base = sp.from_items(list(range(50))).filter("item % 2 = 0").map("item * 10 as x")
    assert base.count() == 25
    ran = sp.stats.executed
    more = base.filter("x > 100")
    assert more.count() == len([i for i in range(0, 50, 2) if i * 10 > 100])
    assert sp.stats.executed == ran + 1, "only the new filter runs; the fused chain's output is reused"


def test_optimizer_folds_sql_into_shuffle_producers(sp):
    df = sp.from_items([{"a": i, "b": i % 4} for i in range(40)]).filter("a >= 8").map("a, b, a * a as sq")
    shuffled = df.repartition(4, hash_by="b")
    opt = shuffled._optimized()
    assert isinstance(opt, HashPartitionNode) and opt.pre_sql is not None
    assert isinstance(opt.input_deps[0], DataSourceNode)
    per_part = sp.partial_sql("select b, count(*) as n, sum(sq) as s from {0} group by b", shuffled)
    got = sorted((r["b"], r["n"], r["s"]) for r in per_part.take_all())
    want = sorted((k, len([a for a in range(8, 40) if a % 4 == k]), sum(a * a for a in range(8, 40) if a % 4 == k)) for k in range(4))
    assert got == want


def my_gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def test_python_udf_in_sql(sp):
    df = sp.from_items([{"a": 12 * i, "b": 18} for i in range(1, 30)]).repartition(3, by_rows=True)
    got = [r["g"] for r in df.map("my_gcd(a, b) as g", udfs=[my_gcd]).take_all()]
    assert got == [my_gcd(12 * i, 18) for i in range(1, 30)]


def test_storage_through_fsspec(tmp_path):
    # "local://" goes through fsspec (as 3fs:// does): DuckDB reads via register_filesystem, tasks
    # commit with fs.mv, sinks copy through fsspec.
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"k": [i % 3 for i in range(30)], "v": list(range(30))}), tmp_path / "in" / "a.parquet")
    url = f"local://{tmp_path}"
    with smallpond.init(data_root=f"{url}/root", num_executors=2) as sp:
        df = sp.read_parquet(f"{url}/in/*.parquet").repartition(2, hash_by="k")
        df = sp.partial_sql("select k, sum(v) as s from {0} group by k", df)
        df.write_parquet(f"{url}/out")
        assert sorted((r["k"], r["s"]) for r in df.take_all()) == [(0, 135), (1, 145), (2, 155)]
        assert sorted(r["k2"] for r in df.map(lambda r: {"k2": r["k"] * 2}).take_all()) == [0, 2, 4]
        assert any(n.startswith("sql-") for n in os.listdir(tmp_path / "root" / sp.config.job_id / "tasks"))
    assert sum(pq.read_table(tmp_path / "out").column("s").to_pylist()) == 435


def test_progress_bar(tmp_path, capsys):
    with smallpond.init(data_root=str(tmp_path), num_executors=2, progress=True) as sp:
        assert sp.from_items(list(range(10))).repartition(2, by_rows=True).map("item + 1 as x").count() == 10
    err = capsys.readouterr()
    text = err.out + err.err
    assert "5/5" in text, text  # materialize + 2 row splits + 2 fused maps, all shown done
