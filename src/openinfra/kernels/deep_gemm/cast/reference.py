"""PyTorch reference of the FP8 casts: the CPU path and the oracle the kernels match bit for bit.

Arithmetic is spelled out so the kernel can do exactly the same IEEE operations: fp32 amax,
``scale = amax / 448`` (correctly rounded division), optional rounding up to a power of two by
exponent bits, then ``x * (1 / scale)`` rounded to e4m3 (round to nearest even).
"""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["ceil_to_ue8m0", "per_token_cast_to_fp8_reference"]

AMAX_FLOOR = 1e-4


def ceil_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal fp32 values up to the next power of two (identity on powers of two).

    Done on the exponent bits rather than with ``2 ** ceil(log2(x))`` so it is exact.
    """
    bits = scale.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def per_token_cast_to_fp8_reference(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [m, n] to e4m3 with one fp32 scale per row per 128 channels.

    Returns ``(y [m, n] float8_e4m3fn, sf [m, ceil(n/128)] float32)`` with
    ``x ~= y.float() * sf.repeat_interleave(128, 1)[:, :n]``.
    """
    m, n = x.shape
    groups = ceil_div(n, GROUP_SIZE)
    padded = torch.zeros(m, groups * GROUP_SIZE, dtype=torch.float32, device=x.device)
    padded[:, :n] = x.float()
    padded = padded.view(m, groups, GROUP_SIZE)
    amax = padded.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    # Tensor-by-tensor division: on CUDA, PyTorch turns division by a Python scalar into
    # multiplication by its reciprocal, which is not the correctly rounded quotient.
    sf = torch.div(amax, torch.full_like(amax, FP8_E4M3_MAX))
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    inv = torch.div(torch.ones_like(sf), sf)
    y = (padded * inv.unsqueeze(2)).to(torch.float8_e4m3fn)
    return y.view(m, groups * GROUP_SIZE)[:, :n].contiguous(), sf
