"""Cutting a :class:`~openinfra.model.Transformer` into pipeline stages.

A stage is a contiguous run of blocks; the first stage also embeds the tokens and the last one
applies the final norm and the output head, so activations between stages are hidden states
``[micro_batch, seq, dim]`` and the last stage returns logits ``[micro_batch, seq, vocab]``.
Every rank builds the whole model from the same seed and keeps only its stages, so a pipelined
run starts from exactly the weights of the single-process run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from openinfra.model import Transformer

__all__ = ["TransformerStage", "split_stages", "chunk_criterion"]


class TransformerStage(nn.Module):
    """Blocks ``[start, stop)`` of ``model`` (+ embedding on the first stage, head on the last)."""

    def __init__(self, model: Transformer, start: int, stop: int):
        super().__init__()
        n = model.cfg.n_layers
        if not 0 <= start < stop <= n:
            raise ValueError(f"stage layers must satisfy 0 <= start < stop <= {n}, got [{start}, {stop})")
        self.cfg = model.cfg
        self.start, self.stop = start, stop
        self.is_first, self.is_last = start == 0, stop == n
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleList(model.layers[start:stop])
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.register_buffer("rope_freqs", model.rope_freqs.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [mb, seq] int64 (first stage) or hidden [mb, seq, dim] -> hidden, or logits (last)."""
        if self.is_first:
            x = self.embed(x)
        seq = x.shape[1]
        angles = torch.arange(seq, device=x.device).float()[:, None] * self.rope_freqs
        cos, sin = angles.cos()[None], angles.sin()[None]
        for layer in self.layers:
            x = layer(x, cos, sin, None, "prefill")
        if self.is_last:
            x = self.head(self.norm(x))
        return x

    def qualified_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's parameters under the full model's names (``layers.{i}....``, ``embed.weight``)."""
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("layers."):
                idx, rest = name[len("layers."):].split(".", 1)
                name = f"layers.{int(idx) + self.start}.{rest}"
            out[name] = t.detach().cpu()
        return out


def split_stages(model: Transformer, num_stages: int) -> list[TransformerStage]:
    """``num_stages`` stages with layer counts as even as possible (earlier stages get the extra)."""
    n = model.cfg.n_layers
    if not 1 <= num_stages <= n:
        raise ValueError(f"num_stages must be in [1, n_layers={n}], got {num_stages}")
    bounds, start = [], 0
    for s in range(num_stages):
        size = n // num_stages + (1 if s < n % num_stages else 0)
        bounds.append((start, start + size))
        start += size
    return [TransformerStage(model, a, b) for a, b in bounds]


def chunk_criterion(num_chunks: int):
    """Cross-entropy of one micro-batch, divided by the number of micro-batches, so the summed
    gradients of a step are those of the batch's mean loss."""

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / num_chunks

    return criterion
