"""Datasets: what flows between tasks (file lists, never rows), and the in-memory sources.

A dataset knows how to show itself to DuckDB as a table expression (``sql_source``), how many rows
it has, and how to come back as Arrow / pandas. File datasets resolve their globs when the plan is
built, so a missing input fails before any task runs, with the pattern in the message.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import OrderedDict
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from openinfra.smallpond import storage

__all__ = [
    "DataSet", "FileSet", "ParquetDataSet", "CsvDataSet", "JsonDataSet", "ArrowTableDataSet", "PandasDataSet",
    "MultiDataSet", "merge_datasets", "schema_to_text", "schema_from_text", "arrow_of", "reader_of", "new_connection",
]

GENERATED_COLUMNS = ("filename", "file_row_number")


def schema_to_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join(_sql_str(p) for p in paths) + "]"


def arrow_of(con: Any, query: str) -> pa.Table:
    """Run ``query`` on a DuckDB connection and return an Arrow table (DuckDB 1.x and 2.x API)."""
    rel = con.sql(query)
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def reader_of(con: Any, query: str, batch_size: int) -> pa.RecordBatchReader:
    rel = con.sql(query)
    if hasattr(rel, "to_arrow_reader"):
        return rel.to_arrow_reader(batch_size)
    return rel.fetch_record_batch(batch_size)


# This process's DuckDB database, created on first use: opening a database costs ~0.1 s, a
# connection (cursor) on an open one costs microseconds, and every task opens its own connection.
# Keyed by pid: a forked worker must not use (or free) the database object it inherited.
_PROCESS_DB: dict[int, Any] = {}
_INHERITED: list[Any] = []


def new_connection(threads: int | None = None, private: bool = False) -> Any:
    """A fresh DuckDB connection (own temp views and registrations) with large Arrow buffers.

    ``private`` gives a connection to a database of its own, for tasks that register functions
    (a function name is global to a database, so tasks sharing one would collide).
    """
    import duckdb

    if private:
        con = duckdb.connect(":memory:")
    else:
        pid = os.getpid()
        if pid not in _PROCESS_DB:
            _INHERITED.extend(_PROCESS_DB.values())  # from a parent across fork: keep alive, never touch
            _PROCESS_DB.clear()
            _PROCESS_DB[pid] = duckdb.connect(":memory:")
        con = _PROCESS_DB[pid].cursor()
    con.execute("SET arrow_large_buffer_size = true")  # large_string / large_binary, as smallpond's DuckDB gave
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


class DataSet:
    """Base class: a partition's worth of data that DuckDB can read."""

    #: Arrow schema, known when the dataset may be empty (a shuffle partition no producer wrote to).
    schema: pa.Schema | None = None

    @property
    def num_rows(self) -> int:
        con = new_connection(1)
        try:
            return int(con.execute(f"select count(*) from {self.sql_source(con)}").fetchone()[0])
        finally:
            con.close()

    def sql_source(self, con: Any) -> str:
        """A table expression for ``FROM``; may register objects on ``con``."""
        raise NotImplementedError(f"{type(self).__name__}.sql_source")

    def fingerprint(self) -> str:
        """Changes when the data changes (used in task keys, so stale checkpoints are not reused)."""
        raise NotImplementedError(f"{type(self).__name__}.fingerprint")

    def to_arrow_table(self) -> pa.Table:
        con = new_connection()
        try:
            return arrow_of(con, f"select * from {self.sql_source(con)}")
        finally:
            con.close()

    def to_batch_reader(self, batch_size: int = 122880) -> Iterator[pa.RecordBatch]:
        con = new_connection()
        try:
            yield from reader_of(con, f"select * from {self.sql_source(con)}", batch_size)
        finally:
            con.close()

    def to_pandas(self):
        return self.to_arrow_table().to_pandas()


