"""Empty partitions (hash/range partitioning of a few rows into many partitions, filters that drop
every row) flow through every later step: SQL over them gives no rows, user functions and consumers
see an empty but typed table, and the final result is what one DuckDB query over all data gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.unit

ROWS = [(3, "c", 1.5, date(2024, 1, 3)), (1, "a", -2.0, date(2024, 1, 1)), (7, "g", 0.25, date(2024, 1, 7)),
        (1, "a2", 4.0, date(2024, 1, 2)), (5, "e", 3.0, date(2024, 1, 5))]


@pytest.fixture
def few_rows(tmp_path):
    path = tmp_path / "few.parquet"
    ids, names, xs, days = zip(*ROWS)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int32()), "name": list(names), "x": list(xs),
                             "day": pa.array(days, pa.date32())}), path)
    return str(path)


def _duckdb(query: str, path: str) -> pa.Table:
    con = duckdb.connect()
    con.execute("SET arrow_large_buffer_size = true")  # as the tasks' connections
    rel = con.sql(query.replace("{0}", f"read_parquet('{path}')"))
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def _sorted(table: pa.Table, *keys: str) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def _add_flag(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.append_column("big", pc.greater(batch.column("x"), 1.0))


def test_hash_few_rows_into_many_partitions_then_sql_equals_duckdb(sp, few_rows):
    # 5 rows (4 distinct keys) into 16 partitions: at least 12 partitions are empty at every step.
    parts = sp.read_parquet(few_rows).repartition(16, hash_by="id")
    assert parts.to_arrow().schema.names == ["id", "name", "x", "day"]  # no shuffle bookkeeping column leaks

    query = "select id, count(*) as n, sum(x) as sx, max(day) as last, string_agg(name, ',' order by name) as names from {0} group by id"
    got = _sorted(sp.partial_sql(query, parts).to_arrow(), "id")
    want = _sorted(_duckdb(query, few_rows), "id")
    assert got.schema == want.schema and got.to_pylist() == want.to_pylist()

    star = _sorted(sp.partial_sql("select * from {0} where x > 0", parts).to_arrow(), "id", "name")
    assert star.equals(_sorted(_duckdb("select * from {0} where x > 0", few_rows), "id", "name"))

    # the corpus pipeline's shape: SQL over the shuffle, a batch function, a random shuffle, SQL again
    chained = sp.partial_sql("select id, name, x from {0} where id > 1", parts).map_batches(_add_flag, batch_size=2)
    final = sp.partial_sql("select big, count(*) as n, sum(x) as sx from {0} group by big",
                           chained.random_shuffle().repartition(16, hash_by="big"))
    want = _duckdb("select x > 1.0 as big, count(*) as n, sum(x) as sx from {0} where id > 1 group by big", few_rows)
    assert _sorted(final.to_arrow(), "big").to_pylist() == _sorted(want, "big").to_pylist()
    assert chained.count() == 3


@pytest.mark.parametrize("middle", ["sql", "arrow_batch", "pandas_batch"])
def test_all_rows_filtered_out_then_sql_gives_empty_typed_result(sp, few_rows, middle):
    df = sp.read_parquet(few_rows).repartition(4, hash_by="id").filter("x > 1e9")  # every partition empty
    if middle == "sql":
        df = df.map("id, name, x, day, x > 1.0 as big")
    elif middle == "arrow_batch":
        df = df.map_batches(_add_flag)
    else:
        from openinfra.smallpond.node import PandasBatchNode

        def add_flag(_rt, frames):
            out = frames[0].copy()
            out["big"] = out["x"] > 1.0
            return out

        df = df._new(PandasBatchNode(sp._ctx, (df.plan,), process_func=add_flag))
    query = "select id + 1 as id1, upper(name) as name, day, big from {0} where not big or big"
    result = sp.partial_sql(query, df)
    got = result.to_arrow()
    want = _duckdb("select id + 1 as id1, upper(name) as name, day, x > 1.0 as big from {0} where x > 1e9", few_rows)
    assert got.num_rows == 0 and result.count() == 0 and result.take_all() == []
    assert got.schema.names == ["id1", "name", "day", "big"]
    assert got.schema.types == want.schema.types  # int32 + 1 -> int32, large_string, date32, bool


def test_stream_yielding_nothing_for_empty_partitions_still_counts(sp, few_rows):
    # A streaming function that yields nothing leaves no types behind; counting and writing still work.
    df = sp.read_parquet(few_rows).repartition(8, hash_by="id").map_batches(lambda it: (t for t in it), streaming=True)
    assert df.count() == len(ROWS)


def test_corpus_cli_with_empty_partitions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = ["def a():\n    return 1\n" * 8, "x = [i * i for i in range(10)]\n" * 6, "def a():\n    return 1\n" * 8]
    for i, text in enumerate(texts):  # two identical files: one duplicate
        (src / f"m{i}.py").write_text(text)
    (src / "empty.py").write_text("")
    out = tmp_path / "out"
    # 4 files into 8 partitions: most partitions are empty at every stage of the pipeline
    cmd = [sys.executable, "-m", "openinfra", "data", "corpus", "--source", str(src), "--output", str(out),
           "--seq-len", "16", "--npartitions", "8", "--data-root", str(tmp_path / "root"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(os.path.dirname(__file__), "..", "..", "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 unique documents (1 duplicates)" in proc.stdout
    meta = json.loads((out / "_meta.json").read_text())
    table = pq.read_table(out)
    assert table.schema.names == ["tokens"] and table.schema.field("tokens").type == pa.list_(pa.uint16())
    assert meta["documents"] == 2 and table.num_rows == meta["sequences"] > 0
    assert all(len(t) == 16 for t in table.column("tokens").to_pylist())
