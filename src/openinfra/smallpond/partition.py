"""More partition nodes of smallpond's plan API: by ranges of a column, by user code, by stored keys.

| node | how a row or file finds its partition | tasks |
|---|---|---|
| ``RangePartitionNode`` | ``split_points`` on a column: partition i holds ``split_points[i-1] <= key < split_points[i]`` | a shuffle, like ``HashPartitionNode`` |
| ``UserDefinedPartitionNode`` | your ``partition(runtime_ctx, dataset) -> [DataSet] * npartitions`` | virtual (file lists), per input partition |
| ``RepeatPartitionNode`` | every sub-partition k of input partition i is all of partition i (always nested) | virtual |
| ``LoadPartitionedDataSetNode`` | the partition key stored in each parquet file (a column with one value, or a hive ``col=K`` directory) | virtual (file lists) |

The last two move no data: they regroup files, so they are as cheap as the file listing.
"""

from __future__ import annotations

import datetime
import decimal
import re
from typing import Any

import pyarrow.parquet as pq

from openinfra.smallpond import storage
from openinfra.smallpond.dataset import DataSet, FileSet, ParquetDataSet
from openinfra.smallpond.node import (
    Context, HashPartitionNode, Node, PartitionNode, callable_fingerprint,
)

__all__ = ["RangePartitionNode", "UserDefinedPartitionNode", "LoadPartitionedDataSetNode", "RepeatPartitionNode", "sql_literal",
           "read_partition_key"]

_NAME_RE = re.compile(r"^[a-zA-Z0-9_]+$")


def sql_literal(value: Any) -> str:
    """A DuckDB literal for a split point (int, float, str, bytes, bool, decimal, date, datetime)."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            raise ValueError("split_points must not hold NaN")
        return repr(value) if abs(value) != float("inf") else ("'inf'::DOUBLE" if value > 0 else "'-inf'::DOUBLE")
    if isinstance(value, decimal.Decimal):
        return f"'{value}'::DECIMAL(38, {max(0, -value.as_tuple().exponent)})"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (bytes, bytearray)):
        return "'" + "".join(f"\\x{b:02X}" for b in value) + "'::BLOB"
    if isinstance(value, datetime.datetime):
        return f"TIMESTAMP '{value.isoformat(sep=' ')}'"
    if isinstance(value, datetime.date):
        return f"DATE '{value.isoformat()}'"
    raise TypeError(f"split_points: cannot use a {type(value).__name__} ({value!r}) as a SQL literal")


class RangePartitionNode(HashPartitionNode):
    """Shuffle rows into ``len(split_points) + 1`` partitions by ranges of ``column``.

    Partition 0 holds keys below ``split_points[0]`` (and NULL keys), partition i holds
    ``split_points[i-1] <= key < split_points[i]``, the last one keys from ``split_points[-1]`` up.
    Concatenating the partitions in order after sorting each gives a global order (the GraySort
    pattern). smallpond declared this node without implementing it and without a column argument;
    ours takes the column as the keyword ``column``. The partition index is written to
    ``data_partition_column`` unless ``drop_partition_column``.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], split_points: list[Any], dimension: str | None = None,
                 nested: bool = False, output_name: str | None = None, output_path: str | None = None,
                 cpu_limit: int = 16, memory_limit: int | None = None, *, column: str | None = None,
                 data_partition_column: str | None = None, drop_partition_column: bool = False, **kwargs) -> None:
        if not isinstance(column, str) or not column:
            raise ValueError("RangePartitionNode needs column= (the column or SQL expression whose ranges split the rows)")
        if not isinstance(split_points, (list, tuple)) or not split_points:
            raise ValueError(f"split_points must be a non-empty list, got {split_points!r}")
        literals = [sql_literal(v) for v in split_points]
        try:
            ordered = all(a < b for a, b in zip(split_points, split_points[1:]))
        except TypeError as exc:
            raise TypeError(f"split_points must be of one comparable type, got {split_points!r}") from exc
        if not ordered:
            raise ValueError(f"split_points must be strictly increasing, got {split_points!r}")
        super().__init__(ctx, input_deps, len(split_points) + 1, [column], data_partition_column, dimension=dimension,
                         nested=nested, drop_partition_column=drop_partition_column, output_name=output_name,
                         output_path=output_path, cpu_limit=cpu_limit, memory_limit=memory_limit, **kwargs)
        self.split_points = list(split_points)
        self.column = column
        self._literals = literals

    def key_expression(self) -> str:
        # A linear CASE: DuckDB evaluates it vectorized, and split lists are short (one per partition).
        expr = self.column if _NAME_RE.match(self.column) else f"({self.column})"
        whens = " ".join(f"WHEN {expr} < {lit} THEN {i}" for i, lit in enumerate(self._literals))
        return f"(CASE WHEN {expr} IS NULL THEN 0 {whens} ELSE {len(self._literals)} END)::BIGINT"

    def detail(self) -> str:
        pts = ", ".join(self._literals)
        pre = f", producers run: {' '.join(self.pre_sql.split())}" if self.pre_sql else ""
        return f"npartitions={self.npartitions}, column={self.column}, split_points=[{pts[:120]}]{pre}"


