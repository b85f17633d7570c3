"""Triton kernels of DeepEP's row movement: permute (+ fused FP8 cast) and weighted unpermute.

Both are memory-bound: a program moves one [BLOCK_G x 128] tile of one row. ``scatter_rows`` reads
the tile once and stores it to every destination slot of the row (the permute of dispatch), so a
token sent to k slots costs one read and k writes; with ``CAST`` it also computes the e4m3 scale of
each 128-channel group and stores the quantized tile and its scales (the same IEEE operations as
``per_token_cast_to_fp8``, so the result matches it bit for bit). ``gather_reduce`` loads a token's
slots one after another, multiplies by the slot weight and accumulates in fp32 (the unpermute /
reduction of combine). Floating-point contraction into FMAs is switched off at launch so that
``w * v + acc`` rounds like the PyTorch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.deep_gemm.cast.kernel import _ceil_to_ue8m0, _round_to_e4m3_grid
from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["scatter_rows_triton", "gather_reduce_triton"]


@triton.jit
def _scatter_rows_kernel(
    src_ptr, idx_ptr, out_ptr, sf_ptr,
    H, S,
    stride_src, stride_idx, stride_out, stride_sf,
    BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
    CAST: tl.constexpr, ROUND_SCALE: tl.constexpr, INTERPRET: tl.constexpr, FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < H
    x = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0)
    if CAST:
        xf = x.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4)
        sf = tl.math.div_rn(amax, FP8_MAX)
        if ROUND_SCALE:
            sf = _ceil_to_ue8m0(sf)
        inv = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
        y = xf * inv[:, None]
        if INTERPRET:
            y = _round_to_e4m3_grid(y)
        y = y.to(out_ptr.dtype.element_ty)
    else:
        y = x.to(out_ptr.dtype.element_ty)
    group_ok = groups * GROUP < H
    for s in range(S):
        dst = tl.load(idx_ptr + row * stride_idx + s)
        ok = dst >= 0
        dst = tl.where(ok, dst, 0).to(tl.int64)
        tl.store(out_ptr + dst * stride_out + cols, y, mask=mask & ok)
        if CAST:
            tl.store(sf_ptr + dst * stride_sf + groups, sf, mask=group_ok & ok)


@triton.jit
def _round_to_bf16_grid(v):
    # Round fp32 to the nearest bf16 value (ties to even), staying in fp32. Only used under Triton's
    # CPU interpreter, whose fp32 -> bf16 conversion truncates; after this the conversion is exact.
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _gather_reduce_kernel(
    src_ptr, idx_ptr, w_ptr, b0_ptr, b1_ptr, out_ptr,
    H, S,
    stride_src, stride_idx, stride_w, stride_b0, stride_b1, stride_out,
    BLOCK_H: tl.constexpr, HAS_W: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(S):
        i = tl.load(idx_ptr + row * stride_idx + s)
        ok = i >= 0
        i = tl.where(ok, i, 0).to(tl.int64)
        v = tl.load(src_ptr + i * stride_src + cols, mask=mask & ok, other=0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + row * stride_w + s).to(tl.float32)
            v = v * w
        acc = acc + v
    if HAS_B0:
        acc = acc + tl.load(b0_ptr + row * stride_b0 + cols, mask=mask, other=0).to(tl.float32)
    if HAS_B1:
        acc = acc + tl.load(b1_ptr + row * stride_b1 + cols, mask=mask, other=0).to(tl.float32)
    if ROUND_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_groups(hidden: int) -> int:
    # 32 groups x 128 channels = 4096 elements (8 KiB of bf16) per program. Measured on the H200
    # (benchmarks/notes/deep_ep.md, sweep 2): at H=7168 the fused permute + FP8 cast moves 0.83 of
    # the copy bandwidth with 32 groups, 0.79 with 16 and 0.77 with 8 (the bf16 permute 0.85 at
    # every width): wider tiles issue more independent loads per program before the first store.
    return min(32, triton.next_power_of_2(ceil_div(hidden, GROUP_SIZE)))


def scatter_rows_triton(
    src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, out_scales: torch.Tensor | None = None,
    cast_fp8: bool = False, round_scale: bool = False, num_warps: int = 4, block_groups: int | None = None,
) -> None:
    """Launch ``_scatter_rows_kernel``; shapes and semantics as ``scatter_rows_reference``.

    ``block_groups`` (a power of two) overrides the 128-channel groups per program (tuning only)."""
    n, hidden = src.shape
    slots = index.shape[1]
    if n == 0 or slots == 0 or hidden == 0:
        return
    block_g = block_groups or _block_groups(hidden)
    grid = (n, ceil_div(ceil_div(hidden, GROUP_SIZE), block_g))
    sf = out_scales if cast_fp8 else out
    _scatter_rows_kernel[grid](
        src, index, out, sf, hidden, slots,
        src.stride(0), index.stride(0), out.stride(0), sf.stride(0),
        BLOCK_G=block_g, GROUP=GROUP_SIZE, CAST=cast_fp8, ROUND_SCALE=round_scale,
        INTERPRET=interpreter_enabled(), FP8_MAX=FP8_E4M3_MAX, num_warps=num_warps,
    )


def gather_reduce_triton(
    src: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, bias0: torch.Tensor | None,
    bias1: torch.Tensor | None, out: torch.Tensor, num_warps: int = 4,
) -> torch.Tensor:
    """Launch ``_gather_reduce_kernel``; shapes and semantics as ``gather_reduce_reference``."""
    rows, slots = index.shape
    hidden = out.shape[1]
    if rows == 0 or hidden == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(hidden))
    grid = (rows, ceil_div(hidden, block_h))
    w = weights if weights is not None else index
    b0 = bias0 if bias0 is not None else out
    b1 = bias1 if bias1 is not None else out
    _gather_reduce_kernel[grid](
        src, index, w, b0, b1, out, hidden, slots,
        src.stride(0), index.stride(0), w.stride(0), b0.stride(0), b1.stride(0), out.stride(0),
        BLOCK_H=block_h, HAS_W=weights is not None, HAS_B0=bias0 is not None, HAS_B1=bias1 is not None,
        ROUND_BF16=interpreter_enabled() and out.dtype == torch.bfloat16, num_warps=num_warps, enable_fp_fusion=False,
    )
    return out
