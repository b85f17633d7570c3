"""``FP8Linear``: a drop-in ``nn.Linear`` whose three GEMMs run in FP8 with DeepSeek-V3's recipe.

Forward: ``y = x @ W.T (+ bias)``: x cast per token per 128 channels, W per 128x128 block, one
:func:`fp8_gemm_nt`. Backward, through the same kernels (their references on CPU):

- dgrad ``dx = dy @ W``: dy cast per token (1x128 along N); the forward's block-quantized W is
  reused, transposed (block scales transpose exactly), so the GEMM is again the fast K-major ``nt``;
- wgrad ``dW = dy.T @ x``: the reduction runs over tokens, so both operands are cast 1x128 along
  the token dimension (recipe (1, 1, 128)); tokens are zero-padded to a multiple of 128, which adds
  nothing to the sums. Accumulated in fp32.

Master weights stay in their own dtype (fp32 or bf16); only the GEMM operands are FP8.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openinfra.kernels.deep_gemm.block_cast import per_block_cast_to_fp8
from openinfra.kernels.deep_gemm.cast import per_token_cast_to_fp8
from openinfra.kernels.deep_gemm.gemm import fp8_gemm_nt
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, align

__all__ = ["FP8Linear", "fp8_linear"]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.bfloat16


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    out = x.new_zeros(rows, x.shape[1])
    out[: x.shape[0]] = x
    return out


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_ue8m0: bool):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq = per_token_cast_to_fp8(x2, use_ue8m0)
        wq = per_block_cast_to_fp8(weight, use_ue8m0)
        y = torch.empty(x2.shape[0], weight.shape[0], dtype=_out_dtype(x.dtype), device=x.device)
        fp8_gemm_nt(xq, wq, y)
        if bias is not None:
            y += bias.to(y.dtype)
        ctx.save_for_backward(x2, wq[0], wq[1])
        ctx.has_bias = bias is not None
        ctx.use_ue8m0 = use_ue8m0
        ctx.weight_dtype = weight.dtype
        ctx.lead = lead
        return y.view(*lead, weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w_fp8, w_sf = ctx.saved_tensors
        n, k = w_fp8.shape
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq = per_token_cast_to_fp8(dy2, ctx.use_ue8m0)
            wt = (w_fp8.t().contiguous(), w_sf.t().contiguous())  # W.T [K, N], blocks transposed
            dx2 = torch.empty(dy2.shape[0], k, dtype=_out_dtype(x2.dtype), device=dy.device)
            fp8_gemm_nt(dyq, wt, dx2)
            dx = dx2.view(*ctx.lead, k).to(x2.dtype)
        if ctx.needs_input_grad[1]:
            tokens = align(max(dy2.shape[0], 1), GROUP_SIZE)
            dyt = per_token_cast_to_fp8(_pad_rows(dy2, tokens).t(), ctx.use_ue8m0)  # [N, tokens], 1x128 along tokens
            xt = per_token_cast_to_fp8(_pad_rows(x2, tokens).t(), ctx.use_ue8m0)    # [K, tokens]
            dw32 = torch.empty(n, k, dtype=torch.float32, device=dy.device)
            fp8_gemm_nt(dyt, xt, dw32, recipe=(1, 1, GROUP_SIZE))
            dw = dw32.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               use_ue8m0: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` with FP8 GEMMs forward and backward (see the module docstring).

    Args:
        x: [..., in_features] bf16 / fp32 (fp16 works; the GEMM writes bf16 then).
        weight: [out_features, in_features]; both dimensions multiples of 128.
        bias: optional [out_features].
        use_ue8m0: power-of-two scales for every cast.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    for name, size in (("in_features", weight.shape[1]), ("out_features", weight.shape[0])):
        if size % GROUP_SIZE:
            raise ValueError(f"{name} must be a multiple of {GROUP_SIZE} for FP8 GEMMs, got {size}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return _FP8LinearFunction.apply(x, weight, bias, use_ue8m0)


class FP8Linear(nn.Module):
    """``nn.Linear`` with FP8 GEMMs (forward, dgrad, wgrad); same parameters and initialisation.

    Args:
        in_features, out_features: multiples of 128 (one scale per 128 channels).
        bias: add a learnable bias.
        use_ue8m0: power-of-two scales.
        device, dtype: of the master parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, use_ue8m0: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(size, int) or size <= 0 or size % GROUP_SIZE:
                raise ValueError(f"{name} must be a positive multiple of {GROUP_SIZE}, got {size!r}")
        self.in_features, self.out_features, self.use_ue8m0 = in_features, out_features, use_ue8m0
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so swapping the class keeps training behaviour.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_ue8m0: bool = False) -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s parameters."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features, out.use_ue8m0 = linear.in_features, linear.out_features, use_ue8m0
        for name, size in (("in_features", out.in_features), ("out_features", out.out_features)):
            if size % GROUP_SIZE:
                raise ValueError(f"{name} must be a multiple of {GROUP_SIZE}, got {size}")
        out.weight = linear.weight
        out.bias = linear.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.use_ue8m0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, use_ue8m0={self.use_ue8m0}"
