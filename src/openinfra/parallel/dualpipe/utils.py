"""Micro-batch split/merge and the raw backward call the schedules use."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd import Variable

__all__ = ["run_backward", "scatter", "gather", "calc_diff"]


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors`` and accumulate into leaves' ``.grad``.

    Unlike ``torch.autograd.backward`` this tolerates outputs that do not reach every input
    (``allow_unreachable``), which a pipeline stage with several outputs needs.
    """
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
        allow_unreachable=True, accumulate_grad=True,
    )


def _chunk(x: torch.Tensor | None, chunks: int, dim: int):
    if x is None:
        return [None] * chunks
    if x.shape[dim] % chunks != 0:
        raise ValueError(
            f"a tensor of shape {tuple(x.shape)} cannot be split into {chunks} equal micro-batches along "
            f"batch_dim={dim}; make its size a multiple of the chunk count"
        )
    return x.tensor_split(chunks, dim=dim)


def scatter(inputs, chunks: int, dim: int) -> list[tuple[torch.Tensor | None, ...]]:
    """Split each tensor of ``inputs`` into ``chunks`` equal micro-batches along ``dim``.

    Returns one tuple per micro-batch (``[()] * chunks`` when ``inputs`` is empty).
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(f"inputs must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}")
    for i, x in enumerate(inputs):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a tensor or None, got {type(x).__name__}")
    split = [_chunk(x, chunks, dim) for x in inputs]
    micro = [tuple(m) for m in zip(*split)]
    return micro if micro else [() for _ in range(chunks)]


def gather(micro_outputs, dim: int) -> tuple[torch.Tensor | None, ...]:
    """Concatenate per-micro-batch outputs (each a tensor or a sequence of tensors) along ``dim``."""
    if not micro_outputs:
        return ()
    if isinstance(micro_outputs[0], torch.Tensor):
        micro_outputs = [(x,) for x in micro_outputs]
    merged = []
    for parts in zip(*micro_outputs):
        if all(p is None for p in parts):
            merged.append(None)
        elif len(parts) == 1:
            merged.append(parts[0])
        else:
            merged.append(torch.cat(parts, dim=dim))
    return tuple(merged)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-style similarity in float64: 0 for identical tensors (DeepSeek's check)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum().item()
    if denom == 0:
        return 0.0
    return 1 - 2 * (x * y).sum().item() / denom
