"""Building blocks: RMSNorm, the Linear layer with its FP8 path, and the SwiGLU MLP.

The FP8 path (``ModelConfig.gemm == "fp8"``) runs ``y = x @ W.T`` through deep_gemm's block-scaled
FP8 GEMM (activations 1x128, weights 128x128) when three things hold at call time: the tensor is on a
Hopper GPU (``openinfra.kernels.backend.use_triton``), ``openinfra.kernels.deep_gemm`` exposes the
GEMM and cast entry points, and both dims are multiples of 128. Otherwise the layer computes in its
parameter dtype (bf16 on GPU, fp32 or bf16 on CPU). The backward of the FP8 forward runs in the
parameter dtype: gradients see the unquantized weight (straight-through quantization).
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
    """deep_gemm's module when it has the pieces the FP8 path needs, else None (checked per call:
    the kernels are an optional, separately built component)."""
    try:
        mod = importlib.import_module("openinfra.kernels.deep_gemm")
    except ImportError:
        return None
    needed = ("fp8_gemm_nt", "per_token_cast_to_fp8", "per_block_cast_to_fp8")
    return mod if all(hasattr(mod, n) for n in needed) else None


def fp8_gemm_available(x: torch.Tensor) -> bool:
    """Whether :class:`Linear` with ``fp8=True`` would run the FP8 GEMM for input ``x``."""
    from openinfra.kernels.backend import use_triton

    return _deep_gemm() is not None and x.is_cuda and use_triton(x)


class _FP8LinearFn(torch.autograd.Function):
    """Forward through deep_gemm's FP8 GEMM; backward in the weight's dtype (straight-through)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor):  # type: ignore[override]
        dg = _deep_gemm()
        xq, xs = dg.per_token_cast_to_fp8(x2d.contiguous())
        out = torch.empty(x2d.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x2d.device)
        dg.fp8_gemm_nt((xq, xs), (wq, ws), out)
        ctx.save_for_backward(x2d, weight)
        return out.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x2d, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dw = grad.t() @ x2d.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


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
        self._wcache: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def _quantized_weight(self, dg) -> tuple[torch.Tensor, torch.Tensor]:
        # Re-quantize only when the weight changed (optimizer steps bump its version counter).
        key = (self.weight.data_ptr(), self.weight._version)
        if self._wcache is None or self._wcache[:2] != key:
            with torch.no_grad():
                wq, ws = dg.per_block_cast_to_fp8(self.weight.detach())
            self._wcache = (*key, wq, ws)
        return self._wcache[2], self._wcache[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fp8 and self.in_features % 128 == 0 and self.out_features % 128 == 0
                and fp8_gemm_available(x)):
            dg = _deep_gemm()
            wq, ws = self._quantized_weight(dg)
            y = _FP8LinearFn.apply(x.reshape(-1, self.in_features), self.weight, wq, ws)
            return y.view(*x.shape[:-1], self.out_features)
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
