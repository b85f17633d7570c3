"""Public per-block / per-channel cast entry points: checks, then Triton on Hopper or the reference."""

from __future__ import annotations

import torch

from openinfra.kernels.backend import use_triton
from openinfra.kernels.deep_gemm.block_cast.reference import (
    per_block_cast_to_fp8_reference,
    per_channel_cast_to_fp8_reference,
)
from openinfra.kernels.deep_gemm.utils import check_float_matrix as _check_matrix

__all__ = ["per_block_cast_to_fp8", "per_channel_cast_to_fp8"]


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to FP8 e4m3 with one scale per 128 x 128 block.

    Args:
        x: [m, n] bf16 / fp16 / fp32 (for a GEMM's B operand: [N, K]), any strides; partial edge
            blocks are allowed.
        use_ue8m0: round each scale up to a power of two.

    Returns:
        ``(y, sf)``: y [m, n] ``torch.float8_e4m3fn``; sf [ceil(m/128), ceil(n/128)] float32 with
        ``sf = max(amax, 1e-4) / 448`` per block.
    """
    _check_matrix("x", x)
    if use_triton(x):
        from openinfra.kernels.deep_gemm.block_cast.kernel import block_cast_to_fp8_triton

        return block_cast_to_fp8_triton(x, per_block=True, use_ue8m0=use_ue8m0)
    return per_block_cast_to_fp8_reference(x, use_ue8m0)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with one scale per column per 128 rows (K runs down the rows).

    This is the operand form of the weight-gradient GEMMs: ``x`` [k, mn] is, e.g., the output
    gradient [tokens, N] whose token dimension is the reduction dimension.

    Args:
        x: [m, n] bf16 / fp16 / fp32, any strides; m need not be a multiple of 128.
        use_ue8m0: round each scale up to a power of two.

    Returns:
        ``(y, sf)``: y [m, n] e4m3; sf [ceil(m/128), n] float32.
    """
    _check_matrix("x", x)
    if use_triton(x):
        from openinfra.kernels.deep_gemm.block_cast.kernel import block_cast_to_fp8_triton

        return block_cast_to_fp8_triton(x, per_block=False, use_ue8m0=use_ue8m0)
    return per_channel_cast_to_fp8_reference(x, use_ue8m0)
