"""Tasks: the unit of execution, one per (node, partition).

A *real* task runs in a worker (a forked process or a Ray task): it opens its own DuckDB, reads its
inputs' files, writes parquet under ``<job>/tasks/.tmp-<key>-<attempt>/`` and returns a manifest;
the worker then renames the directory to ``<job>/tasks/<key>/`` (the checkpoint). A *virtual* task
only rearranges file lists (repartition by files, shuffle consumers, unions, projections) and runs
in the driver in microseconds.

Task keys are content addresses: kind, node parameters, user code and the keys of the inputs, so
a re-run of the same pipeline finds its finished tasks and a changed one does not reuse stale data.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from openinfra.smallpond import storage
from openinfra.smallpond.udf import to_duckdb_params
from openinfra.smallpond.dataset import (
    DataSet, FileSet, ParquetDataSet, arrow_of, merge_datasets, new_connection, schema_from_text,
    schema_to_text,
)

__all__ = ["Task", "RuntimeContext", "TaskFailed", "InjectedFault", "SqlError", "execute_task", "MANIFEST"]

MANIFEST = "_manifest.json"
#: the exit code of a worker that fault injection killed (so the driver can say so)
INJECTED_EXIT_CODE = 17
_PLACEHOLDER = re.compile(r"\{(\d+)\}")


class InjectedFault(RuntimeError):
    """Raised by the fault-injection knob (``fault_inject_prob``); always retried."""


class SqlError(RuntimeError):
    """A query failed in DuckDB; the message holds the query and DuckDB's error."""


class TaskFailed(RuntimeError):
    """A task failed after its retries; the message names the task, the node and the cause."""


@dataclass
class RuntimeContext:
    """What user code sees while a task runs (``process(runtime_ctx, ...)``)."""

    task: "Task"
    job_id: str
    partition: int
    npartitions: int
    attempt: int
    output_path: str
    threads: int

    @property
    def random_seed(self) -> int:
        """A seed fixed per task (the same on every retry), for reproducible randomness."""
        return int(self.task.key_hash[:8], 16)

    @property
    def local_rank(self) -> int:
        return self.partition

    @property
    def numpy_random_gen(self) -> np.random.Generator:
        return np.random.default_rng(self.random_seed)


@dataclass(eq=False)
class Task:
    """One unit of work. ``kind`` picks what ``execute_task`` does; ``deps`` are upstream tasks."""

    kind: str
    key: str
    node: Any                       # a slim copy of the node (no inputs); holds parameters and user code
    deps: list["Task"]
    partition: int = 0
    npartitions: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    #: the partition in every dimension: ``((dimension, index, npartitions), ...)``, outermost first
    dims: tuple = ()

    @property
    def part(self) -> int:
        """The index this task takes in its node's own partitioning (``partition`` unless nested)."""
        return self.params.get("part", self.partition)

    @property
    def nparts(self) -> int:
        """The node's own partition count (``npartitions`` unless nested)."""
        return self.params.get("nparts", self.npartitions)

    @property
    def virtual(self) -> bool:
        return self.kind in VIRTUAL_KINDS

    @property
    def key_hash(self) -> str:
        return self.key.rsplit("-", 2)[-2]

    def __repr__(self) -> str:
        return f"Task({self.key})"


VIRTUAL_KINDS = {"source", "split_files", "shuffle_consumer", "union", "consolidate", "projection",
                 "user_partition", "load_partitioned", "partition_consumer"}


# --- virtual tasks (driver side) ---------------------------------------------------------------

def _probe_schema(ds: DataSet) -> pa.Schema:
    con = new_connection(1)
    try:
        return arrow_of(con, f"select * from {ds.sql_source(con)} limit 0").schema
    finally:
        con.close()


class PartitionedOutput(DataSet):
    """A virtual partition producer's output: one dataset per output partition (consumers pick theirs)."""

    def __init__(self, datasets: list[DataSet], schema: pa.Schema | None) -> None:
        self.datasets = datasets
        self.schema = schema

    def __repr__(self) -> str:
        return f"PartitionedOutput({len(self.datasets)} partitions)"


