"""Pictures: per-GPU load bars before and after a rebalance (matplotlib, written to a PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_gpu_loads"]


def plot_gpu_loads(path: str | Path, before: torch.Tensor, after: torch.Tensor, layer: int, num_nodes: int = 1,
                   title: str = "") -> Path:
    """Draw one layer's per-GPU loads before and after as two bar charts in one PNG.

    Args:
        path: output file (.png).
        before, after: [layers, gpus] per-GPU loads (e.g. from :func:`gpu_loads`).
        layer: which layer to draw.
        num_nodes: draws node boundaries when > 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, a = before[layer].tolist(), after[layer].tolist()
    gpus = len(b)
    top = max(max(b), max(a)) * 1.08 or 1.0
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, min(0.18 * gpus + 2, 24.0)), 5.5), sharex=True)
    for ax, loads, name, color in ((axes[0], b, "before", "#c0504d"), (axes[1], a, "after", "#4f81bd")):
        mean, peak = sum(loads) / gpus, max(loads)
        ax.bar(range(gpus), loads, color=color, width=0.85)
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:,.0f}")
        ax.axhline(peak, color=color, linestyle=":", linewidth=1, label=f"max {peak:,.0f}")
        if num_nodes > 1:
            for n in range(1, num_nodes):
                ax.axvline(n * gpus / num_nodes - 0.5, color="grey", linewidth=0.8)
        bal = mean / peak if peak > 0 else 1.0
        ax.set_title(f"{name}: balancedness {bal:.3f}", fontsize=10)
        ax.set_ylabel("load (tokens)")
        ax.set_ylim(0, top)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("GPU")
    fig.suptitle(title or f"EPLB per-GPU load, layer {layer}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
