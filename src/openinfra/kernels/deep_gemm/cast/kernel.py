"""Triton kernel of the per-token FP8 cast.

One program quantizes a [BLOCK_M, GROUPS * 128] tile: GROUPS consecutive scale groups of BLOCK_M
rows. Traffic per element is 2 bytes read (bf16) + 1 byte written, plus 4 bytes of scale per 128
elements, so the kernel is memory-bound and is judged in GB/s against the device copy bandwidth.
Wide tiles (several groups of a row) keep each row's reads long and contiguous.

Bit-exactness with the PyTorch reference takes two precautions:
- divisions use ``div_rn`` (IEEE round-to-nearest), not Triton's default approximate fp32 division;
- under Triton's CPU interpreter only, the quotient is rounded to the e4m3 grid in fp32 first
  (``_round_to_e4m3_grid``): the interpreter's fp32 -> e4m3 conversion drops the carry when
  rounding up across a power of two (-7.76 became -4.0). On the GPU the hardware conversion
  (round to nearest even, saturating) is used directly.

Rows are walked in a loop of ITERS blocks of BLOCK_M so each program keeps several tiles' loads
in flight (software-pipelined with NUM_STAGES).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["per_token_cast_to_fp8_triton", "default_tile"]


@triton.jit
def _ceil_to_ue8m0(scale):
    # Exponent-bit rounding up to a power of two; exact for positive normal floats.
    bits = scale.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(v):
    # Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    quantum_exp = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2^-6
    quantum = ((quantum_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - quantum_exp) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(v) * inv_quantum  # exact: scaling by a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds t to an integer, ties to even
    rounded = (t * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)  # keep the sign, -0 too
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _per_token_cast_kernel(
    x_ptr, y_ptr, sf_ptr,
    M, N, NUM_GROUPS,
    stride_xm, stride_xn, stride_ym, stride_yn, stride_sm, stride_sg,
    FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
    ITERS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_g * GROUPS * GROUP + tl.arange(0, GROUPS * GROUP)
    col_ok = cols < N
    groups = pid_g * GROUPS + tl.arange(0, GROUPS)
    group_ok = groups < NUM_GROUPS
    for it in tl.range(0, ITERS, num_stages=NUM_STAGES):
        rows = (pid_m * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        x = tl.reshape(x.to(tl.float32), (BLOCK_M, GROUPS, GROUP))
        amax = tl.maximum(tl.max(tl.abs(x), axis=2), 1e-4)  # [BLOCK_M, GROUPS]
        sf = tl.math.div_rn(amax, FP8_MAX)
        if USE_UE8M0:
            sf = _ceil_to_ue8m0(sf)
        inv = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
        y = x * inv[:, :, None]
        if INTERPRET:
            y = _round_to_e4m3_grid(y)
        y = tl.reshape(y, (BLOCK_M, GROUPS * GROUP)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y, mask=mask)
        sf_mask = row_ok[:, None] & group_ok[None, :]
        tl.store(sf_ptr + rows64[:, None] * stride_sm + groups[None, :] * stride_sg, sf, mask=sf_mask)


def default_tile(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, GROUPS, num_warps, ITERS, NUM_STAGES) for an [m, n] input; chosen from H200
    variant timings (benchmarks/notes/fp8_cast.md)."""
    groups = min(4, triton.next_power_of_2(ceil_div(n, GROUP_SIZE)))
    block_m = min(triton.next_power_of_2(max(m, 1)), max(1, 32 // groups))
    if m * n < (1 << 22):  # small inputs: one tile per program keeps the grid wide
        return block_m, groups, 4, 1, 1
    # large inputs: 8 warps walking 4 row blocks, pipelined 3 deep (H200: 0.71-0.83 of copy)
    return min(block_m, 8), groups, 8, 4, 3


def per_token_cast_to_fp8_triton(
    x: torch.Tensor,
    use_ue8m0: bool = False,
    block_m: int | None = None,
    groups: int | None = None,
    num_warps: int | None = None,
    iters: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. ``x`` [m, n] (any strides) -> (``y`` [m, n] e4m3, ``sf`` [m, ceil(n/128)] fp32).

    The keyword arguments override the tile (for benchmarking variants).
    """
    m, n = x.shape
    num_groups = ceil_div(n, GROUP_SIZE)
    y = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y, sf
    d = default_tile(m, n)
    block_m, groups, num_warps = block_m or d[0], groups or d[1], num_warps or d[2]
    iters, num_stages = iters or d[3], num_stages or d[4]
    grid = (ceil_div(m, block_m * iters), ceil_div(num_groups, groups))
    _per_token_cast_kernel[grid](
        x, y, sf, m, n, num_groups,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sf.stride(0), sf.stride(1),
        FP8_MAX=FP8_E4M3_MAX, BLOCK_M=block_m, GROUPS=groups, GROUP=GROUP_SIZE, USE_UE8M0=use_ue8m0,
        INTERPRET=interpreter_enabled(), ITERS=iters, NUM_STAGES=num_stages, num_warps=num_warps,
    )
    return y, sf
