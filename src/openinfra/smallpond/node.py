"""The logical plan: nodes (smallpond's names and constructor signatures) and ``LogicalPlan``.

A node says *what* to compute over partitions; the planner (``planner.py``) turns each node into
one task per partition. Nodes hold no data and run nothing. Arguments of the original that only
guided its resource scheduler (``cpu_limit``, ``memory_limit``, ...) are accepted and recorded.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import traceback
from typing import Any, Callable, Iterable, Literal

from openinfra.smallpond.dataset import DataSet, ParquetDataSet
from openinfra.smallpond.udf import UserDefinedFunction

__all__ = [
    "Context", "Node", "DataSourceNode", "DataSinkNode", "PythonScriptNode", "ArrowComputeNode",
    "ArrowStreamNode", "ArrowBatchNode", "PandasComputeNode", "PandasBatchNode", "SqlEngineNode", "UnionNode",
    "RootNode", "ConsolidateNode", "PartitionNode", "EvenlyDistributedPartitionNode", "DataSetPartitionNode",
    "HashPartitionNode", "ShuffleNode", "ProjectionNode", "LimitNode", "LogicalPlan", "callable_fingerprint",
    "DATA_PARTITION_COLUMN_NAME",
]

DATA_PARTITION_COLUMN_NAME = "__data_partition__"
DEFAULT_BATCH_SIZE = 122880
DEFAULT_ROW_GROUP_SIZE = 122880
_NAME_RE = re.compile(r"^[a-zA-Z0-9_]+$")


def callable_fingerprint(fn: Any) -> str:
    """A stable description of a function's code, for checkpoint keys.

    Two runs of the same script give the same string; editing the function's body, its constants or
    the values it closes over gives a different one, so a changed step is recomputed.
    """
    if fn is None:
        return "None"
    parts = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", type(fn).__qualname__)]
    func = getattr(fn, "__func__", fn)
    if hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        parts += [callable_fingerprint(fn.func), repr(fn.args), repr(sorted(fn.keywords.items()))]
    code = getattr(func, "__code__", None)
    if code is None and callable(fn) and hasattr(type(fn), "__call__"):
        code = getattr(type(fn).__call__, "__code__", None)
        parts.append(repr(sorted((k, repr(v)[:200]) for k, v in vars(fn).items())) if hasattr(fn, "__dict__") else "")
    if code is not None:
        parts.append(_code_text(code))
        for cell in getattr(func, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            parts.append(callable_fingerprint(value) if callable(value) else repr(value)[:500])
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def _file_digest(path: str) -> str:
    """Content hash of a UDF module or extension file (a changed file reruns the tasks using it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=8).hexdigest()
    except OSError:
        return "?"


def _code_text(code) -> str:
    consts = [(_code_text(c) if inspect.iscode(c) else repr(c)) for c in code.co_consts]
    return f"{code.co_code.hex()}|{consts}|{code.co_names}"


