"""A picture of a logical plan (PNG, matplotlib): sources at the bottom, the result at the top.

Each node is a box with its kind, id, partition count and main parameter; arrows show data flow.
Nodes are placed in layers by their longest distance from a source, so a shuffle's producers and
consumers line up and parallel branches sit side by side. No graphviz needed.
"""

from __future__ import annotations

import textwrap

__all__ = ["plot_plan"]

_COLORS = {
    "DataSourceNode": "#cfe8ff", "DataSinkNode": "#ffd9b3", "SqlEngineNode": "#d9f2d9", "LimitNode": "#d9f2d9",
    "HashPartitionNode": "#ffe0f0", "ShuffleNode": "#ffe0f0", "EvenlyDistributedPartitionNode": "#ffe0f0",
}


def plot_plan(plan, path: str, title: str | None = None) -> str:
    """Write the plan's picture to ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    nodes = plan.nodes
    level: dict[int, int] = {}

    def depth(node) -> int:
        if node.id not in level:
            level[node.id] = 1 + max((depth(d) for d in node.input_deps), default=-1)
        return level[node.id]

    for node in nodes.values():
        depth(node)
    layers: dict[int, list] = {}
    for node in sorted(nodes.values(), key=lambda n: n.id):
        layers.setdefault(level[node.id], []).append(node)
    width = max(len(v) for v in layers.values())
    height = len(layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 3.6 * width), max(3.0, 1.9 * height)))
    pos: dict[int, tuple[float, float]] = {}
    for lvl, members in layers.items():
        for i, node in enumerate(members):
            pos[node.id] = ((i + 0.5) * width / len(members), float(lvl))
    for node in nodes.values():
        for dep in node.input_deps:
            (x0, y0), (x1, y1) = pos[dep.id], pos[node.id]
            ax.annotate("", xy=(x1, y1 - 0.28), xytext=(x0, y0 + 0.28),
                        arrowprops=dict(arrowstyle="->", color="#555555", lw=1.2))
    for node in nodes.values():
        x, y = pos[node.id]
        kind = type(node).__name__
        fused = getattr(node, "fused_from", None)
        detail = node.detail()
        lines = [f"{kind}-{node.id}  [{node.num_partitions} part.]"]
        if fused:
            lines += textwrap.wrap("fused: " + " + ".join(fused), 44)[:2]
        if detail:
            lines += textwrap.wrap(detail, 44)[:3]
        box_w, box_h = 0.92 * min(1.0, width / max(1, len(layers[level[node.id]]))) * 0.9, 0.5
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
                                    fc=_COLORS.get(kind, "#eeeeee"), ec="#333333", lw=1.0))
        ax.text(x, y, "\n".join(lines), ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(-0.6, height - 0.4)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
