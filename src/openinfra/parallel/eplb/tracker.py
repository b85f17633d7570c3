"""Expert load tracking: turn per-expert token counts into the load estimate EPLB plans from.

The engines report counts as they run: a MoE layer's routed ``topk_idx``, a per-expert count
tensor, or the EP layer's receive statistics per physical slot (DeepEP's
``cumulative_local_expert_recv_stats``). :class:`ExpertLoadTracker` accumulates them for the
current interval; :meth:`~ExpertLoadTracker.step` closes the interval into a sliding window (the
mean of the last ``window`` intervals) or an exponential moving average; :meth:`~ExpertLoadTracker.load`
is the estimate to pass to ``rebalance_experts``.
"""

from __future__ import annotations

import torch

from openinfra.parallel.eplb.layout import balancedness

__all__ = ["ExpertLoadTracker"]


def _counts_tensor(name: str, counts: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(counts).__name__}")
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {counts.dtype}")
    if tuple(counts.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(counts.shape)}")
    c = counts.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return c


class ExpertLoadTracker:
    """Per-expert load over recent intervals.

    Args:
        num_layers: MoE layers L.
        num_experts: logical experts per layer E.
        window: keep the last ``window`` intervals and report their mean (default 10 when
            ``ema`` is not given).
        ema: instead of a window, an exponential moving average with this weight on the newest
            interval (0 < ema <= 1).

    Counts recorded between two :meth:`step` calls form one interval. All state is float64 on
    the CPU; recording from a GPU tensor copies it (one small device-to-host transfer per call).
    """

    def __init__(self, num_layers: int, num_experts: int, *, window: int | None = None, ema: float | None = None):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if window is not None and ema is not None:
            raise ValueError("give either window or ema, not both")
        if ema is not None and not (isinstance(ema, (int, float)) and 0.0 < float(ema) <= 1.0):
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        if ema is None:
            window = 10 if window is None else window
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise ValueError(f"window must be a positive int, got {window!r}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.window, self.ema = window, (float(ema) if ema is not None else None)
        self._pending = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._history = torch.zeros(window or 1, num_layers, num_experts, dtype=torch.float64)
        self._average = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._steps = 0

    # --- recording ------------------------------------------------------------------------

    def _layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def record(self, counts: torch.Tensor, layer: int | None = None) -> None:
        """Add token counts: [layers, experts], or [experts] for one ``layer``."""
        if layer is None:
            self._pending += _counts_tensor("counts", counts, (self.num_layers, self.num_experts))
        else:
            self._pending[self._layer(layer)] += _counts_tensor("counts", counts, (self.num_experts,))

    def record_topk(self, topk_idx: torch.Tensor, layer: int) -> None:
        """Add one MoE layer's routing decisions: topk_idx [tokens, k] logical ids, -1 = none."""
        layer = self._layer(layer)
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.is_floating_point() or topk_idx.dim() != 2:
            raise ValueError("topk_idx must be an integer tensor [tokens, k]")
        ids = topk_idx.detach().to("cpu", torch.int64).flatten()
        if bool((ids >= self.num_experts).any()) or bool((ids < -1).any()):
            raise ValueError(f"topk_idx holds ids outside [-1, {self.num_experts})")
        ids = ids[ids >= 0]
        self._pending[layer] += torch.bincount(ids, minlength=self.num_experts).to(torch.float64)

    def record_physical(self, counts: torch.Tensor, phy2log: torch.Tensor, layer: int | None = None,
                        first_slot: int = 0) -> None:
        """Add counts per physical slot, folded onto logical experts through ``phy2log``.

        Args:
            counts: [layers, S] (or [S] with ``layer``) tokens received per physical slot, for
                the slots ``first_slot .. first_slot + S`` (one EP rank reports its own slots:
                ``first_slot = rank * P / ranks``, as DeepEP's receive statistics are).
            phy2log: [layers, P] the placement the counts were measured under.
            layer: the layer, when counts is 1-D.
            first_slot: the first physical slot the counts cover.
        """
        if not isinstance(phy2log, torch.Tensor) or phy2log.dim() != 2 or phy2log.shape[0] != self.num_layers:
            raise ValueError(f"phy2log must be a [layers={self.num_layers}, replicas] integer tensor")
        p2l = phy2log.detach().to("cpu", torch.int64)
        if isinstance(first_slot, bool) or not isinstance(first_slot, int) or first_slot < 0:
            raise ValueError(f"first_slot must be a non-negative int, got {first_slot!r}")
        width = counts.shape[-1] if isinstance(counts, torch.Tensor) and counts.dim() >= 1 else 0
        if first_slot + width > p2l.shape[1] or width == 0:
            raise ValueError(f"counts cover slots [{first_slot}, {first_slot + width}) but phy2log has {p2l.shape[1]} slots")
        ids = p2l[:, first_slot:first_slot + width]
        if layer is None:
            c = _counts_tensor("counts", counts, (self.num_layers, width))
            self._pending.scatter_add_(1, ids, c)
        else:
            layer = self._layer(layer)
            c = _counts_tensor("counts", counts, (width,))
            self._pending[layer].scatter_add_(0, ids[layer], c)

    def all_reduce(self, group=None) -> None:
        """Sum the current interval's counts over the ranks of ``group`` (torch.distributed)."""
        import torch.distributed as dist

        dist.all_reduce(self._pending, group=group)

    # --- intervals and estimates ----------------------------------------------------------

    def step(self) -> None:
        """Close the current interval into the window / EMA and start a new one."""
        if self.ema is not None:
            self._average = self._pending.clone() if self._steps == 0 else self.ema * self._pending + (1 - self.ema) * self._average
        else:
            self._history[self._steps % self.window] = self._pending
        self._steps += 1
        self._pending.zero_()

    @property
    def num_steps(self) -> int:
        """Intervals closed so far."""
        return self._steps

    @property
    def pending(self) -> torch.Tensor:
        """The open interval's counts [layers, experts] (a copy)."""
        return self._pending.clone()

    def load(self) -> torch.Tensor:
        """Estimated load [layers, experts] float64: window mean or EMA of closed intervals
        (the open interval's counts before the first :meth:`step`)."""
        if self._steps == 0:
            return self._pending.clone()
        if self.ema is not None:
            return self._average.clone()
        filled = min(self._steps, self.window)
        return self._history[:filled].mean(0) if filled == self.window else self._history[:filled].sum(0) / filled

    def balancedness(self, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
        """Balancedness [layers] of a placement under the current estimate."""
        return balancedness(phy2log.to("cpu", torch.int64), self.load(), num_gpus)

    def reset(self) -> None:
        """Forget everything."""
        self._pending.zero_()
        self._history.zero_()
        self._average.zero_()
        self._steps = 0