class Context:
    """Numbers the nodes of one plan (and holds its Python UDFs)."""

    def __init__(self) -> None:
        self.next_node_id = 0
        self.udfs: dict[str, Any] = {}

    def _new_node_id(self) -> int:
        self.next_node_id += 1
        return self.next_node_id

    def create_function(self, name: str, func: Callable, params: list[Any] | None = None,
                        return_type: Any = None, use_arrow_type: bool = False) -> str:
        """Register a Python scalar function that SQL nodes can call by ``name`` (DuckDB ``create_function``).

        ``params`` is a list of ``UDFType`` / ``UDFListType`` / ... (or DuckDB types), or
        ``UDFAnyParameters()``; ``None`` for both lets DuckDB take the types from the annotations.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"udf name must match [a-zA-Z0-9_]+, got {name!r}")
        if not callable(func):
            raise TypeError(f"udf {name!r}: func must be callable")
        self.udfs[name] = ("function", func, params, return_type, use_arrow_type)
        return name

    def create_external_module(self, module_path: str, name: str | None = None) -> str:
        """Register a Python file defining ``create_duckdb_udfs(conn)``; SQL nodes call it on their connection."""
        if not isinstance(module_path, str) or not module_path.endswith(".py"):
            raise ValueError(f"module_path must be a .py file, got {module_path!r}")
        if not os.path.isfile(module_path):
            raise FileNotFoundError(f"udf module not found: {module_path}")
        name = name or os.path.basename(module_path)
        self.udfs[name] = ("module", os.path.abspath(module_path))
        return name

    def create_duckdb_extension(self, extension_path: str, name: str | None = None) -> str:
        """Register a DuckDB extension file that SQL nodes load before running."""
        name = name or os.path.basename(extension_path)
        self.udfs[name] = ("extension", extension_path)
        return name


class Node:
    """Base class of every node: inputs, an id, where it was made in user code."""

    def __init__(self, ctx: Context, input_deps: Iterable["Node"], output_name: str | None = None,
                 output_path: str | None = None, cpu_limit: int = 1, gpu_limit: float = 0,
                 memory_limit: int | None = None) -> None:
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a Context, got {type(ctx).__name__}")
        if not isinstance(input_deps, Iterable) or isinstance(input_deps, (str, Node)):
            raise TypeError(f"input_deps must be a tuple of nodes, got {input_deps!r}")
        input_deps = tuple(input_deps)
        bad = [d for d in input_deps if not isinstance(d, Node)]
        if bad:
            raise TypeError(f"input_deps must hold only nodes, got {bad!r}")
        if output_name is not None and not _NAME_RE.match(output_name):
            raise ValueError(f"output_name must match [a-zA-Z0-9_]+, got {output_name!r}")
        if output_path is not None and not (os.path.isabs(output_path) or "://" in output_path):
            raise ValueError(f"output_path must be absolute, got {output_path!r}")
        self.ctx = ctx
        self.id = ctx._new_node_id()
        self.input_deps = input_deps
        self.output_name = output_name
        self.output_path = output_path
        self.cpu_limit = cpu_limit
        self.gpu_limit = gpu_limit
        self.memory_limit = memory_limit
        here = os.path.dirname(__file__)
        frame = next((f for f in reversed(traceback.extract_stack()) if not f.filename.startswith(here)), None)
        self.location = f"{frame.filename}:{frame.lineno}" if frame else "?"

    def __repr__(self) -> str:
        return f"{type(self).__name__}-{self.id}"

    def detail(self) -> str:
        """One line of parameters for ``explain``."""
        return ""

    def spec(self) -> str:
        """Everything that determines this node's output besides its inputs (for checkpoint keys)."""
        return self.detail()

    @property
    def num_partitions(self) -> int:
        return self.input_deps[0].num_partitions if self.input_deps else 1

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        """The partition dimensions of the output, outermost first: ``[(dimension, npartitions), ...]``.

        Partition index ``i`` of the output is the mixed-radix number of the per-dimension indices
        (the last dimension varies fastest). A flat (non-nested) partitioning has one dimension.
        """
        return self.input_deps[0].partition_dims if self.input_deps else []


def _product(dims: list[tuple[str, int]]) -> int:
    out = 1
    for _, n in dims:
        out *= n
    return out


class DataSourceNode(Node):
    """An input of the plan: one partition holding a dataset (files or an in-memory table)."""

    def __init__(self, ctx: Context, dataset: DataSet | None) -> None:
        if dataset is not None and not isinstance(dataset, DataSet):
            raise TypeError(f"dataset must be a DataSet, got {type(dataset).__name__}")
        super().__init__(ctx, ())
        self.dataset = dataset if dataset is not None else ParquetDataSet([], resolved=True)

    def detail(self) -> str:
        return repr(self.dataset)

    def spec(self) -> str:
        return f"{type(self.dataset).__name__}:{self.dataset.fingerprint()}"

    @property
    def num_partitions(self) -> int:
        return 1

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        return []