class UserDefinedPartitionNode(PartitionNode):
    """Regroup the files (or datasets) of each input partition into ``npartitions`` with your code.

    Subclass it and override ``partition(runtime_ctx, dataset) -> list[DataSet]`` (exactly
    ``npartitions`` datasets), or pass ``partition_func=`` with that signature (without ``self``).
    It is called once per input partition, in the driver; output partition k is the union of every
    call's dataset k. An empty dataset in the list is an empty partition.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, dimension: str | None = None,
                 nested: bool = False, cpu_limit: int = 1, memory_limit: int | None = None, *,
                 partition_func=None) -> None:
        if partition_func is not None and not callable(partition_func):
            raise TypeError(f"partition_func must be callable, got {type(partition_func).__name__}")
        if partition_func is None and type(self).partition is UserDefinedPartitionNode.partition:
            raise ValueError(f"{type(self).__name__}: override partition() or pass partition_func=")
        super().__init__(ctx, input_deps, npartitions, dimension, nested, cpu_limit=cpu_limit, memory_limit=memory_limit)
        if not self.input_deps:
            raise ValueError(f"{type(self).__name__} needs an input")
        self.partition_func = partition_func

    def partition(self, runtime_ctx, dataset: DataSet) -> list[DataSet]:
        """Split ``dataset`` (one input partition) into ``self.npartitions`` datasets."""
        return self.partition_func(runtime_ctx, dataset)

    def spec(self) -> str:
        fn = self.partition_func if self.partition_func is not None else type(self).partition
        return f"{type(self).__qualname__}|{callable_fingerprint(fn)}|{self.npartitions}"

    def detail(self) -> str:
        fn = self.partition_func if self.partition_func is not None else type(self).partition
        return f"npartitions={self.npartitions}, partition={getattr(fn, '__qualname__', fn)}"


class LoadPartitionedDataSetNode(PartitionNode):
    """Load a dataset already partitioned on disk: each parquet file goes to the partition its key names.

    The key of a file is the single value of ``data_partition_column`` in it (what a
    ``HashPartitionNode`` writes), or with ``hive_partitioning`` the ``<column>=K`` directory in its
    path. A file with several keys, or a key outside ``[0, npartitions)``, is an error naming the file.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, dimension: str | None = None,
                 nested: bool = False, data_partition_column: str | None = None, hive_partitioning: bool = False,
                 cpu_limit: int = 1, memory_limit: int | None = None) -> None:
        if not dimension and not data_partition_column:
            raise ValueError("LoadPartitionedDataSetNode needs dimension= or data_partition_column= (the key column)")
        super().__init__(ctx, input_deps, npartitions, dimension or data_partition_column, nested,
                         cpu_limit=cpu_limit, memory_limit=memory_limit)
        if not self.input_deps:
            raise ValueError("LoadPartitionedDataSetNode needs an input")
        self.data_partition_column = data_partition_column or dimension
        self.hive_partitioning = hive_partitioning

    def detail(self) -> str:
        return (f"npartitions={self.npartitions}, data_partition_column={self.data_partition_column}, "
                f"hive_partitioning={self.hive_partitioning}")


