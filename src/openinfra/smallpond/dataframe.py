"""The lazy ``DataFrame``: each operation adds a node; actions optimize, plan and run the tasks."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa

from openinfra.smallpond import storage
from openinfra.smallpond.dataset import DataSet, FileSet
from openinfra.smallpond.node import (
    ArrowBatchNode, ArrowStreamNode, DataSinkNode, DataSourceNode, EvenlyDistributedPartitionNode, HashPartitionNode,
    LimitNode, LogicalPlan, Node, ShuffleNode, SqlEngineNode,
)
from openinfra.smallpond.optimizer import Optimizer
from openinfra.smallpond.planner import Planner

__all__ = ["DataFrame"]


class DataFrame:
    """A distributed table: a node of the logical plan plus the session that runs it. Lazy."""

    def __init__(self, session, plan: Node, recompute: bool = False) -> None:
        self.session = session
        self.plan = plan
        self.optimized_plan: Node | None = None
        self.need_recompute = recompute

    def __str__(self) -> str:
        return repr(self.plan)

    def __repr__(self) -> str:
        return f"DataFrame({self.plan!r}, {self.plan.num_partitions} partition(s))"

    @property
    def num_partitions(self) -> int:
        return self.plan.num_partitions

    def _new(self, plan: Node) -> "DataFrame":
        return DataFrame(self.session, plan, recompute=self.need_recompute)

    # --- planning and execution --------------------------------------------------------------------

    def _optimized(self) -> Node:
        if self.optimized_plan is None:
            self.optimized_plan = Optimizer(exclude_nodes=self.session._computed).visit(self.plan)
        return self.optimized_plan

    def _tasks(self):
        return Planner().visit(self._optimized())

    def _compute(self) -> list[DataSet]:
        tasks = self._tasks()
        if self.need_recompute:
            for t in tasks:
                self.session._results.pop(t.key, None)
                if not t.virtual:
                    storage.remove(storage.join(self.session.job_root, "tasks", t.key))
            self.need_recompute = False
        datasets = self.session._run(tasks, description=repr(self.plan))
        self.session._computed[self.plan] = self._optimized()
        return datasets

    def is_computed(self) -> bool:
        """True when every task of this DataFrame has finished (in this session or a checkpoint)."""
        from openinfra.smallpond.task import load_checkpoint

        for t in self._tasks():
            if t.key in self.session._results:
                continue
            if t.virtual or load_checkpoint(self.session.job_root, t.key) is None:
                return False
        return True

    def compute(self) -> None:
        """Run the pipeline up to this DataFrame (outputs stay in the job directory)."""
        self._compute()

    def recompute(self) -> "DataFrame":
        """Recompute this DataFrame's own tasks even if a checkpoint exists."""
        self.need_recompute = True
        return self

    def explain(self, path: str | None = None, show: bool = False) -> str:
        """The logical plan, the optimized plan (SQL chains fused) and the task counts, as text.

        With ``path``, also draw the optimized plan as a PNG there. With ``show``, print the text.
        """
        optimized = self._optimized()
        tasks = Planner()
        from openinfra.smallpond.planner import all_tasks

        every = all_tasks(tasks.visit(optimized))
        real = sum(not t.virtual for t in every)
        text = "\n".join([
            "== logical plan ==", LogicalPlan(self.session._ctx, self.plan).explain_str(),
            "== optimized plan ==", LogicalPlan(self.session._ctx, optimized).explain_str(),
            f"== tasks: {real} to run, {len(every) - real} virtual (file lists only) ==",
        ])
        if path:
            LogicalPlan(self.session._ctx, optimized).plot(path, title=repr(self.plan))
        if show:
            print(text)
        return text

    def plot(self, path: str) -> str:
        """Draw the optimized plan as a PNG at ``path``; returns the path."""
        return LogicalPlan(self.session._ctx, self._optimized()).plot(path, title=repr(self.plan))

    # --- transformations ----------------------------------------------------------------------------

    def repartition(self, npartitions: int, hash_by: str | list[str] | None = None, by: str | None = None,
                    by_rows: bool = False, **kwargs) -> "DataFrame":
        """Repartition into ``npartitions``: by files (default), ``by_rows``, ``hash_by`` columns, or ``by`` an
        expression giving the partition index (0..npartitions-1)."""
        if by is not None and hash_by is not None:
            raise ValueError("repartition: pass either by= or hash_by=, not both")
        if by is not None:
            plan = ShuffleNode(self.session._ctx, (self.plan,), npartitions, data_partition_column=by, **kwargs)
        elif hash_by is not None:
            cols = [hash_by] if isinstance(hash_by, str) else list(hash_by)
            kwargs.setdefault("drop_partition_column", True)
            plan = HashPartitionNode(self.session._ctx, (self.plan,), npartitions, cols, **kwargs)
        else:
            plan = EvenlyDistributedPartitionNode(self.session._ctx, (self.plan,), npartitions,
                                                  partition_by_rows=by_rows, **kwargs)
        return self._new(plan)

    def random_shuffle(self, **kwargs) -> "DataFrame":
        """Shuffle all rows globally: each row to a random partition, then a random order in each."""
        ctx = self.session._ctx
        shuffled = HashPartitionNode(ctx, (self.plan,), self.plan.num_partitions, random_shuffle=True,
                                     drop_partition_column=True, **kwargs)
        return self._new(SqlEngineNode(ctx, (shuffled,), "select * from {0} order by random()"))

    def partial_sort(self, by: str | list[str], **kwargs) -> "DataFrame":
        """Sort the rows of each partition by ``by`` (``"a"``, ``["a", "b desc"]``)."""
        cols = [by] if isinstance(by, str) else list(by)
        if not cols:
            raise ValueError("partial_sort: by must name at least one column")
        return self._new(SqlEngineNode(self.session._ctx, (self.plan,), f"select * from {{0}} order by {', '.join(cols)}", **kwargs))

    def filter(self, sql_or_func: str | Callable[[dict[str, Any]], bool], **kwargs) -> "DataFrame":
        """Keep the rows where a SQL predicate (preferred) or a Python function of the row is true."""
        if isinstance(sql_or_func, str):
            plan = SqlEngineNode(self.session._ctx, (self.plan,), f"select * from {{0}} where ({sql_or_func})", **kwargs)
        elif callable(sql_or_func):
            func = sql_or_func

            def process_func(_runtime_ctx, tables: list[pa.Table]) -> pa.Table:
                table = tables[0]
                return table.filter(pa.array([bool(func(row)) for row in table.to_pylist()], pa.bool_()))

            plan = ArrowBatchNode(self.session._ctx, (self.plan,), process_func=process_func, **kwargs)
        else:
            raise TypeError(f"filter: expected a SQL expression or a function, got {type(sql_or_func).__name__}")
        return self._new(plan)

    def map(self, sql_or_func: str | Callable[[dict[str, Any]], dict[str, Any]], *, schema: pa.Schema | None = None,
            **kwargs) -> "DataFrame":
        """Map each row: a SQL select list (``"a + b as c"``) or a function ``row -> dict``.

        For a function, ``schema`` gives the output types when the values cannot be inferred.
        """
        if isinstance(sql_or_func, str):
            plan = SqlEngineNode(self.session._ctx, (self.plan,), f"select {sql_or_func} from {{0}}", **kwargs)
        elif callable(sql_or_func):
            func = sql_or_func

            def process_func(_runtime_ctx, tables: list[pa.Table]) -> pa.Table:
                return pa.Table.from_pylist([func(row) for row in tables[0].to_pylist()], schema=schema)

            plan = ArrowBatchNode(self.session._ctx, (self.plan,), process_func=process_func, **kwargs)
        else:
            raise TypeError(f"map: expected a SQL expression or a function, got {type(sql_or_func).__name__}")
        return self._new(plan)

    def flat_map(self, sql_or_func: str | Callable[[dict[str, Any]], list[dict[str, Any]]], *,
                 schema: pa.Schema | None = None, **kwargs) -> "DataFrame":
        """Map each row to zero or more rows: SQL (``"unnest(array[a, b]) as c"``) or ``row -> list[dict]``."""
        if isinstance(sql_or_func, str):
            plan = SqlEngineNode(self.session._ctx, (self.plan,), f"select {sql_or_func} from {{0}}", **kwargs)
        elif callable(sql_or_func):
            func = sql_or_func

            def process_func(_runtime_ctx, tables: list[pa.Table]) -> pa.Table:
                return pa.Table.from_pylist([out for row in tables[0].to_pylist() for out in func(row)], schema=schema)

            plan = ArrowBatchNode(self.session._ctx, (self.plan,), process_func=process_func, **kwargs)
        else:
            raise TypeError(f"flat_map: expected a SQL expression or a function, got {type(sql_or_func).__name__}")
        return self._new(plan)

    def map_batches(self, func: Callable[[pa.Table], pa.Table], *, batch_size: int = 122880, streaming: bool = False,
                    **kwargs) -> "DataFrame":
        """Apply ``func`` to Arrow tables of ``batch_size`` rows; with ``streaming``, ``func`` takes an
        iterator of tables and yields tables."""
        if not callable(func):
            raise TypeError(f"map_batches: func must be callable, got {type(func).__name__}")
        if streaming:
            def process_func(_runtime_ctx, readers: list[pa.RecordBatchReader]) -> Iterator[pa.Table]:
                return func(pa.Table.from_batches([b]) for b in readers[0])

            plan = ArrowStreamNode(self.session._ctx, (self.plan,), process_func=process_func,
                                   streaming_batch_size=batch_size, **kwargs)
        else:
            def process_func(_runtime_ctx, tables: list[pa.Table]) -> pa.Table:
                return func(tables[0])

            plan = ArrowBatchNode(self.session._ctx, (self.plan,), process_func=process_func,
                                  streaming_batch_size=batch_size, **kwargs)
        return self._new(plan)

    def limit(self, limit: int) -> "DataFrame":
        """At most ``limit`` rows (lazy; one partition)."""
        return self._new(LimitNode(self.session._ctx, self.plan, limit))

    def write_parquet(self, path: str) -> None:
        """Write the data as parquet files under ``path`` (any path or ``3fs://...``); blocks."""
        self.write_parquet_lazy(path).compute()

    def write_parquet_lazy(self, path: str) -> "DataFrame":
        """Like ``write_parquet`` but lazy: compute it later, or several at once with ``sp.wait``."""
        if not isinstance(path, str) or not path:
            raise ValueError(f"write_parquet: path must be a non-empty string, got {path!r}")
        return self._new(DataSinkNode(self.session._ctx, (self.plan,), path, type="link_or_copy"))

    # --- actions ------------------------------------------------------------------------------------

    def count(self) -> int:
        """Number of rows (runs the pipeline)."""
        return sum(ds.num_rows for ds in self._compute())

    def take(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows as dicts (only as much of the pipeline as needed for a lazy plan)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"take: limit must be a non-negative int, got {limit!r}")
        if isinstance(self.plan, DataSourceNode) or self.is_computed():
            datasets = self._compute()
        else:
            datasets = self.limit(limit)._compute()
        rows: list[dict[str, Any]] = []
        for ds in datasets:
            if _empty(ds):
                continue
            for batch in ds.to_batch_reader():
                rows.extend(batch.to_pylist())
                if len(rows) >= limit:
                    return rows[:limit]
        return rows

    def take_all(self) -> list[dict[str, Any]]:
        """All rows as dicts, partition by partition."""
        return self.to_arrow().to_pylist()

    def to_arrow(self) -> pa.Table:
        """All rows as one Arrow table (partitions in order)."""
        tables = [ds.to_arrow_table() for ds in self._compute() if not _empty(ds)]
        if not tables:
            return pa.table({})
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")

    def to_pandas(self):
        """All rows as one pandas DataFrame."""
        return self.to_arrow().to_pandas()


def _empty(ds: DataSet) -> bool:
    return isinstance(ds, FileSet) and not ds.resolved_paths and ds.schema is None