def _schema_of(ds: DataSet) -> pa.Schema | None:
    schema = getattr(ds, "schema", None)
    if schema is None and not (isinstance(ds, FileSet) and not ds.resolved_paths):
        schema = _probe_schema(ds)
    return schema


def resolve_virtual(task: Task, inputs: list[DataSet], job_id: str = "", threads: int = 1) -> DataSet:
    """The dataset of a virtual task, from its inputs' datasets."""
    k = task.kind
    if k == "user_partition":
        from openinfra.smallpond.partition import check_user_partitions

        rt = RuntimeContext(task, job_id, task.partition, task.npartitions, 0, "", threads)
        ds = merge_datasets(inputs)
        try:
            result = task.node.partition(rt, ds)
        except Exception as exc:  # user code: name the node and partition, keep the cause chained
            raise TaskFailed(f"task {task.label}: partition() raised {type(exc).__name__}: {exc}") from exc
        parts = check_user_partitions(result, task.node.npartitions, task.label)
        return PartitionedOutput(parts, _schema_of(ds))
    if k == "load_partitioned":
        from openinfra.smallpond.partition import load_partitioned

        ds = merge_datasets(inputs)
        node = task.node
        groups = load_partitioned(ds, node.npartitions, node.data_partition_column, node.hive_partitioning, task.label)
        schema = _schema_of(ds)
        return PartitionedOutput([ParquetDataSet(g, schema=schema, resolved=True) for g in groups], schema)
    if k == "partition_consumer":
        from openinfra.smallpond.partition import empty_like

        schema = next((ds.schema for ds in inputs if ds.schema is not None), None)
        return merge_datasets([empty_like(ds.datasets[task.part], schema) for ds in inputs])
    if k == "source":
        ds = task.params["dataset"]
        if isinstance(ds, FileSet):
            ds.resolved_paths  # noqa: B018 -- resolve globs now: a missing file fails here, named
        return ds
    if k in ("union", "consolidate"):
        return merge_datasets(inputs)
    if k == "projection":
        node = task.node
        ds = copy.copy(inputs[0])
        if not isinstance(ds, FileSet):
            raise TypeError(f"{task.label}: ProjectionNode needs a file dataset as input, got {type(ds).__name__}")
        ds.columns = node.columns
        ds.generated_columns = node.generated_columns
        if node.union_by_name is not None:
            ds.union_by_name = node.union_by_name
        return ds
    if k == "split_files":
        merged = merge_datasets(inputs)
        if not isinstance(merged, FileSet):
            raise TypeError(f"{task.label}: repartition by files needs file datasets; use by_rows=True")
        files = list(merged.resolved_paths)
        if task.params.get("random_shuffle"):
            random.Random(task.params.get("seed", 0)).shuffle(files)
        n, i = task.nparts, task.part
        mine = files[i * len(files) // n:(i + 1) * len(files) // n]
        out = copy.copy(merged)
        out._resolved = mine
        out.paths = mine
        if not mine and out.schema is None:
            out.schema = _probe_schema(merged) if files else None
        return out
    if k == "shuffle_consumer":
        part = task.part
        files = [p for ds in inputs for p in ds.parts.get(part, [])]
        schema = next((ds.schema for ds in inputs if ds.schema is not None), None)
        return ParquetDataSet(files, schema=schema, resolved=True)
    raise ValueError(f"unknown virtual task kind {k!r}")


class ShuffleOutput(ParquetDataSet):
    """A shuffle producer's output: all its files, and which partition each file belongs to."""

    def __init__(self, files: list[str], parts: dict[int, list[str]], schema: pa.Schema | None) -> None:
        super().__init__(files, schema=schema, resolved=True)
        self.parts = parts


def dataset_from_manifest(task_dir: str, manifest: dict) -> DataSet:
    """The output dataset recorded in a finished task's manifest."""
    files = [f if "://" in f or os.path.isabs(f) else storage.join(task_dir, f) for f in manifest["files"]]
    schema = schema_from_text(manifest["schema"]) if manifest.get("schema") else None
    if "parts" in manifest:
        parts = {int(k): [storage.join(task_dir, f) for f in v] for k, v in manifest["parts"].items()}
        return ShuffleOutput(files, parts, schema)
    return ParquetDataSet(files, schema=schema, resolved=True)


# --- real tasks (worker side) --------------------------------------------------------------------

@dataclass
class _Out:
    """Collects a task's output files, row count and schema into its manifest."""

    dir: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    schema: pa.Schema | None = None
    parts: dict[int, list[str]] | None = None

    def path(self, name: str) -> str:
        return storage.join(self.dir, name)

    def write_table(self, table: pa.Table, name: str, compression: str = "lz4", row_group_size: int | None = None) -> None:
        path = self.path(name)
        if storage.is_remote(path):
            fs, p = storage.filesystem(path)
            pq.write_table(table, p, filesystem=fs, compression=compression, row_group_size=row_group_size)
        else:
            pq.write_table(table, path, compression=compression, row_group_size=row_group_size)
        self.files.append(name)
        self.rows += table.num_rows
        self.schema = self.schema or table.schema

    def manifest(self) -> dict:
        m = {"files": self.files, "num_rows": self.rows, "schema": schema_to_text(self.schema) if self.schema else None}
        if self.parts is not None:
            m["parts"] = {str(k): v for k, v in self.parts.items()}
        return m


def _format_query(query: str, sources: list[str], rt: RuntimeContext, index: int) -> str:
    query = _PLACEHOLDER.sub(lambda m: sources[int(m.group(1))], query)
    for dim, idx, _ in rt.task.dims:  # ``{dimension}``: the partition's index in that dimension
        query = query.replace("{" + dim + "}", str(idx))
    return (query.replace("{__data_partition__}", str(rt.partition)).replace("{rand_seed}", str(rt.random_seed))
            .replace("{query_index}", str(index)).replace("{batch_index}", "0"))


def _sql_error(task: Task, query: str, exc: Exception) -> SqlError:
    return SqlError(f"{task.label}: {type(exc).__name__}: {exc}\n  query: {query}")


def _setup_udfs(con, node) -> None:
    for name in getattr(node, "udfs", []) or []:
        entry = node.ctx.udfs[name]
        if entry[0] == "function":
            _, func, params, ret, use_arrow = entry
            kwargs = {"type": "arrow"} if use_arrow else {}
            ret = ret.to_duckdb_type() if hasattr(ret, "to_duckdb_type") else ret
            con.create_function(name, func, to_duckdb_params(params), ret, **kwargs)
        elif entry[0] == "module":  # smallpond's udf_module_paths: the module registers its own UDFs
            import importlib.util

            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(entry[1]))[0], entry[1])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not hasattr(module, "create_duckdb_udfs"):
                raise TypeError(f"udf module {entry[1]} defines no create_duckdb_udfs(conn)")
            module.create_duckdb_udfs(con)
        else:
            con.execute(f"LOAD '{entry[1]}'")


