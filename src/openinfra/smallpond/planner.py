"""The planner: turns an (optimized) logical plan into tasks, one per node and output partition.

| node | tasks |
|---|---|
| DataSourceNode | files: one virtual task (globs resolved now); in-memory table: one task writing it to parquet |
| SqlEngineNode | one per partition; partition i reads partition i of every input |
| Arrow/Pandas compute, stream, batch, PythonScriptNode | one per partition |
| HashPartitionNode / ShuffleNode | one producer per input partition writing a file per output partition; then one virtual consumer per output partition collecting its files |
| EvenlyDistributedPartitionNode | by files: virtual slices of the file list; by rows: one task per output partition |
| LimitNode | a limit per partition, then one task merging and limiting again |
| RangePartitionNode | like HashPartitionNode, the partition from ranges of a column |
| UserDefinedPartitionNode, LoadPartitionedDataSetNode | a virtual producer per input partition regrouping its files; a virtual consumer per output partition |
| RepeatPartitionNode | virtual: each sub-partition is its input partition |
| UnionNode, ConsolidateNode, ProjectionNode, RootNode | virtual (file lists only); ConsolidateNode groups by the kept dimensions |

A partition node with ``nested=True`` partitions each input partition on its own: input partition
i and sub-partition k give output partition ``i * npartitions + k``, and every task carries its
index in each dimension (``Task.dims``) for ``ConsolidateNode(dimensions=...)`` and ``{dimension}``.
| DataSinkNode | one task linking or copying every input file under the output path |
"""

from __future__ import annotations

import copy
import hashlib

from openinfra.smallpond.dataset import ArrowTableDataSet
from openinfra.smallpond.node import (
    ArrowBatchNode, ArrowComputeNode, ArrowStreamNode, ConsolidateNode, DataSinkNode, DataSourceNode,
    EvenlyDistributedPartitionNode, HashPartitionNode, LimitNode, Node, PandasBatchNode, PandasComputeNode,
    ProjectionNode, PythonScriptNode, RootNode, SqlEngineNode, UnionNode,
)
from openinfra.smallpond.partition import LoadPartitionedDataSetNode, RepeatPartitionNode, UserDefinedPartitionNode
from openinfra.smallpond.task import Task

__all__ = ["Planner", "all_tasks"]


def _kind_of_user_node(node: Node) -> str:
    for cls, kind in ((PandasComputeNode, "pandas_compute"), (ArrowComputeNode, "arrow_compute"),
                      (PandasBatchNode, "pandas_batch"), (ArrowBatchNode, "arrow_batch"),
                      (ArrowStreamNode, "arrow_stream"), (PythonScriptNode, "python_script")):
        if isinstance(node, cls):
            return kind
    raise TypeError(f"no task kind for {type(node).__name__}")


