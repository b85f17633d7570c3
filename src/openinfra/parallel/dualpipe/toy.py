"""A small stage module and a single-process reference step, shared by tests, benchmarks and docs.

``MLPStage`` is the README example's stage: two ``ZeroBubbleLinear`` layers with a GELU, plus an
``overlapped_forward_backward`` that simply runs one chunk's forward then the other's backward
(it has no communication to hide). ``reference_step`` runs a whole model over micro-batches in
one process: the oracle the pipelines must match bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import run_backward
from .weight_grad import ZeroBubbleLinear

__all__ = ["MLPStage", "mse_criterion", "reference_step"]


class MLPStage(nn.Module):
    """``[..., hidden] -> [..., hidden]``: linear(hidden, 4*hidden) -> GELU -> linear(4*hidden, hidden)."""

    def __init__(self, hidden_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.linear1 = ZeroBubbleLinear(hidden_size, hidden_size * 4, bias=False, device=device, dtype=dtype)
        self.linear2 = ZeroBubbleLinear(hidden_size * 4, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        """Forward chunk 0 then backward chunk 1 (nothing to overlap in a pure-compute stage)."""
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        elif outputs1:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def mse_criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (a fresh tensor, never a view)."""
    return F.mse_loss(output, target).clone()


def reference_step(
    x: torch.Tensor, labels: torch.Tensor, model: nn.Module, num_chunks: int,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_criterion,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process oracle: zero grads, then forward+backward each micro-batch in order.

    Returns ``(loss [num_chunks], outputs)`` with outputs concatenated along dim 0.
    """
    model.zero_grad()
    outs, losses = [], []
    for mx, ml in zip(x.chunk(num_chunks), labels.chunk(num_chunks)):
        y = model(mx)
        loss = criterion(y, ml)
        loss.backward()
        outs.append(y.detach())
        losses.append(loss.detach())
    return torch.stack(losses), torch.cat(outs)