DataSinkType = Literal["link", "copy", "link_or_copy", "manifest"]


class DataSinkNode(Node):
    """Collect the output files of ``input_deps`` under ``output_path`` (links, copies or a manifest)."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], output_path: str, type: DataSinkType = "link",
                 manifest_only: bool = False, is_final_node: bool = False) -> None:
        if type not in ("link", "copy", "link_or_copy", "manifest"):
            raise ValueError(f"type must be one of link, copy, link_or_copy, manifest; got {type!r}")
        if not isinstance(output_path, str) or not output_path:
            raise ValueError(f"output_path must be a non-empty path, got {output_path!r}")
        if "://" not in output_path:
            output_path = os.path.abspath(output_path)
        super().__init__(ctx, input_deps, None, output_path)
        self.type = "manifest" if manifest_only else type
        self.is_final_node = is_final_node

    def detail(self) -> str:
        return f"output_path={self.output_path}, type={self.type}"

    @property
    def num_partitions(self) -> int:
        return 1

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        return []


class _UserCodeNode(Node):
    """Nodes whose tasks call user Python code: ``process_func`` or an overridden ``process``."""

    def __init__(self, ctx, input_deps, process_func=None, output_name=None, output_path=None,
                 cpu_limit=1, gpu_limit=0, memory_limit=None) -> None:
        if process_func is not None and not callable(process_func):
            raise TypeError(f"process_func must be callable, got {type(process_func).__name__}")
        super().__init__(ctx, input_deps, output_name, output_path, cpu_limit, gpu_limit, memory_limit)
        self.process_func = process_func
        if process_func is None and type(self).process is _base_process(type(self)):
            raise ValueError(f"{type(self).__name__}: pass process_func= or override process()")
        _check_partitions(self)

    def user_function(self) -> Callable:
        return self.process_func if self.process_func is not None else self.process

    def spec(self) -> str:
        fn = self.process_func if self.process_func is not None else type(self).process
        return f"{type(self).__qualname__}|{callable_fingerprint(fn)}|{self.detail()}"


def _base_process(cls) -> Any:
    for base in cls.__mro__:
        if base.__module__ == __name__ and "process" in base.__dict__:
            return base.__dict__["process"]
    return None


class PythonScriptNode(_UserCodeNode):
    """Run ``process(runtime_ctx, input_datasets, output_path) -> bool``; outputs = parquet files it writes."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], *, process_func=None, output_name=None,
                 output_path=None, cpu_limit: int = 1, gpu_limit: float = 0, memory_limit=None) -> None:
        super().__init__(ctx, input_deps, process_func, output_name, output_path, cpu_limit, gpu_limit, memory_limit)

    def process(self, runtime_ctx, input_datasets: list[DataSet], output_path: str) -> bool:
        raise NotImplementedError("override PythonScriptNode.process or pass process_func")