def _run_sql(task: Task, inputs: list[DataSet], out: _Out, rt: RuntimeContext, queries: list[str],
             views: list[tuple[str, str]]) -> None:
    node = task.node
    con = new_connection(rt.threads, private=bool(getattr(node, "udfs", None)))
    try:
        _setup_udfs(con, node)
        sources = []
        for i, ds in enumerate(inputs):
            # Named views, so queries may write ``{0}.column``; DuckDB inlines them when planning.
            con.execute(f"CREATE TEMP VIEW __input{i} AS SELECT * FROM {ds.sql_source(con)}")
            sources.append(f"__input{i}")
        for name, q in views:
            try:
                con.execute(f"CREATE TEMP VIEW {name} AS {_format_query(q, sources, rt, 0)}")
            except Exception as exc:
                raise _sql_error(task, q, exc) from None
        for i, q in enumerate(queries[:-1]):
            try:
                con.execute(_format_query(q, sources, rt, i))
            except Exception as exc:
                raise _sql_error(task, q, exc) from None
        last = queries[-1]
        text = _format_query(last, sources, rt, len(queries) - 1)
        name = "part-00000.parquet"
        path = out.path(name)
        comp = str(getattr(node, "parquet_compression", "lz4") or "lz4").lower()
        rgs = int(getattr(node, "parquet_row_group_size", 122880))
        storage.register_with_duckdb(con, [path])  # a remote output (3fs://...) is written through fsspec
        try:
            rows = con.execute(f"COPY ({text}) TO '{path}' (FORMAT parquet, COMPRESSION {comp}, ROW_GROUP_SIZE {rgs})").fetchone()
        except Exception as exc:
            raise _sql_error(task, last, exc) from None
        out.files.append(name)
        out.schema = _read_schema(path)
        out.rows += int(rows[0]) if rows else 0
    finally:
        con.close()