class RepeatPartitionNode(PartitionNode):
    """A new, nested dimension made by repeating each input partition ``npartitions`` times.

    Output partition ``i * npartitions + k`` is all of input partition i, for k in
    ``range(npartitions)``; SQL sees k as ``{dimension}``. Use it to pair every partition of one
    input with every partition of another (a partitioned cross join) without copying data.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, dimension: str,
                 cpu_limit: int = 1, memory_limit: int | None = None) -> None:
        if not isinstance(dimension, str) or not dimension:
            raise ValueError(f"RepeatPartitionNode needs a dimension name, got {dimension!r}")
        super().__init__(ctx, input_deps, npartitions, dimension, nested=True, cpu_limit=cpu_limit, memory_limit=memory_limit)
        if not self.input_deps:
            raise ValueError("RepeatPartitionNode needs an input")

    def detail(self) -> str:
        return f"npartitions={self.npartitions}, dimension={self.dimension}"


def _parse_key(value: Any, path: str) -> int:
    try:
        key = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: partition key {value!r} is not an integer") from None
    if key != value and not isinstance(value, str):
        raise ValueError(f"{path}: partition key {value!r} is not an integer")
    return key


def read_partition_key(path: str, column: str, hive_partitioning: bool = False) -> int | None:
    """The partition key of one parquet file; ``None`` for an empty file (it holds no rows to place)."""
    if hive_partitioning:
        for part in reversed(path.replace("\\", "/").split("/")[:-1]):
            name, sep, value = part.partition("=")
            if sep and name == column:
                return _parse_key(value, path)
        raise ValueError(f"{path}: no '{column}=K' directory in the path (hive_partitioning=True)")
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        handle = fs.open(p, "rb")
    else:
        handle = open(path, "rb")
    with handle:
        file = pq.ParquetFile(handle)
        if column not in file.schema_arrow.names:
            raise ValueError(f"{path}: no column {column!r} holding the partition key (columns: {file.schema_arrow.names})")
        if file.metadata.num_rows == 0:
            return None
        values = set(file.read(columns=[column]).column(0).unique().to_pylist())
    if len(values) != 1:
        raise ValueError(f"{path}: partition keys in column {column!r} are not unique: {sorted(values, key=repr)[:5]}")
    return _parse_key(values.pop(), path)


def load_partitioned(dataset: DataSet, npartitions: int, column: str, hive: bool, label: str) -> list[list[str]]:
    """The files of ``dataset`` grouped by their partition key (``npartitions`` lists)."""
    if not isinstance(dataset, ParquetDataSet):
        raise TypeError(f"{label}: LoadPartitionedDataSetNode needs parquet files as input, got {type(dataset).__name__}")
    groups: list[list[str]] = [[] for _ in range(npartitions)]
    for path in dataset.resolved_paths:
        try:
            key = read_partition_key(path, column, hive)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None
        if key is None:
            continue
        if not 0 <= key < npartitions:
            raise ValueError(f"{label}: {path}: partition key {key} is out of range 0-{npartitions - 1}")
        groups[key].append(path)
    return groups


def check_user_partitions(result: Any, npartitions: int, label: str) -> list[DataSet]:
    """Validate what a ``partition()`` call returned."""
    if not isinstance(result, (list, tuple)) or len(result) != npartitions:
        got = f"{len(result)} item(s)" if isinstance(result, (list, tuple)) else type(result).__name__
        raise ValueError(f"{label}: partition() must return a list of {npartitions} datasets, got {got}")
    bad = [type(d).__name__ for d in result if not isinstance(d, DataSet)]
    if bad:
        raise TypeError(f"{label}: partition() must return DataSets, got {bad}")
    return list(result)


def empty_like(ds: DataSet, schema) -> DataSet:
    """``ds`` when it has rows to read; an empty parquet set carrying ``schema`` when it has no files."""
    if isinstance(ds, FileSet) and not ds.paths and not (ds._resolved or []):
        return ParquetDataSet([], schema=ds.schema or schema, resolved=True)
    return ds