class ArrowComputeNode(_UserCodeNode):
    """Run ``process(runtime_ctx, tables: list[pa.Table]) -> pa.Table`` once per partition."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], *, process_func=None,
                 parquet_row_group_size: int | None = None, parquet_dictionary_encoding=False,
                 parquet_compression="ZSTD", parquet_compression_level=3, use_duckdb_reader=False,
                 output_name=None, output_path=None, cpu_limit: int = 1, gpu_limit: float = 0, memory_limit=None) -> None:
        super().__init__(ctx, input_deps, process_func, output_name, output_path, cpu_limit, gpu_limit, memory_limit)
        self.parquet_row_group_size = parquet_row_group_size or DEFAULT_ROW_GROUP_SIZE
        self.parquet_compression = parquet_compression
        self.parquet_compression_level = parquet_compression_level

    def process(self, runtime_ctx, input_tables):
        raise NotImplementedError("override ArrowComputeNode.process or pass process_func")


class PandasComputeNode(ArrowComputeNode):
    """Like ``ArrowComputeNode`` with pandas DataFrames in and out."""

    def process(self, runtime_ctx, input_dfs):
        raise NotImplementedError("override PandasComputeNode.process or pass process_func")


class ArrowStreamNode(_UserCodeNode):
    """Run ``process(runtime_ctx, readers: list[RecordBatchReader]) -> Iterable[pa.Table]`` per partition."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], *, process_func=None, background_io_thread=True,
                 streaming_batch_size: int | None = None, secs_checkpoint_interval: int | None = None,
                 parquet_row_group_size: int | None = None, parquet_dictionary_encoding=False,
                 parquet_compression="ZSTD", parquet_compression_level=3, use_duckdb_reader=False,
                 output_name=None, output_path=None, cpu_limit: int = 1, gpu_limit: float = 0, memory_limit=None) -> None:
        super().__init__(ctx, input_deps, process_func, output_name, output_path, cpu_limit, gpu_limit, memory_limit)
        if streaming_batch_size is not None and (not isinstance(streaming_batch_size, int) or streaming_batch_size <= 0):
            raise ValueError(f"streaming_batch_size must be a positive int, got {streaming_batch_size!r}")
        self.streaming_batch_size = streaming_batch_size or DEFAULT_BATCH_SIZE
        self.parquet_row_group_size = parquet_row_group_size or DEFAULT_ROW_GROUP_SIZE
        self.parquet_compression = parquet_compression
        self.parquet_compression_level = parquet_compression_level

    def detail(self) -> str:
        return f"streaming_batch_size={self.streaming_batch_size}"

    def process(self, runtime_ctx, input_readers):
        raise NotImplementedError("override ArrowStreamNode.process or pass process_func")


class ArrowBatchNode(ArrowStreamNode):
    """Run ``process(runtime_ctx, tables: list[pa.Table]) -> pa.Table`` on batches of ``streaming_batch_size`` rows."""

    def process(self, runtime_ctx, input_tables):
        raise NotImplementedError("override ArrowBatchNode.process or pass process_func")


class PandasBatchNode(ArrowStreamNode):
    """Like ``ArrowBatchNode`` with pandas DataFrames."""

    def process(self, runtime_ctx, input_dfs):
        raise NotImplementedError("override PandasBatchNode.process or pass process_func")


def _check_partitions(node: Node) -> None:
    counts = [d.num_partitions for d in node.input_deps]
    if len(set(counts)) > 1:
        detail = ", ".join(f"{d!r}: {n}" for d, n in zip(node.input_deps, counts))
        raise ValueError(f"{type(node).__name__}: inputs must have the same number of partitions, got {detail}")