def _read_metadata(path: str):
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return pq.read_metadata(p, filesystem=fs)
    return pq.read_metadata(path)


def _read_schema(path: str) -> pa.Schema:
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return pq.read_schema(p, filesystem=fs)
    return pq.read_schema(path)


def _hash_produce(task: Task, inputs: list[DataSet], out: _Out, rt: RuntimeContext) -> None:
    node = task.node
    n = node.npartitions
    con = new_connection(rt.threads)
    try:
        if node.pre_sql is not None:  # the optimizer folded a SQL step into this shuffle
            sources = []
            for i, ds in enumerate(inputs):
                con.execute(f"CREATE TEMP VIEW __input{i} AS SELECT * FROM {ds.sql_source(con)}")
                sources.append(f"__input{i}")
            try:
                for name, q in node.pre_views:
                    con.execute(f"CREATE TEMP VIEW {name} AS {_format_query(q, sources, rt, 0)}")
                con.execute(f"CREATE TEMP VIEW __pre AS {_format_query(node.pre_sql, sources, rt, 0)}")
            except Exception as exc:
                raise _sql_error(task, node.pre_sql, exc) from None
            src = "__pre"
        else:
            src = merge_datasets(inputs).sql_source(con)
        key_sql = "0" if node.random_shuffle else node.key_expression()
        if not node.random_shuffle and not storage.is_remote(out.dir):
            _hash_produce_duckdb(task, con, src, key_sql, out)
            return
        query = f"select *, {key_sql} as __openinfra_key__ from {src}"
        try:
            table = arrow_of(con, query)
        except Exception as exc:
            raise _sql_error(task, node.pre_sql or f"partition key {key_sql}", exc) from None
    finally:
        con.close()
    if node.random_shuffle:  # numpy with the task's seed: the same rows go to the same partitions on a retry
        keys = rt.numpy_random_gen.integers(0, n, size=table.num_rows)
    else:
        keys = table.column("__openinfra_key__").to_numpy(zero_copy_only=False).astype(np.int64)
    table = table.drop_columns(["__openinfra_key__"])
    col = node.data_partition_column
    if not node.drop_partition_column and col not in table.column_names and not node.shuffle_only:
        table = table.append_column(col, pa.array(keys, pa.int64()))
    elif node.drop_partition_column and col in table.column_names:
        table = table.drop_columns([col])
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n) if len(keys) else np.zeros(n, dtype=np.int64)
    ordered = table.take(pa.array(order)) if len(keys) else table
    out.parts = {}
    out.schema = table.schema
    offset = 0
    comp = "lz4"  # intermediate shuffle files: fast to write, and random data does not compress anyway
    for k in range(n):
        c = int(counts[k])
        if c:
            name = f"part-{k:05d}.parquet"
            out.write_table(ordered.slice(offset, c), name, comp)
            out.parts[k] = [name]
        offset += c


