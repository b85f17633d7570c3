"""Zero-bubble weight-gradient deferral: ``WeightGradStore`` and a linear layer that uses it.

A pipeline backward step ("B") normally computes both the gradient of the stage input (needed at
once by the previous stage) and the gradient of the weights (needed only at the optimizer step).
Zero-bubble schedules split the second part off into a "W" step that fills pipeline bubbles.
A layer opts in by calling ``WeightGradStore.put(fn)`` from its autograd backward while
``WeightGradStore.enabled`` is true; the schedule then ``flush()``-es the closures collected
during one B into a queue entry and later ``pop()``-s (runs) them, first in first out.

The store is class-level state, as in DeepSeek's DualPipe, because the layers that feed it live in
user code (custom autograd functions) that has no handle on the schedule. Each process runs one
schedule at a time; ``clear()`` is called at the start and end of every step.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WeightGradStore", "ZeroBubbleLinear"]


class WeightGradStore:
    """FIFO of deferred weight-gradient closures (the "W" of zero-bubble pipelines)."""

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: "queue.Queue[list[Callable[[], None]]]" = queue.Queue()
    _lock = threading.Lock()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        """Defer ``func`` (a weight-gradient computation) into the current B's batch."""
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        with cls._lock:
            cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current batch (everything ``put`` since the last flush) as one W entry."""
        with cls._lock:
            cls.funcs_queue.put(cls.cache)
            cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest W entry. Raises ``RuntimeError`` if none is queued."""
        with cls._lock:
            if cls.funcs_queue.empty():
                raise RuntimeError("WeightGradStore.pop(): no deferred weight-gradient batch is queued")
            funcs = cls.funcs_queue.get()
        for func in funcs:
            func()

    @classmethod
    def pending(cls) -> int:
        """Number of queued W entries."""
        return cls.funcs_queue.qsize()

    @classmethod
    def clear(cls) -> None:
        """Drop everything (start and end of a step)."""
        with cls._lock:
            cls.enabled = False
            cls.cache = []
            cls.funcs_queue = queue.Queue()


class _ZBLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        # A parameter leaf, kept as an attribute: the deferred closure accumulates into its .grad.
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        bias = ctx.bias

        def weight_grad() -> None:
            # Accumulate straight into .grad: the tensors are leaves owned by the layer.
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gw = g2.t() @ x2
            if weight.grad is None:
                weight.grad = gw
            else:
                weight.grad += gw
            if bias is not None:
                gb = g2.sum(0)
                if bias.grad is None:
                    bias.grad = gb
                else:
                    bias.grad += gb

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad_out @ weight, None, None


class ZeroBubbleLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is deferred to the W step when the schedule asks.

    Same parameters and forward as ``nn.Linear`` (input ``[..., in_features]`` -> ``[..., out_features]``);
    in backward the input gradient is returned at once and the weight/bias gradient is either
    computed immediately or handed to ``WeightGradStore``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _ZBLinearFunction.apply(x, self.weight, self.bias)