class SqlEngineNode(Node):
    """Run DuckDB SQL on each partition; ``{0}``, ``{1}``... name the inputs' partitions.

    Other placeholders: ``{__data_partition__}`` (partition index), ``{<dimension>}`` (the partition's
    index in that partition dimension, e.g. ``{A}`` after ``HashPartitionNode(..., dimension="A")``;
    a HashPartitionNode's default dimension is ``__data_partition__``), ``{rand_seed}``,
    ``{query_index}``, ``{batch_index}``. With several queries, all run and the last one's result is the output.
    Output files are LZ4-compressed parquet by default (smallpond used ZSTD, which costs ~3x the
    CPU of LZ4 when writing); pass ``parquet_compression="ZSTD"`` for smaller files.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], sql_query: str | Iterable[str], *,
                 udfs: list[Any] | None = None, per_thread_output=True, materialize_output=True,
                 materialize_in_memory=False, relax_memory_if_oom=None, batched_processing=False,
                 extension_paths: list[str] | None = None, udf_module_paths: list[str] | None = None,
                 enable_temp_directory=False, parquet_row_group_size: int | None = None,
                 parquet_dictionary_encoding: bool = False, parquet_compression="LZ4", parquet_compression_level=3,
                 output_name=None, output_path=None, cpu_limit: int | None = None, memory_limit=None,
                 cpu_overcommit_ratio: float = 1.0, memory_overcommit_ratio: float = 0.9) -> None:
        if isinstance(sql_query, str):
            queries = [sql_query]
        elif isinstance(sql_query, Iterable):
            queries = list(sql_query)
        else:
            queries = []
        if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
            raise ValueError(f"sql_query must be a non-empty SQL string or list of strings, got {sql_query!r}")
        super().__init__(ctx, input_deps, output_name, output_path, cpu_limit or 1, 0, memory_limit)
        _check_partitions(self)
        used = {int(m) for q in queries for m in re.findall(r"\{(\d+)\}", q)}
        if used and max(used) >= len(self.input_deps):
            raise ValueError(f"sql_query refers to {{{max(used)}}} but the node has {len(self.input_deps)} input(s): {queries[-1]!r}")
        self.sql_queries = queries
        #: ``(name, query)`` views created before the queries run (set by the optimizer when it fuses nodes)
        self.views: list[tuple[str, str]] = []
        self.udfs: list[str] = []
        for path in extension_paths or []:
            self.udfs.append(ctx.create_duckdb_extension(path))
        for path in udf_module_paths or []:
            self.udfs.append(ctx.create_external_module(path))
        for udf in udfs or []:
            if isinstance(udf, UserDefinedFunction):  # @udf: carries its own name and DuckDB signature
                self.udfs.append(ctx.create_function(udf.name, udf.func, udf.params, udf.return_type, udf.use_arrow_type))
            elif callable(udf):
                self.udfs.append(ctx.create_function(udf.__name__, udf))
            elif isinstance(udf, str) and udf in ctx.udfs:
                self.udfs.append(udf)
            elif isinstance(udf, str) and udf.endswith(".duckdb_extension"):
                self.udfs.append(ctx.create_duckdb_extension(udf))
            else:
                raise ValueError(f"udfs: expected an @udf function, a Python function, a name from ctx.create_function or a .duckdb_extension path, got {udf!r}")
        self.parquet_row_group_size = parquet_row_group_size or DEFAULT_ROW_GROUP_SIZE
        self.parquet_compression = parquet_compression
        self.parquet_compression_level = parquet_compression_level
        self.cpu_overcommit_ratio = cpu_overcommit_ratio
        self.enable_temp_directory = enable_temp_directory

    @property
    def oneline_query(self) -> str:
        return "; ".join(" ".join(q.split()) for q in self.sql_queries)

    def detail(self) -> str:
        q = "; ".join(f"{n} = {' '.join(v.split())}" for n, v in self.views) + ("; " if self.views else "") + self.oneline_query
        return f"sql={q[:160]}{'...' if len(q) > 160 else ''}" + (f", udfs={self.udfs}" if self.udfs else "")

    def spec(self) -> str:
        udfs = [(n, callable_fingerprint(e[1]), repr(e[2:])) if e[0] == "function" else (n, e[1], _file_digest(e[1]))
                for n, e in ((n, self.ctx.udfs[n]) for n in self.udfs)]
        return f"sql|{self.views}|{self.sql_queries}|{udfs}|{self.parquet_compression}|{self.parquet_row_group_size}"


class UnionNode(Node):
    """Partition i of the output is the union of partition i of every input (same partition counts)."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...]) -> None:
        super().__init__(ctx, input_deps)
        if not self.input_deps:
            raise ValueError("UnionNode needs at least one input")
        _check_partitions(self)


