"""The optimizer: fuse chains of SQL nodes into one query, so a chain runs as one task per partition.

``df.filter("a > 1").map("a + b as c")`` is two ``SqlEngineNode``s; run as written, each partition
would be written to parquet and read back between them. Fused, the outer query reads the inner one
as a subquery and DuckDB plans both at once. A SQL node is folded into its consumer when it is a
plain single query (no UDFs, no per-partition placeholders other than its inputs), is not a
``LimitNode`` (whose merge step changes partitioning; a LimitNode may be the consumer), is used by
exactly one node of the plan, and
was not already computed (its outputs are reused instead). A SQL node feeding a shuffle
(``HashPartitionNode``) is folded into the shuffle's producers the same way.
"""

from __future__ import annotations

import re

from openinfra.smallpond.node import HashPartitionNode, LogicalPlan, Node, SqlEngineNode

__all__ = ["Optimizer", "optimize"]

_PLACEHOLDER = re.compile(r"\{(\d+)\}")
# named placeholders ({__data_partition__}, {rand_seed}, {<dimension>}, ...) take per-task values:
# a query holding one is kept as its own node rather than moved into another node's tasks
_NAMED = re.compile(r"\{[^{}\d][^{}]*\}")


def _fusable(node: Node) -> bool:
    return (type(node) is SqlEngineNode and len(node.sql_queries) == 1 and not node.udfs
            and not _NAMED.search(node.sql_queries[0]) and node.output_path is None)


class Optimizer:
    """``Optimizer(exclude_nodes).visit(root) -> new root``; the input plan is left unchanged.

    ``exclude_nodes``: nodes already computed, kept as they are (never fused into a consumer). A dict
    maps each to the optimized node it was computed as, so its finished tasks are found again.
    """

    def __init__(self, exclude_nodes: set[Node] | dict[Node, Node] | None = None) -> None:
        if isinstance(exclude_nodes, dict):
            self.exclude = dict(exclude_nodes)
        else:
            self.exclude = {n: n for n in exclude_nodes or ()}
        self._memo: dict[int, Node] = {}
        self._uses: dict[int, int] = {}

    def visit(self, root: Node) -> Node:
        for node in LogicalPlan(root.ctx, root).nodes.values():
            for dep in node.input_deps:
                self._uses[dep.id] = self._uses.get(dep.id, 0) + 1
        return self._rewrite(root)

    def _rewrite(self, node: Node) -> Node:
        if node.id in self._memo:
            return self._memo[node.id]
        if node in self.exclude:
            self._memo[node.id] = self.exclude[node]
            return self.exclude[node]
        new_deps = tuple(self._rewrite(d) for d in node.input_deps)
        if isinstance(node, SqlEngineNode) and len(node.sql_queries) == 1:
            # (a LimitNode may absorb its input: the limit then runs inside the input's query, where
            # DuckDB stops reading early; its merge step keeps a plain limit, see the planner)
            fused = self._fuse(node, new_deps)
            if fused is not None:
                self._memo[node.id] = fused
                return fused
        if isinstance(node, HashPartitionNode) and len(new_deps) == 1:
            dep, orig = new_deps[0], node.input_deps[0]
            if _fusable(dep) and orig not in self.exclude and self._uses.get(orig.id, 0) == 1:
                # A SQL step right before a shuffle runs inside the shuffle's producers: one
                # materialization (write + read of the whole dataset) less.
                fused = _copy_with_deps(node, dep.input_deps)
                fused.pre_views = list(getattr(dep, "views", []))
                fused.pre_sql = dep.sql_queries[0].strip().rstrip(";")
                fused.fused_from = list(getattr(dep, "fused_from", [repr(dep)])) + [repr(node)]
                self._memo[node.id] = fused
                return fused
        if new_deps != node.input_deps:
            node = _copy_with_deps(node, new_deps)
        self._memo[node.id] = node
        return node

    def _fuse(self, node: SqlEngineNode, deps: tuple[Node, ...]) -> Node | None:
        originals = node.input_deps
        inline = [i for i, (orig, dep) in enumerate(zip(originals, deps))
                  if _fusable(dep) and orig not in self.exclude and self._uses.get(orig.id, 0) == 1]
        if not inline:
            return None
        # New input list: the inlined nodes' inputs take the place of the inlined nodes.
        new_inputs: list[Node] = []
        index_of: dict[int, int] = {}

        def slot(n: Node) -> int:
            if n.id not in index_of:
                index_of[n.id] = len(new_inputs)
                new_inputs.append(n)
            return index_of[n.id]

        # Inlined queries become named views (``__fused_<id>``) that the outer query reads by name, so
        # ``{0}.column`` in the outer query keeps working; DuckDB inlines views when it plans.
        views: list[tuple[str, str]] = []
        replacement: dict[int, str] = {}

        def remap(query: str, node: Node) -> str:
            return _PLACEHOLDER.sub(lambda m: "{" + str(slot(node.input_deps[int(m.group(1))])) + "}", query)

        for i, dep in enumerate(deps):
            if i in inline:
                views += [(name, remap(q, dep)) for name, q in getattr(dep, "views", [])]
                name = f"__fused_{dep.id}"
                views.append((name, remap(dep.sql_queries[0], dep).strip().rstrip(";")))
                replacement[i] = name
            else:
                replacement[i] = "{" + str(slot(dep)) + "}"
        query = _PLACEHOLDER.sub(lambda m: replacement[int(m.group(1))], node.sql_queries[0])
        fused = _copy_with_deps(node, tuple(new_inputs))
        fused.sql_queries = [query]
        fused.views = views
        fused.fused_from = [f for i in inline for f in getattr(deps[i], "fused_from", [repr(deps[i])])] + [repr(node)]
        return fused


def _copy_with_deps(node: Node, deps: tuple[Node, ...]) -> Node:
    import copy

    clone = copy.copy(node)
    clone.input_deps = deps
    return clone


def optimize(plan: LogicalPlan, exclude_nodes: set[Node] | None = None) -> LogicalPlan:
    """The plan with chains of SQL nodes fused (see the module docstring)."""
    return LogicalPlan(plan.ctx, Optimizer(exclude_nodes).visit(plan.root_node))
