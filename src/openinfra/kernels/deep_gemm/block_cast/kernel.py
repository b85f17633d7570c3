"""Triton kernel of the per-block (128x128) and per-channel (128x1) FP8 casts.

One program owns 128 rows x BLOCK_N columns. Per block, BLOCK_N is 128 and the amax runs over the
whole tile; per channel, the amax runs down each column. Memory-bound like the per-token cast:
2 bytes read (bf16) + 1 written per element. Divisions use ``div_rn`` so results equal the
reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.deep_gemm.cast.kernel import _ceil_to_ue8m0, _round_to_e4m3_grid
from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["block_cast_to_fp8_triton"]


@triton.jit
def _block_cast_kernel(
    x_ptr, y_ptr, sf_ptr,
    M, N,
    stride_xm, stride_xn, stride_ym, stride_yn, stride_sm, stride_sn,
    FP8_MAX: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PER_BLOCK: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * GROUP + tl.arange(0, GROUP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4)  # [BLOCK_N]: per column
    if PER_BLOCK:
        # Broadcast the tile's amax back to a vector so both forms share one (vector) division path;
        # a scalar reciprocal compiled to a different rounding on the GPU than the reference.
        amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
    sf = tl.math.div_rn(amax, FP8_MAX)
    if USE_UE8M0:
        sf = _ceil_to_ue8m0(sf)
    inv = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
    y = x * inv[None, :]
    if INTERPRET:
        y = _round_to_e4m3_grid(y)
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)
    if PER_BLOCK:
        tl.store(sf_ptr + pid_m * stride_sm + pid_n * stride_sn, tl.max(sf, axis=0))
    else:
        tl.store(sf_ptr + pid_m * stride_sm + cols * stride_sn, sf, mask=col_ok)


def block_cast_to_fp8_triton(
    x: torch.Tensor, per_block: bool, use_ue8m0: bool = False, block_n: int = 64, num_warps: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [m, n] (any strides) -> e4m3 ``y`` [m, n] and fp32 ``sf``:
    [ceil(m/128), ceil(n/128)] per block, [ceil(m/128), n] per channel."""
    m, n = x.shape
    gm = ceil_div(m, GROUP_SIZE)
    block_n = GROUP_SIZE if per_block else block_n
    y = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(gm, ceil_div(n, GROUP_SIZE) if per_block else n, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y, sf
    grid = (gm, ceil_div(n, block_n))
    _block_cast_kernel[grid](
        x, y, sf, m, n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sf.stride(0), sf.stride(1),
        FP8_MAX=FP8_E4M3_MAX, GROUP=GROUP_SIZE, BLOCK_N=block_n, PER_BLOCK=per_block,
        USE_UE8M0=use_ue8m0, INTERPRET=interpreter_enabled(), num_warps=num_warps,
    )
    return y, sf