class RootNode(Node):
    """Assemble several nodes (e.g. several sinks) into one plan; outputs nothing."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...]) -> None:
        super().__init__(ctx, input_deps)

    @property
    def num_partitions(self) -> int:
        return 1

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        return []


class ConsolidateNode(Node):
    """Merge partitions into larger ones without moving data (file lists are concatenated).

    Partitions are grouped by their indices in ``dimensions`` (the other dimensions are merged
    away): ``[]`` merges everything into one partition; on an ``A x B`` nested partitioning,
    ``["A"]`` gives the ``A`` partitions, each the union of its ``B`` sub-partitions.
    """

    def __init__(self, ctx: Context, input_dep: Node, dimensions: Iterable[str] | None = None) -> None:
        if dimensions is None:
            dimensions = []
        if isinstance(dimensions, str) or not isinstance(dimensions, Iterable):
            raise TypeError(f"dimensions must be a list of dimension names, got {dimensions!r}")
        dimensions = list(dimensions)
        if not all(isinstance(d, str) for d in dimensions):
            raise TypeError(f"dimensions must be strings, got {dimensions!r}")
        super().__init__(ctx, (input_dep,))
        known = [d for d, _ in input_dep.partition_dims]
        unknown = [d for d in dimensions if d not in known]
        if unknown:
            raise ValueError(f"ConsolidateNode: unknown partition dimension(s) {unknown}; the input has {known}")
        self.dimensions = dimensions

    def detail(self) -> str:
        return f"dimensions={self.dimensions}" if self.dimensions else ""

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        return [(d, n) for d, n in self.input_deps[0].partition_dims if d in self.dimensions]

    @property
    def num_partitions(self) -> int:
        return _product(self.partition_dims)


class PartitionNode(Node):
    """Base of the nodes that change the partitioning into ``npartitions`` partitions."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, dimension: str | None = None,
                 nested: bool = False, output_name=None, output_path=None, cpu_limit: int = 1, memory_limit=None) -> None:
        if isinstance(npartitions, bool) or not isinstance(npartitions, int) or npartitions < 1:
            raise ValueError(f"npartitions must be a positive int, got {npartitions!r}")
        if dimension is not None and (not isinstance(dimension, str) or not dimension):
            raise ValueError(f"dimension must be a non-empty string, got {dimension!r}")
        super().__init__(ctx, input_deps, output_name, output_path, cpu_limit, 0, memory_limit)
        self.npartitions = npartitions
        #: the name of this partitioning, for ``ConsolidateNode(dimensions=...)`` and ``{dimension}`` in SQL
        self.dimension = dimension if dimension is not None else f"{type(self).__name__}-{self.id}"
        self.nested = bool(nested)
        if self.nested:
            outer = [d for d, _ in (self.input_deps[0].partition_dims if self.input_deps else [])]
            if self.dimension in outer:
                raise ValueError(f"nested partitioning: dimension {self.dimension!r} is already used by the input ({outer})")

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        outer = self.input_deps[0].partition_dims if self.nested and self.input_deps else []
        return list(outer) + [(self.dimension, self.npartitions)]

    @property
    def num_partitions(self) -> int:
        return _product(self.partition_dims)