class Planner:
    """``Planner().visit(node) -> [Task per output partition]`` (memoized per node object)."""

    def __init__(self) -> None:
        self._tasks: dict[int, list[Task]] = {}
        self._fp: dict[int, str] = {}

    def fingerprint(self, node: Node) -> str:
        """Content hash of a node: its kind, parameters, user code, and its inputs' fingerprints."""
        if id(node) not in self._fp:
            h = hashlib.blake2b(digest_size=8)
            h.update(f"{type(node).__qualname__}|{node.num_partitions}|{node.partition_dims}|{node.spec()}".encode())
            for dep in node.input_deps:
                h.update(self.fingerprint(dep).encode())
            self._fp[id(node)] = h.hexdigest()
        return self._fp[id(node)]

    def visit(self, node: Node) -> list[Task]:
        if id(node) not in self._tasks:
            self._tasks[id(node)] = self._make(node)
        return self._tasks[id(node)]

    def _task(self, kind: str, node: Node, deps: list[Task], partition: int = 0, npartitions: int = 1,
              tag: str = "", dims: tuple | None = None, **params) -> Task:
        """One task; ``dims`` (``((dimension, index, n), ...)``) defaults to its first input's."""
        slim = copy.copy(node)
        slim.input_deps = ()
        key = f"{kind}{tag}-{self.fingerprint(node)}-{partition:05d}"
        label = f"{node!r}[{partition}/{npartitions}]" + (f" ({tag.strip('_')})" if tag else "")
        if dims is None:
            dims = deps[0].dims if deps else ()
        return Task(kind, key, slim, deps, partition, npartitions, params, label, tuple(dims))

    def _one_producer_each(self, kind: str, node: Node, deps: list[Task], i: int | None) -> list[Task]:
        """A producer per input task; keys numbered uniquely across inputs (and input partitions)."""
        base = 0 if i is None else i * len(deps)
        return [self._task(kind, node, [t], base + j, len(deps)) for j, t in enumerate(deps)]

    def _partitioned(self, node, inputs: list[list[Task]], make_producers, consumer_kind: str, **params) -> list[Task]:
        """Producers and consumers of a partition node, flat or nested.

        ``make_producers(deps, i)`` gets the input tasks and the input partition (``None`` when flat).
        Flat: ``make_producers(all input tasks, None)`` and consumer k collects every producer's part k.
        Nested: each input partition i is partitioned on its own; output partition ``i * n + k``
        collects part k of input i's producers and keeps input i's dimensions.
        """
        n = node.npartitions
        flat = [t for ts in inputs for t in ts]
        if not node.nested:
            producers = make_producers(flat, None)
            return [self._task(consumer_kind, node, producers, k, n, dims=((node.dimension, k, n),), part=k, nparts=n, **params)
                    for k in range(n)]
        total = node.num_partitions
        out = []
        for i, t in enumerate(inputs[0]):
            producers = make_producers([ts[i] for ts in inputs], i)
            for k in range(n):
                out.append(self._task(consumer_kind, node, producers, i * n + k, total,
                                      dims=t.dims + ((node.dimension, k, n),), part=k, nparts=n, **params))
        return out

    def _make(self, node: Node) -> list[Task]:
        inputs = [self.visit(d) for d in node.input_deps]
        flat = [t for ts in inputs for t in ts]
        n = node.num_partitions
        if isinstance(node, DataSourceNode):
            kind = "materialize" if isinstance(node.dataset, ArrowTableDataSet) else "source"
            return [self._task(kind, node, [], dataset=node.dataset)]
        if isinstance(node, DataSinkNode):
            return [self._task("sink", node, flat)]
        if isinstance(node, RootNode):
            return [self._task("consolidate", node, flat, dims=())]
        if isinstance(node, ConsolidateNode):
            groups: dict[tuple, list[Task]] = {}
            for t in flat:  # group by the kept dimensions' indices, in order of first appearance
                groups.setdefault(tuple(d for d in t.dims if d[0] in node.dimensions), []).append(t)
            return [self._task("consolidate", node, ts, i, len(groups), dims=g) for i, (g, ts) in enumerate(groups.items())]
        if isinstance(node, UnionNode):
            return [self._task("union", node, [ts[i] for ts in inputs], i, n) for i in range(n)]
        if isinstance(node, ProjectionNode):
            return [self._task("projection", node, [t], i, n) for i, t in enumerate(inputs[0])]
        if isinstance(node, EvenlyDistributedPartitionNode):
            # the "producer" is the input itself: splitting tasks read their share of it directly
            if node.partition_by_rows and node.npartitions > 1:
                return self._partitioned(node, inputs, lambda deps, i: deps, "split_rows")
            return self._partitioned(node, inputs, lambda deps, i: deps, "split_files", random_shuffle=node.random_shuffle,
                                     seed=int(self.fingerprint(node)[:8], 16))
        if isinstance(node, RepeatPartitionNode):  # each sub-partition is its input partition, as is
            return self._partitioned(node, inputs, lambda deps, i: deps, "union")
        if isinstance(node, (UserDefinedPartitionNode, LoadPartitionedDataSetNode)):
            kind = "user_partition" if isinstance(node, UserDefinedPartitionNode) else "load_partitioned"
            return self._partitioned(node, inputs, lambda deps, i: self._one_producer_each(kind, node, deps, i),
                                     "partition_consumer")
        if isinstance(node, HashPartitionNode):
            if getattr(node, "pre_sql", None) is not None:  # a fused SQL step: co-partitioned inputs, like SQL
                count = len(inputs[0]) if inputs else 1

                def producers_of(deps, i):
                    if i is not None:  # nested: deps holds partition i of every input; one producer over them
                        return [self._task("hash_partition", node, list(deps), i, count)]
                    return [self._task("hash_partition", node, [ts[j] for ts in inputs], j, count) for j in range(count)]
            else:
                def producers_of(deps, i):
                    return self._one_producer_each("hash_partition", node, deps, i)
            return self._partitioned(node, inputs, producers_of, "shuffle_consumer")
        if isinstance(node, LimitNode):
            if not flat:  # it absorbed an input-less query (partial_sql("select ... from range(n)"))
                return [self._task("sql", node, [], 0, 1)]
            per_part = [self._task("sql", node, [t], i, len(flat)) for i, t in enumerate(flat)]
            if len(per_part) == 1:
                return per_part
            # the merge runs a plain limit (not the node's query, which may hold a fused input query)
            return [self._task("sql", node, per_part, 0, 1, tag="_merge", merge_inputs=True,
                               query=f"select * from {{0}} limit {node.limit}")]
        if isinstance(node, SqlEngineNode):
            count = inputs[0].__len__() if inputs else 1
            return [self._task("sql", node, [ts[i] for ts in inputs], i, count) for i in range(count)]
        if isinstance(node, (ArrowComputeNode, ArrowStreamNode, PythonScriptNode)):
            kind = _kind_of_user_node(node)
            count = len(inputs[0]) if inputs else 1
            return [self._task(kind, node, [ts[i] for ts in inputs], i, count) for i in range(count)]
        raise TypeError(f"the planner does not know {type(node).__name__}")


def all_tasks(targets: list[Task]) -> list[Task]:
    """Every task the targets depend on, in dependency order (inputs before consumers)."""
    order: list[Task] = []
    seen: set[int] = set()
    stack: list[tuple[Task, bool]] = [(t, False) for t in reversed(targets)]
    while stack:
        task, expanded = stack.pop()
        if expanded:
            order.append(task)
            continue
        if id(task) in seen:
            continue
        seen.add(id(task))
        stack.append((task, True))
        stack.extend((d, False) for d in reversed(task.deps) if id(d) not in seen)
    return order
