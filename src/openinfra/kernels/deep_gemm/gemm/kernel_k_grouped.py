"""Triton kernel of the K-grouped FP8 GEMM (MoE weight gradients).

Group g multiplies ``a_g`` [M, k_g] by ``b_g`` [N, k_g] with both operands scaled 1x128 along K
(per channel: ``sf[m, k/128]``), and writes ``d[g]`` [M, N] (+ ``c[g]``). The groups' K ranges
lie end to end in one buffer; each group's start is the sum of the earlier ``ks``, read on the
device from ``ks_tensor``, so one launch serves any split of K.

Two storage forms of the contiguous buffers, chosen by the constexpr ``K_MAJOR``:

- MN-major ("tn", what the MoE backward naturally holds): ``a`` [sum_k, M], ``sfa`` [sum_k/128, M];
  group g is rows ``[k0, k0 + k_g)``;
- K-major ("nt"): ``a`` is flat, group g is an [M, k_g] row-major block at element ``k0 * M``;
  ``sfa`` [M, sum_k/128].

Same two-level accumulation and persistent, rasterised tile walk as the M-side kernel; the group
is the slowest tile index so each group's B columns are reused from L2 by all its tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.deep_gemm.gemm.config import GemmConfig, num_sms
from openinfra.kernels.deep_gemm.gemm.kernel import _raster
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div

__all__ = ["launch_k_grouped_gemm"]


@triton.jit
def _k_grouped_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr, sfa_ptr, sfb_ptr, ks_ptr,
    M, N, G,
    stride_am, stride_ak, stride_bn, stride_bk,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    stride_dg, stride_dm, stride_dn, stride_cg, stride_cm, stride_cn,
    K_MAJOR: tl.constexpr,
    HAS_C: tl.constexpr,
    G_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_mn = tiles_m * tiles_n
    group_ids = tl.arange(0, G_POW2)
    ks = tl.load(ks_ptr + group_ids, mask=group_ids < G, other=0)
    for tile_id in tl.range(tl.program_id(0), tiles_mn * G, NUM_SMS):
        g = tile_id // tiles_mn
        pid_m, pid_n = _raster(tile_id % tiles_mn, tiles_m, tiles_n, GROUP_M)
        k_start = tl.sum(tl.where(group_ids < g, ks, 0), axis=0).to(tl.int64)
        k_len = tl.sum(tl.where(group_ids == g, ks, 0), axis=0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        if K_MAJOR:
            a_ptrs = a_ptr + k_start * M + rm[:, None] * k_len + rk[None, :]
            b_ptrs = b_ptr + k_start * N + rn[None, :] * k_len + rk[:, None]
            a_step = BLOCK_K
            b_step = BLOCK_K
        else:
            a_ptrs = a_ptr + k_start * stride_ak + rm[:, None] * stride_am + rk[None, :] * stride_ak
            b_ptrs = b_ptr + k_start * stride_bk + rn[None, :] * stride_bn + rk[:, None] * stride_bk
            a_step = BLOCK_K * stride_ak
            b_step = BLOCK_K * stride_bk
        kb0 = k_start // BLOCK_K
        sfa_ptrs = sfa_ptr + kb0 * stride_sak + rm * stride_sam
        sfb_ptrs = sfb_ptr + kb0 * stride_sbk + rn * stride_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in tl.range(0, k_len // BLOCK_K, num_stages=NUM_STAGES):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            sa = tl.load(sfa_ptrs)
            sb = tl.load(sfb_ptrs)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            a_ptrs += a_step
            b_ptrs += b_step
            sfa_ptrs += stride_sak
            sfb_ptrs += stride_sbk
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        om = offs_m.to(tl.int64)
        g64 = g.to(tl.int64)
        if HAS_C:
            c = tl.load(c_ptr + g64 * stride_cg + om[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=mask, other=0.0)
            acc += c.to(tl.float32)
        tl.store(d_ptr + g64 * stride_dg + om[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                 acc.to(d_ptr.dtype.element_ty), mask=mask)


def launch_k_grouped_gemm(
    a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
    ks_tensor: torch.Tensor, config: GemmConfig, *, k_major: bool, c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on validated buffers. MN-major: a [sum_k, M], b [sum_k, N], sfa [sum_k/128, M],
    sfb [sum_k/128, N]. K-major: a / b flat, sfa [M, sum_k/128], sfb [N, sum_k/128].
    d, c: [G, M, N]; ks_tensor [G] int32 (multiples of 128)."""
    groups, m, n = d.shape
    if groups == 0 or m == 0 or n == 0:
        return d
    if k_major:
        sam, sak, sbn, sbk = sfa.stride(0), sfa.stride(1), sfb.stride(0), sfb.stride(1)
        strides_ab = (0, 0, 0, 0)
    else:
        sam, sak, sbn, sbk = sfa.stride(1), sfa.stride(0), sfb.stride(1), sfb.stride(0)
        strides_ab = (a.stride(1), a.stride(0), b.stride(1), b.stride(0))
    tiles = groups * ceil_div(m, config.block_m) * ceil_div(n, config.block_n)
    grid = (max(1, min(num_sms(d.device) * config.programs_per_sm, tiles)),)
    cs = (c.stride(0), c.stride(1), c.stride(2)) if c is not None else (0, 0, 0)
    _k_grouped_kernel[grid](
        a, b, d, c if c is not None else d, sfa, sfb, ks_tensor,
        m, n, groups, *strides_ab, sam, sak, sbn, sbk,
        d.stride(0), d.stride(1), d.stride(2), *cs,
        K_MAJOR=k_major, HAS_C=c is not None, G_POW2=triton.next_power_of_2(groups),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=GROUP_SIZE, GROUP_M=config.group_m,
        NUM_SMS=grid[0], NUM_STAGES=config.num_stages, num_warps=config.num_warps,
    )
    return d
