"""Nested partitioning: partition dimensions, ``nested=True``, ``ConsolidateNode(dimensions=...)``,
``{dimension}`` placeholders in SQL, and ``RepeatPartitionNode``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra.smallpond import (
    ConsolidateNode, Context, DataSinkNode, DataSourceNode, Driver, EvenlyDistributedPartitionNode, HashPartitionNode,
    LogicalPlan, ParquetDataSet, RepeatPartitionNode, ShuffleNode, SqlEngineNode, UserDefinedPartitionNode,
)

pytestmark = pytest.mark.unit


def _run(tmp_path, ctx, node, name="out") -> pa.Table:
    out = tmp_path / name
    driver = Driver()
    driver.get_arguments(["--data_root", str(tmp_path / "root"), "--num_executors", "2"])
    driver.run(LogicalPlan(ctx, DataSinkNode(ctx, (node,), str(out))))
    return pq.read_table(out)


def _source(tmp_path, ctx, nfiles=3, rows=40):
    paths = []
    for i in range(nfiles):
        p = tmp_path / f"in-{i}.parquet"
        pq.write_table(pa.table({"id": list(range(i * rows, (i + 1) * rows))}), p)
        paths.append(str(p))
    return DataSourceNode(ctx, ParquetDataSet(paths))


def _a_by_b(ctx, src):
    outer = ShuffleNode(ctx, (src,), 3, "id % 3", dimension="A")
    return ShuffleNode(ctx, (outer,), 2, "(id // 3) % 2", dimension="B", nested=True)


def test_nested_shuffle_gives_the_product_of_dimensions(tmp_path):
    ctx = Context()
    inner = _a_by_b(ctx, _source(tmp_path, ctx))
    assert inner.partition_dims == [("A", 3), ("B", 2)] and inner.num_partitions == 6
    assert "[6 partition(s) = A:3 x B:2]" in LogicalPlan(ctx, inner).explain_str()
    node = SqlEngineNode(ctx, (inner,), "select id, {A} as a, {B} as b, {__data_partition__} as flat from {0}")
    assert node.num_partitions == 6
    got = _run(tmp_path, ctx, node).to_pydict()
    assert sorted(got["id"]) == list(range(120))
    for i, a, b, flat in zip(got["id"], got["a"], got["b"], got["flat"]):
        assert (a, b, flat) == (i % 3, (i // 3) % 2, (i % 3) * 2 + (i // 3) % 2)


def test_consolidate_by_dimension_merges_the_inner_one(tmp_path):
    ctx = Context()
    inner = _a_by_b(ctx, _source(tmp_path, ctx))
    by_a = ConsolidateNode(ctx, inner, ["A"])
    assert by_a.num_partitions == 3 and by_a.partition_dims == [("A", 3)]
    node = SqlEngineNode(ctx, (by_a,), "select {A} as a, {__data_partition__} as p, count(*) as n, "
                                       "count(distinct id % 3) as mods, min(id % 3) as m from {0}")
    got = _run(tmp_path, ctx, node, "o1").sort_by("p").to_pydict()
    assert got == {"a": [0, 1, 2], "p": [0, 1, 2], "n": [40, 40, 40], "mods": [1, 1, 1], "m": [0, 1, 2]}
    ctx = Context()
    everything = ConsolidateNode(ctx, _a_by_b(ctx, _source(tmp_path, ctx)), [])
    assert everything.num_partitions == 1
    got = _run(tmp_path, ctx, SqlEngineNode(ctx, (everything,), "select count(*) as n from {0}"), "o2")
    assert got.column("n").to_pylist() == [120]


def test_nested_evenly_distributed_and_user_defined(tmp_path):
    ctx = Context()
    outer = HashPartitionNode(ctx, (_source(tmp_path, ctx),), 2, ["id"], dimension="H")
    by_files = EvenlyDistributedPartitionNode(ctx, (outer,), 2, dimension="F", nested=True)
    by_rows = EvenlyDistributedPartitionNode(ctx, (outer,), 3, dimension="R", nested=True, partition_by_rows=True)
    user = UserDefinedPartitionNode(ctx, (outer,), 2, "U", True, partition_func=lambda rt, ds: [ds, ParquetDataSet([])])
    q = "select {H} as h, __data_partition__ as stored, {__data_partition__} as flat, count(*) as n from {0} group by all"
    a = _run(tmp_path, ctx, SqlEngineNode(ctx, (by_files,), q), "a").to_pydict()
    assert sum(a["n"]) == 120 and a["h"] == a["stored"]  # sub-partitions never mix outer partitions
    b = _run(tmp_path, ctx, SqlEngineNode(ctx, (by_rows,), q), "b").sort_by("flat").to_pydict()
    assert b["flat"] == list(range(6)) and b["h"] == [0, 0, 0, 1, 1, 1] and sum(b["n"]) == 120
    per_h = {h: sum(n for hh, n in zip(b["h"], b["n"]) if hh == h) for h in (0, 1)}
    for h, n in zip(b["h"], b["n"]):  # rows split evenly inside each outer partition
        assert abs(n - per_h[h] / 3) <= 1
    c = _run(tmp_path, ctx, SqlEngineNode(ctx, (user,), "select {U} as u, count(*) as n from {0}"), "c").to_pydict()
    assert sorted(zip(c["u"], c["n"])) == [(0, per_h[0]), (0, per_h[1]), (1, 0), (1, 0)]


def test_repeat_partition_pairs_every_partition_with_every_other(tmp_path):
    # a partitioned cross join: left split by L (2) and each repeated over R (3); right repeated over
    # L and split by R inside; partition (l, r) pairs left part l with right part r, so the 6
    # partial joins together give every (left, right) pair exactly once
    ctx = Context()
    src = _source(tmp_path, ctx, nfiles=1, rows=12)
    left = RepeatPartitionNode(ctx, (ShuffleNode(ctx, (src,), 2, "id % 2", dimension="L"),), 3, "R")
    right = ShuffleNode(ctx, (RepeatPartitionNode(ctx, (src,), 2, "L"),), 3, "id % 3", dimension="R", nested=True)
    assert left.partition_dims == right.partition_dims == [("L", 2), ("R", 3)]
    join = SqlEngineNode(ctx, (left, right), "select {0}.id as l, {1}.id as r, {L} as lp, {R} as rp "
                                             "from {0} cross join {1}")
    got = _run(tmp_path, ctx, join).to_pydict()
    assert sorted(zip(got["l"], got["r"])) == [(a, b) for a in range(12) for b in range(12)]
    for l, r, lp, rp in zip(got["l"], got["r"], got["lp"], got["rp"]):
        assert (l % 2, r % 3) == (lp, rp)
    ctx = Context()
    rep = RepeatPartitionNode(ctx, (ShuffleNode(ctx, (_source(tmp_path, ctx, 1, 12),), 3, "id % 3", dimension="R"),), 2, "L")
    got = _run(tmp_path, ctx, SqlEngineNode(ctx, (rep,), "select count(*) as n, {R} as r, {L} as l from {0}"), "o2")
    assert sorted(zip(got.column("r").to_pylist(), got.column("l").to_pylist(), got.column("n").to_pylist())) == \
        [(r, l, 4) for r in range(3) for l in range(2)]


def test_nested_errors(tmp_path):
    ctx = Context()
    src = _source(tmp_path, ctx)
    outer = ShuffleNode(ctx, (src,), 3, "id % 3", dimension="A")
    with pytest.raises(ValueError, match="already used"):
        ShuffleNode(ctx, (outer,), 2, "id % 2", dimension="A", nested=True)
    with pytest.raises(ValueError, match=r"unknown partition dimension\(s\) \['Z'\]"):
        ConsolidateNode(ctx, outer, ["Z"])
    with pytest.raises(TypeError, match="list of dimension names"):
        ConsolidateNode(ctx, outer, "A")
    with pytest.raises(ValueError, match="dimension name"):
        RepeatPartitionNode(ctx, (outer,), 2, "")
    inner = ShuffleNode(ctx, (outer,), 2, "id % 2", dimension="B", nested=True)
    other = ShuffleNode(ctx, (src,), 5, "id % 5", dimension="C")
    with pytest.raises(ValueError, match="same number of partitions"):
        SqlEngineNode(ctx, (inner, other), "select * from {0} join {1} using (id)")


def test_nested_shuffle_after_a_fused_sql_step(tmp_path):
    # the optimizer folds the filter into the nested shuffle's producers; dimensions must survive it
    ctx = Context()
    outer = ShuffleNode(ctx, (_source(tmp_path, ctx),), 3, "id % 3", dimension="A")
    kept = SqlEngineNode(ctx, (outer,), "select * from {0} where id >= 30")
    inner = ShuffleNode(ctx, (kept,), 2, "id % 2", dimension="B", nested=True)
    node = SqlEngineNode(ctx, (inner,), "select id, {A} as a, {B} as b from {0}")
    got = _run(tmp_path, ctx, node).to_pydict()
    assert sorted(got["id"]) == list(range(30, 120))
    assert all((a, b) == (i % 3, i % 2) for i, a, b in zip(got["id"], got["a"], got["b"]))
    from openinfra.smallpond import optimize

    text = optimize(LogicalPlan(ctx, node)).explain_str()
    assert "producers run" in text  # the filter really was folded into the shuffle


def test_rerun_of_a_nested_plan_skips_finished_tasks_and_a_changed_split_reruns(tmp_path):
    from openinfra.smallpond import RangePartitionNode

    files = _source(tmp_path, Context()).dataset  # written once: rewriting them would change the task keys

    def plan(split):
        ctx = Context()
        src = DataSourceNode(ctx, files)

        ranges = RangePartitionNode(ctx, (src,), [split], "R", column="id")
        inner = ShuffleNode(ctx, (ranges,), 2, "id % 2", dimension="P", nested=True)
        q = SqlEngineNode(ctx, (inner,), "select {R} as r, {P} as p, count(*) as n from {0}")
        return LogicalPlan(ctx, DataSinkNode(ctx, (q,), str(tmp_path / f"out-{split}")))

    def run(split):
        driver = Driver()
        driver.get_arguments(["--data_root", str(tmp_path / "root"), "--job_id", "nested-job", "--num_executors", "2"])
        driver.run(plan(split))
        return driver.stats

    first = run(60)
    assert first.executed > 0
    again = run(60)
    assert again.executed == 0 and again.skipped > 0
    changed = run(30)
    assert changed.executed > 0
    got = pq.read_table(tmp_path / "out-30").sort_by([("r", "ascending"), ("p", "ascending")])
    assert got.column("n").to_pylist() == [15, 15, 45, 45]
