"""The MoE layer: router, routed experts in grouped-GEMM layouts, shared experts.

``MoE.forward`` is route -> dispatch -> expert GEMMs -> combine, each step a method, so the
training job can put DeepEP's dispatch/combine between them for expert parallelism while the math
stays here. Single-device dispatch is a gather of token rows into the layout; combine is the
weighted scatter-add back to tokens. Profiler phases: ``dispatch``, ``mlp``, ``combine``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from openinfra.model.config import ModelConfig
from openinfra.model.gate import Gate
from openinfra.model.grouped import (ContiguousLayout, MaskedLayout, contiguous_layout, grouped_linear_contiguous,
                                     grouped_linear_masked, masked_layout)
from openinfra.model.layers import MLP
from openinfra.profiling.annotate import phase

__all__ = ["GroupedExperts", "MoE"]

Layout = Literal["auto", "contiguous", "masked"]


class GroupedExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked: w1, w3 [E, moe_inter, dim]; w2 [E, dim, moe_inter]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, fp8: bool = False):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim, self.fp8 = n_experts, dim, inter_dim, fp8
        self.w1 = nn.Parameter(torch.randn(n_experts, inter_dim, dim) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(n_experts, dim, inter_dim) * inter_dim ** -0.5)
        self.w3 = nn.Parameter(torch.randn(n_experts, inter_dim, dim) * dim ** -0.5)

    def forward_contiguous(self, x: torch.Tensor, layout: ContiguousLayout) -> torch.Tensor:
        """x [M, dim] in the contiguous layout -> [M, dim]."""
        h = F.silu(grouped_linear_contiguous(x, self.w1, layout, self.fp8)) * grouped_linear_contiguous(x, self.w3, layout, self.fp8)
        return grouped_linear_contiguous(h, self.w2, layout, self.fp8)

    def forward_masked(self, x: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
        """x [E, max_m, dim] -> [E, max_m, dim]; rows >= masked_m[e] are not meaningful."""
        h = F.silu(grouped_linear_masked(x, self.w1, masked_m, self.fp8)) * grouped_linear_masked(x, self.w3, masked_m, self.fp8)
        return grouped_linear_masked(h, self.w2, masked_m, self.fp8)


class MoE(nn.Module):
    """Routed experts + shared experts of one layer. ``gate.load`` holds per-expert token counts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        fp8 = cfg.gemm == "fp8"
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, fp8)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, fp8) if cfg.n_shared_experts else None
        #: Rows per expert block in the contiguous layout; None picks 1 on CPU, 16 for torch._grouped_mm,
        #: 128 for deep_gemm's FP8 kernels.
        self.alignment: int | None = None

    def _alignment(self, x: torch.Tensor) -> int:
        if self.alignment is not None:
            return self.alignment
        if not x.is_cuda:
            return 1  # no kernel constraint on CPU; padding would be wasted work
        return 128 if self.experts.fp8 else 16  # DeepGEMM's M alignment / torch._grouped_mm's

    def dispatch_contiguous(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ContiguousLayout]:
        """x [T, dim] -> (rows [M, dim] in the contiguous layout, layout); padding rows are zero."""
        layout = contiguous_layout(indices, self.cfg.n_routed_experts, self._alignment(x))
        return self.gather_rows(x, layout), layout

    @staticmethod
    def gather_rows(x: torch.Tensor, layout: ContiguousLayout) -> torch.Tensor:
        """x [T, dim] -> the layout's rows [M, dim] (row i is token ``row_token[i]``; padding rows zero)."""
        if layout.alignment == 1:  # no padding rows: a plain gather
            return x[layout.row_token]
        valid = layout.row_token >= 0
        return x[layout.row_token.clamp(min=0)] * valid[:, None].to(x.dtype)

    def combine_contiguous(self, rows: torch.Tensor, weights: torch.Tensor, layout: ContiguousLayout, num_tokens: int) -> torch.Tensor:
        """Weighted sum of each token's expert outputs: rows [M, dim] -> [T, dim]."""
        out = rows.new_zeros(num_tokens, rows.shape[1])
        if layout.alignment == 1:
            w = weights[layout.row_token, layout.row_slot]
            return out.index_add(0, layout.row_token, rows * w[:, None].to(rows.dtype))
        valid = layout.row_token >= 0
        w = weights[layout.row_token.clamp(min=0), layout.row_slot.clamp(min=0)] * valid.to(weights.dtype)
        return out.index_add(0, layout.row_token.clamp(min=0), rows * w[:, None].to(rows.dtype))

    def dispatch_masked(self, x: torch.Tensor, indices: torch.Tensor, max_m: int | None = None) -> tuple[torch.Tensor, MaskedLayout]:
        """x [T, dim] -> (groups [E, max_m, dim], layout); unused rows are zero."""
        layout = masked_layout(indices, self.cfg.n_routed_experts, max_m)
        valid = layout.token_index >= 0
        groups = x[layout.token_index.clamp(min=0)] * valid[..., None].to(x.dtype)
        return groups, layout

    def combine_masked(self, groups: torch.Tensor, weights: torch.Tensor, layout: MaskedLayout, num_tokens: int) -> torch.Tensor:
        """groups [E, max_m, dim] -> [T, dim]."""
        valid = (layout.token_index >= 0).flatten()
        tok = layout.token_index.flatten().clamp(min=0)
        w = weights[tok, layout.slot.flatten().clamp(min=0)] * valid.to(weights.dtype)
        out = groups.new_zeros(num_tokens, groups.shape[-1])
        return out.index_add(0, tok, groups.flatten(0, 1) * w[:, None].to(groups.dtype))

    def forward(self, x: torch.Tensor, layout: Layout = "auto", token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] -> [..., dim]. ``layout``: contiguous (training/prefill), masked (decode), or
        auto (masked when there are at most as many tokens as experts, i.e. a decode batch).
        ``token_mask`` [...] bool: only these tokens are routed and computed (padding gives zeros)."""
        if token_mask is not None:
            flat = x.reshape(-1, self.cfg.dim)
            keep = token_mask.reshape(-1)
            out = flat.new_zeros(flat.shape)
            out[keep] = self.forward(flat[keep], layout)
            return out.view(x.shape)
        shape = x.shape
        x = x.reshape(-1, self.cfg.dim)
        t = x.shape[0]
        weights, indices = self.gate(x)
        if layout == "auto":
            layout = "masked" if t <= self.cfg.n_routed_experts else "contiguous"
        if layout == "contiguous":
            with phase("dispatch"):
                rows, lay = self.dispatch_contiguous(x, indices)
            with phase("mlp"):
                rows = self.experts.forward_contiguous(rows, lay)
            with phase("combine"):
                y = self.combine_contiguous(rows, weights, lay, t)
        elif layout == "masked":
            with phase("dispatch"):
                groups, lay = self.dispatch_masked(x, indices)
            with phase("mlp"):
                groups = self.experts.forward_masked(groups, lay.masked_m)
            with phase("combine"):
                y = self.combine_masked(groups, weights, lay, t)
        else:
            raise ValueError(f"layout must be 'auto', 'contiguous' or 'masked', got {layout!r}")
        if self.shared_experts is not None:
            with phase("mlp"):
                y = y + self.shared_experts(x)
        return y.view(shape)