def _hash_produce_duckdb(task: Task, con, src: str, key_sql: str, out: _Out) -> None:
    """Shuffle producer on local disk: one DuckDB ``COPY ... PARTITION_BY`` writes a file per partition
    (no round trip through Arrow; the key column lives only in the directory names)."""
    node = task.node
    col = node.data_partition_column
    try:
        columns = [d[0] for d in con.execute(f"select * from {src} limit 0").description]
        star = f"* exclude ({_quote(col)})" if node.drop_partition_column and col in columns else "*"
        extra = f", {key_sql} as {_quote(col)}" if not node.drop_partition_column and col not in columns and not node.shuffle_only else ""
        select = f"select {star}{extra}, {key_sql} as __openinfra_key__ from {src}"
        out.schema = arrow_of(con, f"select * exclude (__openinfra_key__) from ({select}) limit 0").schema
        # Shuffle files are read only by our own DuckDB tasks, so they may use parquet format v2
        # (~40% cheaper to write for binary/string columns than v1's dictionary attempts).
        copy = f"COPY ({select}) TO '{out.path('shuffle')}' (FORMAT parquet, COMPRESSION lz4, PARTITION_BY (__openinfra_key__)"
        try:
            rows = con.execute(copy + ", PARQUET_VERSION V2)").fetchone()
        except Exception as exc:
            if "PARQUET_VERSION" not in str(exc).upper():
                raise
            storage.remove(out.path("shuffle"))
            rows = con.execute(copy + ")").fetchone()  # a DuckDB without the option
    except Exception as exc:
        raise _sql_error(task, node.pre_sql or f"partition key {key_sql}", exc) from None
    out.rows = int(rows[0]) if rows else 0
    out.parts = {}
    shuffle_dir = out.path("shuffle")
    for sub in storage.listdir(shuffle_dir):
        k = int(sub.split("=", 1)[1])
        # DuckDB names the directories ``__openinfra_key__=K``; its readers auto-detect that hive
        # layout and would add the key as a column to every consumer's rows. Plain ``K`` does not.
        storage.rename(storage.join(shuffle_dir, sub), storage.join(shuffle_dir, str(k)))
        names = [f"shuffle/{k}/{f}" for f in storage.listdir(storage.join(shuffle_dir, str(k))) if f.endswith(".parquet")]
        out.parts[k] = names
        out.files.extend(names)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _split_rows(task: Task, inputs: list[DataSet], out: _Out, rt: RuntimeContext) -> None:
    merged = merge_datasets(inputs)
    total = merged.num_rows
    n, i = task.nparts, task.part
    start, end = i * total // n, (i + 1) * total // n
    con = new_connection(rt.threads)
    try:
        table = arrow_of(con, f"select * from {merged.sql_source(con)} limit {end - start} offset {start}")
    finally:
        con.close()
    out.write_table(table, "part-00000.parquet")


def _user_tables(inputs: list[DataSet]) -> list[pa.Table]:
    return [ds.to_arrow_table() for ds in inputs]


def _as_table(value: Any, what: str) -> pa.Table:
    import pandas as pd

    if isinstance(value, pa.Table):
        return value
    if isinstance(value, pa.RecordBatch):
        return pa.Table.from_batches([value])
    if isinstance(value, pd.DataFrame):
        return pa.Table.from_pandas(value, preserve_index=False)
    raise TypeError(f"{what} must return a pyarrow.Table (or pandas.DataFrame), got {type(value).__name__}")


def _run_user(task: Task, inputs: list[DataSet], out: _Out, rt: RuntimeContext) -> None:
    node, kind = task.node, task.kind
    fn = node.user_function()
    what = f"{task.label} process"
    if kind == "arrow_compute":
        _write_result(out, _as_table(fn(rt, _user_tables(inputs)), what))
    elif kind == "pandas_compute":
        tables = _user_tables(inputs)
        result = _as_table(fn(rt, [t.to_pandas() for t in tables]), what)
        if not result.num_rows:
            result = result.cast(_typed_like_inputs(result.schema, [t.schema for t in tables]))
        _write_result(out, result)
    elif kind in ("arrow_stream", "arrow_batch", "pandas_batch"):
        bs = node.streaming_batch_size
        readers = [_rebatch(ds, bs) for ds in inputs]
        if kind == "arrow_stream":
            results = fn(rt, [pa.RecordBatchReader.from_batches(s, r) for s, r in readers])
        else:
            results = _batched_calls(fn, rt, readers, pandas=kind == "pandas_batch")
        writer = None
        path = out.path("part-00000.parquet")
        try:
            for value in results:
                t = _as_table(value, what)
                if writer is None:
                    writer = _parquet_writer(path, t.schema)
                    out.schema = t.schema
                writer.write_table(t.cast(out.schema) if t.schema != out.schema else t)
                out.rows += t.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            out.files.append("part-00000.parquet")
        elif kind != "arrow_stream":
            # An empty partition: no batch, so ``func`` never ran and no file was written. Record the
            # schema ``func`` gives for empty input, so later steps see an empty but typed table.
            out.schema = _empty_output_schema(fn, rt, readers, pandas=kind == "pandas_batch")
    elif kind == "python_script":
        ok = fn(rt, inputs, out.dir)
        if ok is False:
            raise RuntimeError(f"{what} returned False")
        for name in storage.listdir(out.dir):
            if name.endswith(".parquet"):
                p = out.path(name)
                out.files.append(name)
                out.rows += _read_metadata(p).num_rows
                out.schema = out.schema or _read_schema(p)
    else:
        raise ValueError(f"unknown task kind {kind!r}")