class EvenlyDistributedPartitionNode(PartitionNode):
    """Spread the input's files (default) or rows (``partition_by_rows``) evenly over ``npartitions``."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, dimension: str | None = None,
                 nested: bool = False, *, partition_by_rows=False, random_shuffle=False, output_name=None,
                 output_path=None, cpu_limit: int = 1, memory_limit=None) -> None:
        super().__init__(ctx, input_deps, npartitions, dimension, nested, output_name, output_path, cpu_limit, memory_limit)
        self.partition_by_rows = partition_by_rows
        self.random_shuffle = random_shuffle

    def detail(self) -> str:
        return f"npartitions={self.npartitions}, by_rows={self.partition_by_rows}, random_shuffle={self.random_shuffle}"


def DataSetPartitionNode(ctx: Context, input_deps: tuple[Node, ...], npartitions: int, *, partition_by_rows=False,
                         random_shuffle=False, data_partition_column=None) -> Node:
    """Evenly partition the inputs' files or rows into ``npartitions`` (smallpond's factory function).

    With ``data_partition_column``, files are grouped by the partition key stored in that column
    instead (a ``LoadPartitionedDataSetNode``: each file must hold one key).
    """
    if data_partition_column is not None:
        if partition_by_rows:
            raise ValueError("partition_by_rows and data_partition_column cannot be set together")
        # files that already carry their partition key (e.g. a HashPartitionNode's output): regroup them
        from openinfra.smallpond.partition import LoadPartitionedDataSetNode

        return LoadPartitionedDataSetNode(ctx, input_deps, npartitions, dimension=data_partition_column,
                                          data_partition_column=data_partition_column)
    node = EvenlyDistributedPartitionNode(ctx, input_deps, npartitions, partition_by_rows=partition_by_rows,
                                          random_shuffle=random_shuffle)
    return ConsolidateNode(ctx, node, []) if npartitions == 1 else node


class HashPartitionNode(PartitionNode):
    """Shuffle rows into ``npartitions`` by ``hash(hash_columns) % npartitions``.

    Producers (one per input partition) write one file per (producer, partition); partition k of the
    output is every producer's file k. ``random_shuffle`` sends each row to a random partition;
    ``shuffle_only`` takes the partition from the values of ``data_partition_column`` (an expression is
    allowed) and fails with "partition key K is out of range 0-N" when one is out of range.
    """

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, hash_columns: list[str] | None = None,
                 data_partition_column: str | None = None, *, dimension: str | None = None, nested: bool = False,
                 engine_type: str | None = None, random_shuffle: bool = False, shuffle_only: bool = False,
                 drop_partition_column: bool = False, use_parquet_writer: bool = False, hive_partitioning: bool = False,
                 parquet_row_group_size: int | None = None, parquet_dictionary_encoding=False,
                 parquet_compression="ZSTD", parquet_compression_level=3, output_name=None, output_path=None,
                 cpu_limit: int | None = None, memory_limit=None) -> None:
        if random_shuffle and shuffle_only:
            raise ValueError("random_shuffle and shuffle_only cannot be set together")
        if shuffle_only and not data_partition_column:
            raise ValueError("shuffle_only needs data_partition_column (the column or expression holding the partition)")
        if isinstance(hash_columns, str):
            hash_columns = [hash_columns]
        if not random_shuffle and not shuffle_only and not hash_columns:
            raise ValueError("HashPartitionNode needs hash_columns (or random_shuffle=True / shuffle_only=True)")
        if engine_type not in (None, "duckdb", "arrow"):
            raise ValueError(f"engine_type must be 'duckdb' or 'arrow', got {engine_type!r}")
        super().__init__(ctx, input_deps, npartitions, dimension or data_partition_column or DATA_PARTITION_COLUMN_NAME,
                         nested, output_name, output_path, cpu_limit or 1, memory_limit)
        self.hash_columns = list(hash_columns or [])
        self.data_partition_column = data_partition_column or DATA_PARTITION_COLUMN_NAME
        self.random_shuffle = random_shuffle
        self.shuffle_only = shuffle_only
        self.drop_partition_column = drop_partition_column
        self.parquet_compression = parquet_compression
        #: set by the optimizer when it folds the SQL node before this shuffle into the producers
        self.pre_sql: str | None = None
        self.pre_views: list[tuple[str, str]] = []

    def key_expression(self) -> str:
        """The SQL expression giving each row's partition (an integer in ``[0, npartitions)``)."""
        n = self.npartitions
        if self.random_shuffle:
            return f"(floor(random() * {n}))::BIGINT"
        if self.shuffle_only:
            col = self.data_partition_column
            expr = col if _NAME_RE.match(col) else f"({col})"
            return (f"(CASE WHEN ({expr})::BIGINT BETWEEN 0 AND {n - 1} THEN ({expr})::BIGINT ELSE "
                    f"error('partition key ' || ({expr})::VARCHAR || ' is out of range 0-{n - 1}') END)")
        cols = ", ".join(self.hash_columns)
        return f"(hash({cols}) % {n})::BIGINT"

    def detail(self) -> str:
        how = "random" if self.random_shuffle else (f"by={self.data_partition_column}" if self.shuffle_only else f"hash_by={self.hash_columns}")
        pre = f", producers run: {' '.join(self.pre_sql.split())}" if self.pre_sql else ""
        return f"npartitions={self.npartitions}, {how}{pre}"

    def spec(self) -> str:
        return f"{self.key_expression()}|{self.drop_partition_column}|{self.data_partition_column}|{self.pre_views}|{self.pre_sql}"


