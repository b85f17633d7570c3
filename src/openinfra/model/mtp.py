"""Multi-token prediction (DeepSeek-V3 tech report, section 2.2): extra depths that predict further ahead.

Depth k (1-based) keeps the causal chain: at position i it combines the previous depth's hidden
state ``h_{k-1}[i]`` (the main model's final hidden state for k = 1) with the embedding of token
``t_{i+k}``: ``h'_k[i] = eh_proj([hnorm(h_{k-1}[i]) ; enorm(emb(t_{i+k}))])``, runs one transformer
block over the sequence, and predicts ``t_{i+k+1}`` through the shared output head after its own
final norm. The embedding and the head are the main model's (shared, not copied); the training loss
adds ``mtp_weight / D * sum_k CE_k`` (the report's lambda: 0.3, then 0.1).
"""

from __future__ import annotations

import torch
from torch import nn

from openinfra.model.config import ModelConfig
from openinfra.model.layers import Linear, RMSNorm

__all__ = ["MTPModule"]


class MTPModule(nn.Module):
    """One prediction depth. Parameter names follow the checkpoint's MTP layer: ``enorm``, ``hnorm``,
    ``eh_proj``, the block's ``attn`` / ``ffn`` / norms, and ``norm`` (the checkpoint's ``shared_head.norm``)."""

    def __init__(self, depth: int, cfg: ModelConfig):
        super().__init__()
        from openinfra.model.transformer import Block  # the block class lives with the transformer

        self.depth = depth
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, cfg.gemm == "fp8")
        # layer id past the main stack: a MoE block (as in V3) and its own slot in any layer-indexed state
        self.block = Block(cfg.n_layers + depth - 1, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h_prev [b, s, dim] (previous depth, positions 0..s-1), emb_next [b, s, dim] (embeddings of the
        tokens k positions ahead) -> this depth's hidden states [b, s, dim] (before ``norm``)."""
        x = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))
        return self.block(x, cos, sin)
