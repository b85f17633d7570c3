"""Triton kernel of the per-token FP8 cast.

One program quantizes a [BLOCK_M, 128] tile: one scale group for BLOCK_M rows. Traffic per element
is 2 bytes read (bf16) + 1 byte written, plus 4 bytes of scale per 128 elements, so the kernel is
memory-bound and is judged in GB/s against the device copy bandwidth.

Divisions use ``div_rn`` (IEEE round-to-nearest) instead of Triton's default approximate fp32
division, so the result matches the PyTorch reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["per_token_cast_to_fp8_triton"]


@triton.jit
def _ceil_to_ue8m0(scale):
    # Exponent-bit rounding up to a power of two; exact for positive normal floats.
    bits = scale.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(v):
    # Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32. Only used
    # under Triton's CPU interpreter, whose fp32 -> fp8 conversion drops the carry when rounding
    # up across a power of two (-7.76 became -4.0). After this the conversion is exact.
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    quantum_exp = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2^-6
    quantum = ((quantum_exp + 127) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(v) / quantum  # exact: division by a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds t to an integer, ties to even
    rounded = (t * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)  # keep the sign, -0 too
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _per_token_cast_kernel(
    x_ptr, y_ptr, sf_ptr,
    M, N,
    stride_xm, stride_xn, stride_ym, stride_yn, stride_sm, stride_sg,
    FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    sf = tl.math.div_rn(amax, FP8_MAX)
    if USE_UE8M0:
        sf = _ceil_to_ue8m0(sf)
    inv = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
    y = x * inv[:, None]
    if INTERPRET:
        y = _round_to_e4m3_grid(y)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y, mask=mask)
    tl.store(sf_ptr + rows64 * stride_sm + pid_g * stride_sg, sf, mask=row_ok)


def _default_block_m(m: int) -> int:
    # 32 rows x 128 channels of bf16 = 8 KiB per program: enough bytes in flight per SM without
    # starving the grid at small m.
    return 32 if m >= 32 else max(1, triton.next_power_of_2(m))


def per_token_cast_to_fp8_triton(
    x: torch.Tensor, use_ue8m0: bool = False, block_m: int | None = None, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. ``x`` [m, n] (any strides) -> (``y`` [m, n] e4m3, ``sf`` [m, ceil(n/128)] fp32)."""
    m, n = x.shape
    groups = ceil_div(n, GROUP_SIZE)
    y = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y, sf
    block_m = block_m or _default_block_m(m)
    grid = (ceil_div(m, block_m), groups)
    _per_token_cast_kernel[grid](
        x, y, sf, m, n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sf.stride(0), sf.stride(1),
        FP8_MAX=FP8_E4M3_MAX, BLOCK_M=block_m, GROUP=GROUP_SIZE, USE_UE8M0=use_ue8m0,
        INTERPRET=interpreter_enabled(), num_warps=num_warps,
    )
    return y, sf