class ShuffleNode(HashPartitionNode):
    """Shuffle rows to the partition named by ``data_partition_column`` (a column or expression)."""

    def __init__(self, ctx: Context, input_deps: tuple[Node, ...], npartitions: int, data_partition_column: str | None = None,
                 *, drop_partition_column: bool = False, **kwargs) -> None:
        super().__init__(ctx, input_deps, npartitions, None, data_partition_column, shuffle_only=True,
                         drop_partition_column=drop_partition_column, **kwargs)


class ProjectionNode(Node):
    """Select ``columns`` (and generated ``filename`` / ``file_row_number``) of the input's files, without a task."""

    def __init__(self, ctx: Context, input_dep: Node, columns: list[str] | None = None,
                 generated_columns: list[str] | None = None, union_by_name: bool | None = None) -> None:
        super().__init__(ctx, (input_dep,))
        self.columns = list(columns) if columns and columns != ["*"] else None
        self.generated_columns = list(generated_columns or [])
        bad = [c for c in self.generated_columns if c not in ("filename", "file_row_number")]
        if bad:
            raise ValueError(f"generated_columns must be among filename, file_row_number; got {bad}")
        self.union_by_name = union_by_name

    def detail(self) -> str:
        return f"columns={self.columns or ['*']}, generated_columns={self.generated_columns}"


class LimitNode(SqlEngineNode):
    """At most ``limit`` rows: a limit in each partition, then the partitions merged and limited again."""

    def __init__(self, ctx: Context, input_dep: Node, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative int, got {limit!r}")
        super().__init__(ctx, (input_dep,), f"select * from {{0}} limit {limit}")
        self.limit = limit

    @property
    def num_partitions(self) -> int:
        return 1

    @property
    def partition_dims(self) -> list[tuple[str, int]]:
        return []


class LogicalPlan:
    """A plan: the root node and everything it depends on."""

    def __init__(self, ctx: Context, root_node: Node) -> None:
        if not isinstance(root_node, Node):
            raise TypeError(f"root_node must be a Node, got {type(root_node).__name__}")
        self.ctx = ctx
        self.root_node = root_node

    def __str__(self) -> str:
        return self.explain_str()

    @property
    def nodes(self) -> dict[int, Node]:
        """Every node by id, the root first."""
        out: dict[int, Node] = {}
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            if node.id in out:
                continue
            out[node.id] = node
            stack.extend(reversed(node.input_deps))
        return out

    def explain_str(self) -> str:
        """The plan as an indented tree, one node a line: ``Kind-id [partitions]: parameters``."""
        seen: set[int] = set()
        lines: list[str] = []

        def walk(node: Node, depth: int) -> None:
            detail = node.detail()
            dims = node.partition_dims
            # nested partitionings show their dimensions: "[6 partition(s) = A:3 x B:2]"
            shape = f" = {' x '.join(f'{d}:{n}' for d, n in dims)}" if len(dims) > 1 or getattr(node, "nested", False) else ""
            lines.append(f"{'  ' * depth}{node!r} [{node.num_partitions} partition(s){shape}]{': ' + detail if detail else ''}")
            if node.id in seen:
                lines.append(f"{'  ' * depth}  (shown above)")
                return
            seen.add(node.id)
            for dep in node.input_deps:
                walk(dep, depth + 1)

        walk(self.root_node, 0)
        return os.linesep.join(lines)

    def plot(self, path: str, title: str | None = None) -> str:
        """Draw the plan as a PNG at ``path`` (nodes as boxes, data flowing upward); returns the path."""
        from openinfra.smallpond.plot import plot_plan

        return plot_plan(self, path, title)
