"""Public cast entry points: argument checks, then the Triton kernel on Hopper or the reference."""

from __future__ import annotations

import torch

from openinfra.kernels.backend import use_triton
from openinfra.kernels.deep_gemm.cast.reference import per_token_cast_to_fp8_reference
from openinfra.kernels.deep_gemm.utils import check_float_matrix as _check_matrix

__all__ = ["per_token_cast_to_fp8"]


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 e4m3 with one scale per token per 128 channels.

    Args:
        x: [m, n] bf16 / fp16 / fp32, any strides. n need not be a multiple of 128 (the last group
            is partial).
        use_ue8m0: round each scale up to a power of two (DeepGEMM's "ue8m0" scales).

    Returns:
        ``(y, sf)``: y [m, n] ``torch.float8_e4m3fn``; sf [m, ceil(n / 128)] float32 with
        ``sf = max(amax, 1e-4) / 448`` per group, so ``x ~= y * sf`` group-wise.
    """
    _check_matrix("x", x)
    if use_triton(x):
        from openinfra.kernels.deep_gemm.cast.kernel import per_token_cast_to_fp8_triton

        return per_token_cast_to_fp8_triton(x, use_ue8m0)
    return per_token_cast_to_fp8_reference(x, use_ue8m0)