def _write_result(out: _Out, table: pa.Table) -> None:
    """A user function's result: a file when it has rows; else only its schema, in the manifest.
    (No empty file: from an empty pandas frame a string column comes back typed null, and such a
    file would be read first and break DuckDB's read of the others. The schema alone still gives
    consumers a typed empty table when every part is empty.)"""
    if table.num_rows:
        out.write_table(table, "part-00000.parquet")
    else:
        out.schema = out.schema or table.schema


def _parquet_writer(path: str, schema: pa.Schema) -> pq.ParquetWriter:
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return pq.ParquetWriter(p, schema, filesystem=fs, compression="lz4")
    return pq.ParquetWriter(path, schema, compression="lz4")


def _rebatch(ds: DataSet, batch_size: int):
    """``(schema, iterator of RecordBatches of batch_size rows)``; only the last one may be shorter."""
    table = ds.to_arrow_table().combine_chunks()
    batches: list[pa.RecordBatch] = []
    for offset in range(0, table.num_rows, batch_size):
        batches.extend(table.slice(offset, batch_size).to_batches())  # one chunk -> one batch per slice
    return table.schema, iter(batches)


def _batched_calls(fn, rt, readers, pandas: bool):
    """One call per batch index; an input with fewer batches gives empty tables (as smallpond's
    ``zip_longest``), so an empty input does not cut the others short."""
    schemas = [s for s, _ in readers]
    for batches in itertools.zip_longest(*(r for _, r in readers)):
        tables = [s.empty_table() if b is None else pa.Table.from_batches([b], s) for s, b in zip(schemas, batches)]
        yield fn(rt, [t.to_pandas() for t in tables] if pandas else tables)


def _empty_output_schema(fn, rt, readers, pandas: bool) -> pa.Schema | None:
    """The schema of ``fn`` on empty inputs (for a partition with no batch), or None when it fails
    there (best effort: the rows are empty either way, only their column types are at stake)."""
    tables = [s.empty_table() for s, _ in readers]
    try:
        schema = _as_table(fn(rt, [t.to_pandas() for t in tables] if pandas else tables), "").schema
    except Exception:  # noqa: BLE001 -- user code never meant to see an empty batch
        return None
    return _typed_like_inputs(schema, [t.schema for t in tables]) if pandas else schema