class FileSet(DataSet):
    """Files read by a DuckDB table function; ``paths`` may hold globs until ``resolved_paths``."""

    def __init__(self, paths: str | list[str], recursive: bool = False, columns: list[str] | None = None,
                 union_by_name: bool = False, schema: pa.Schema | None = None,
                 generated_columns: list[str] | None = None, resolved: bool = False) -> None:
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"paths must be a path or a list of paths, got {paths!r}")
        self.paths = list(paths)
        self.recursive = recursive
        self.columns = list(columns) if columns else None
        self.union_by_name = union_by_name
        self.schema = schema
        self.generated_columns = list(generated_columns or [])
        bad = [c for c in self.generated_columns if c not in GENERATED_COLUMNS]
        if bad:
            raise ValueError(f"generated_columns must be among {GENERATED_COLUMNS}, got {bad}")
        self._resolved: list[str] | None = list(paths) if resolved else None

    @property
    def resolved_paths(self) -> list[str]:
        if self._resolved is None:
            self._resolved = storage.expand(self.paths, self.recursive, what=f"{type(self).__name__} paths")
        return self._resolved

    def _reader(self, paths: list[str]) -> str:
        raise NotImplementedError

    def sql_source(self, con: Any) -> str:
        paths = self.resolved_paths
        if not paths:
            if self.schema is None:
                raise ValueError(f"{type(self).__name__} has no files and no schema to stand for an empty table "
                                 "(an empty partition whose producer recorded no column types, e.g. a streaming "
                                 "function that yielded nothing for empty input)")
            name = f"__empty_{abs(hash(self.schema.to_string())) % 10**9}"
            con.register(name, self.schema.empty_table())
            return name
        storage.register_with_duckdb(con, paths)
        cols = ", ".join(f'"{c}"' for c in self.columns) if self.columns else "*"
        extra = ", ".join(self.generated_columns)
        if self.columns and extra:
            cols = f"{cols}, {extra}"
        return f"(select {cols} from {self._reader(paths)})"

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(self).__name__}|{self.columns}|{self.union_by_name}|{self.generated_columns}|{self._options()}".encode())
        for p in self.resolved_paths:
            try:
                st = os.stat(p) if not storage.is_remote(p) else None
                stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else str(storage.file_size(p))
            except OSError:
                stamp = "?"
            h.update(f"{p}|{stamp}\n".encode())
        return h.hexdigest()

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        shown = self._resolved if self._resolved is not None else self.paths
        head = ", ".join(shown[:3]) + (f", ... ({len(shown)} files)" if len(shown) > 3 else "")
        return f"{type(self).__name__}([{head}])"


class ParquetDataSet(FileSet):
    """Parquet files: ``ParquetDataSet(paths, columns=None, union_by_name=False, recursive=False)``."""

    def __init__(self, paths: str | list[str], root_dir: str | None = None, columns: list[str] | None = None,
                 union_by_name: bool = False, recursive: bool = False, schema: pa.Schema | None = None,
                 generated_columns: list[str] | None = None, resolved: bool = False) -> None:
        if root_dir is not None:
            paths = [p if os.path.isabs(p) or storage.is_remote(p) else storage.join(root_dir, p)
                     for p in ([paths] if isinstance(paths, str) else paths)]
        super().__init__(paths, recursive, columns, union_by_name, schema, generated_columns, resolved)

    def _reader(self, paths: list[str]) -> str:
        opts = ["union_by_name = true"] if self.union_by_name else []
        opts += [f"{c} = true" for c in self.generated_columns]
        return f"read_parquet({_sql_list(paths)}{''.join(', ' + o for o in opts)})"

    @property
    def num_rows(self) -> int:
        paths = self.resolved_paths
        if any(storage.is_remote(p) for p in paths):
            return super().num_rows
        return sum(pq.read_metadata(p).num_rows for p in paths)


class CsvDataSet(FileSet):
    """CSV files with a declared schema ``{column: duckdb type}`` and delimiter."""

    def __init__(self, paths: str | list[str], schema: dict[str, str], delim: str = ",", header: bool = False,
                 recursive: bool = False, columns: list[str] | None = None, union_by_name: bool = False) -> None:
        if not isinstance(schema, dict) or not schema:
            raise ValueError(f"schema must be a non-empty dict of column -> DuckDB type, got {schema!r}")
        super().__init__(paths, recursive, columns, union_by_name)
        self.csv_schema = OrderedDict(schema)
        # smallpond's examples pass r"\t"; DuckDB wants the character itself.
        self.delim = {r"\t": "\t", r"\n": "\n"}.get(delim, delim)
        self.header = header

    def _options(self) -> str:
        return f"{dict(self.csv_schema)}|{self.delim!r}|{self.header}"

    def _reader(self, paths: list[str]) -> str:
        cols = "{" + ", ".join(f"{_sql_str(k)}: {_sql_str(v)}" for k, v in self.csv_schema.items()) + "}"
        return (f"read_csv({_sql_list(paths)}, columns = {cols}, delim = {_sql_str(self.delim)}, "
                f"header = {str(self.header).lower()}, auto_detect = false, quote = '', escape = '')")


