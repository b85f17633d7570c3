"""Building blocks: RMSNorm, the Linear layer with its FP8 path, and the SwiGLU MLP.

The FP8 path (``ModelConfig.gemm == "fp8"``) runs ``y = x @ W.T`` through deep_gemm's block-scaled
FP8 GEMM (activations 1x128, weights 128x128) when three things hold at call time: the tensor is on a
Hopper GPU (``openinfra.kernels.backend.use_triton``), ``openinfra.kernels.deep_gemm`` exposes
``fp8_linear`` (FP8 forward, dgrad and wgrad through its kernels), and both dims are multiples of
128. Otherwise the layer computes in its parameter dtype (bf16 on GPU, fp32 or bf16 on CPU).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "Linear", "MLP", "fp8_gemm_available"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last axis; statistics in at least float32, output in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(compute), (x.shape[-1],), self.weight.to(compute), self.eps).to(x.dtype)


def _deep_gemm() -> Any | None:
    """deep_gemm's module when it has ``fp8_linear`` (FP8 forward, dgrad and wgrad), else None.
    Checked per call: the kernels are an optional, separately built component."""
    try:
        mod = importlib.import_module("openinfra.kernels.deep_gemm")
    except ImportError:
        return None
    return mod if hasattr(mod, "fp8_linear") else None


def fp8_gemm_available(x: torch.Tensor) -> bool:
    """Whether :class:`Linear` with ``fp8=True`` would run the FP8 GEMM for input ``x``."""
    from openinfra.kernels.backend import use_triton

    return x.is_cuda and _deep_gemm() is not None and use_triton(x)


class Linear(nn.Module):
    """``y = x @ weight.T`` (no bias, as everywhere in DeepSeek-V3), FP8 where the hardware has it.

    Args:
        in_features, out_features: sizes; weight is [out_features, in_features].
        fp8: request the FP8 path (see the module docstring for when it runs).
    """

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fp8 = in_features, out_features, fp8
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fp8 and self.in_features % 128 == 0 and self.out_features % 128 == 0
                and fp8_gemm_available(x)):
            return _deep_gemm().fp8_linear(x, self.weight)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.fp8}"


class MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``; the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fp8)
        self.w2 = Linear(inter_dim, dim, fp8)
        self.w3 = Linear(dim, inter_dim, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