def _typed_like_inputs(schema: pa.Schema, inputs: list[pa.Schema]) -> pa.Schema:
    """An empty pandas frame forgets the types of its object columns (strings, dates, lists come back
    as null): give a null column the type of the input column of the same name, where there is one."""
    known = {f.name: f.type for s in reversed(inputs) for f in s}
    fields = [f.with_type(known[f.name]) if pa.types.is_null(f.type) and f.name in known else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def _sink(task: Task, inputs: list[DataSet], out: _Out) -> None:
    node = task.node
    dest = node.output_path
    storage.makedirs(dest)
    files = [(i, j, p) for i, ds in enumerate(inputs) for j, p in enumerate(ds.resolved_paths)] if inputs else []
    final: list[str] = []
    if node.type == "manifest":
        final = [p for _, _, p in files]
    else:
        # Each file is placed under a temporary name, then renamed: a reader never sees half a file.
        for i, j, src in files:
            name = f"part-{i:05d}-{j:03d}.parquet"
            tmp = storage.join(dest, f".tmp-{task.key_hash}-{name}")
            storage.remove(tmp)
            storage.link_or_copy(src, tmp, node.type)
            target = storage.join(dest, name)
            storage.remove(target)
            storage.rename(tmp, target)
            final.append(target)
    storage.write_text(storage.join(dest, "_manifest.txt" if node.type != "manifest" else "manifest.txt"),
                       "\n".join(final) + ("\n" if final else ""))
    out.files = final
    out.rows = sum(ds.num_rows for ds in inputs)
    out.schema = next((ds.schema for ds in inputs if ds.schema is not None), None)


def _materialize(task: Task, out: _Out) -> None:
    ds = task.params["dataset"]
    out.write_table(ds.to_arrow_table(), "part-00000.parquet")


def execute_task(task: Task, inputs: list[DataSet], attempt: int, job_root: str, job_id: str,
                 threads: int, fault_prob: float = 0.0, allow_exit: bool = False) -> dict:
    """Run one real task and commit its output directory; returns the manifest.

    With ``fault_prob`` > 0 the task fails at random (the draw is seeded by key and attempt, so a
    run is reproducible): before starting, after writing its files but before the rename, or (in a
    forked worker, ``allow_exit``) by killing its own process. None of these may change the result.
    """
    final_dir = storage.join(job_root, "tasks", task.key)
    tmp_dir = storage.join(job_root, "tasks", f".tmp-{task.key}-{attempt}-{os.getpid()}")
    draw = random.Random(f"{task.key}/{attempt}").random() if fault_prob > 0 else 1.0
    fault = draw < fault_prob
    mode = int(draw / fault_prob * 3) if fault else -1
    if fault and mode == 0:
        raise InjectedFault(f"injected fault before {task.label} (attempt {attempt})")
    storage.remove(tmp_dir)
    storage.makedirs(tmp_dir)
    rt = RuntimeContext(task, job_id, task.partition, task.npartitions, attempt, tmp_dir, threads)
    out = _Out(tmp_dir)
    t0 = time.perf_counter()
    kind = task.kind
    if kind == "sql":
        if task.params.get("merge_inputs"):  # a LimitNode's final step reads every partition as one
            inputs = [merge_datasets(inputs)]
        if "query" in task.params:
            _run_sql(task, inputs, out, rt, [task.params["query"]], [])
        else:
            _run_sql(task, inputs, out, rt, task.node.sql_queries, getattr(task.node, "views", []))
    elif kind == "hash_partition":
        _hash_produce(task, inputs, out, rt)
    elif kind == "split_rows":
        _split_rows(task, inputs, out, rt)
    elif kind == "sink":
        _sink(task, inputs, out)
    elif kind == "materialize":
        _materialize(task, out)
    else:
        _run_user(task, inputs, out, rt)
    manifest = out.manifest()
    manifest["seconds"] = time.perf_counter() - t0
    manifest["label"] = task.label
    storage.write_text(storage.join(tmp_dir, MANIFEST), json.dumps(manifest))
    if fault and mode == 1:
        raise InjectedFault(f"injected fault after writing {task.label}, before commit (attempt {attempt})")
    if fault and mode == 2:
        if allow_exit:
            os._exit(INJECTED_EXIT_CODE)
        raise InjectedFault(f"injected worker death in {task.label} (attempt {attempt})")
    if storage.exists(final_dir):  # someone (an earlier, presumed-dead attempt) committed first
        storage.remove(tmp_dir)
    else:
        storage.rename(tmp_dir, final_dir)
    return manifest


def load_checkpoint(job_root: str, key: str) -> DataSet | None:
    """The output of a task finished in an earlier run, or None."""
    task_dir = storage.join(job_root, "tasks", key)
    mpath = storage.join(task_dir, MANIFEST)
    if not storage.exists(mpath):
        return None
    try:
        manifest = json.loads(storage.read_text(mpath))
    except (OSError, ValueError):
        return None
    return dataset_from_manifest(task_dir, manifest)


def describe_error(exc: BaseException) -> dict:
    """A picklable description of a task error for the driver."""
    deterministic = type(exc).__name__ in ("ParserException", "BinderException", "CatalogException", "ConversionException")
    retryable = not (deterministic or isinstance(exc, (SqlError, TypeError, ValueError, FileNotFoundError)))
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(), "retryable": retryable}