class JsonDataSet(FileSet):
    """Newline-delimited JSON files with a declared schema ``{column: duckdb type}``."""

    def __init__(self, paths: str | list[str], schema: dict[str, str], recursive: bool = False,
                 columns: list[str] | None = None, union_by_name: bool = False) -> None:
        if not isinstance(schema, dict) or not schema:
            raise ValueError(f"schema must be a non-empty dict of column -> DuckDB type, got {schema!r}")
        super().__init__(paths, recursive, columns, union_by_name)
        self.json_schema = OrderedDict(schema)

    def _options(self) -> str:
        return str(dict(self.json_schema))

    def _reader(self, paths: list[str]) -> str:
        cols = "{" + ", ".join(f"{_sql_str(k)}: {_sql_str(v)}" for k, v in self.json_schema.items()) + "}"
        return f"read_json({_sql_list(paths)}, columns = {cols}, format = 'newline_delimited')"


class ArrowTableDataSet(DataSet):
    """An in-memory Arrow table (the driver writes it to parquet before tasks in other processes read it)."""

    def __init__(self, table: pa.Table) -> None:
        if not isinstance(table, pa.Table):
            raise TypeError(f"table must be a pyarrow.Table, got {type(table).__name__}")
        self.table = table
        self.schema = table.schema
        self._fp: str | None = None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def sql_source(self, con: Any) -> str:
        name = f"__arrow_{id(self.table)}"
        con.register(name, self.table)
        return name

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.blake2b(digest_size=16)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.table.schema) as w:
                w.write_table(self.table)
            h.update(sink.getvalue())
            self._fp = h.hexdigest()
        return self._fp

    def to_arrow_table(self) -> pa.Table:
        return self.table

    def __repr__(self) -> str:
        return f"ArrowTableDataSet({self.table.num_rows} rows, {self.table.num_columns} columns)"


class PandasDataSet(ArrowTableDataSet):
    """An in-memory pandas DataFrame."""

    def __init__(self, df) -> None:
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas.DataFrame, got {type(df).__name__}")
        self.df = df
        super().__init__(pa.Table.from_pandas(df, preserve_index=False))

    def to_pandas(self):
        return self.df

    def __repr__(self) -> str:
        return f"PandasDataSet({len(self.df)} rows, {len(self.df.columns)} columns)"


class MultiDataSet(DataSet):
    """Several datasets read as one (``UNION ALL BY NAME``), for merges of different source kinds."""

    def __init__(self, parts: list[DataSet]) -> None:
        self.parts = list(parts)
        self.schema = next((p.schema for p in self.parts if p.schema is not None), None)

    def sql_source(self, con: Any) -> str:
        srcs = [p.sql_source(con) for p in self.parts]
        return "(" + " union all by name ".join(f"select * from {s}" for s in srcs) + ")"

    def fingerprint(self) -> str:
        return hashlib.blake2b("|".join(p.fingerprint() for p in self.parts).encode(), digest_size=16).hexdigest()

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    def __repr__(self) -> str:
        return f"MultiDataSet({self.parts!r})"


def merge_datasets(datasets: list[DataSet]) -> DataSet:
    """One dataset holding all of ``datasets`` (a single file list when they are plain parquet)."""
    if len(datasets) == 1:
        return datasets[0]
    plain = [d for d in datasets if type(d) is ParquetDataSet and not d.columns and not d.generated_columns
             and not d.union_by_name]
    if len(plain) == len(datasets):
        # the schema of a part with files first: an empty part's schema may come from a user function
        # run on empty input, whose types (a pandas object column -> null) can be less precise
        typed = sorted((d for d in datasets if d.schema is not None), key=lambda d: not d.resolved_paths)
        schema = typed[0].schema if typed else None
        return ParquetDataSet([p for d in datasets for p in d.resolved_paths], schema=schema, resolved=True)
    nonempty = [d for d in datasets if not (isinstance(d, FileSet) and not d.resolved_paths)]
    if not nonempty:
        return next((d for d in datasets if d.schema is not None), datasets[0])
    return nonempty[0] if len(nonempty) == 1 else MultiDataSet(nonempty)
