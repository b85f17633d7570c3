"""Triton kernels of the dense and M-grouped GEMMs (FP8 block-scaled, and plain bf16).

One persistent kernel serves every M-side layout, chosen by the constexpr ``MODE``:

- ``DENSE``: one [M, N] problem, optionally split along K (``SPLIT_K`` fp32 partials, summed by
  ``_split_k_reduce_kernel``);
- ``CONTIGUOUS``: experts stacked along M; ``m_indices[row]`` names the expert (B slice) of each
  row, -1 marks padding. A tile never straddles two experts (segments are 128-row aligned and
  ``128 % BLOCK_M == 0``), so a tile's expert is the max of its rows' indices; an all-padding tile
  is skipped and padding rows are never written;
- ``MASKED``: ``a`` [G, max_m, K]; only the first ``masked_m[g]`` rows of group g are computed,
  the rest of the tile grid is skipped on the device, so one launch serves any mask (CUDA graphs).

Persistence: the grid is one program per SM and each program walks tiles ``pid, pid + SMS, ...``.
Rasterisation: ``GROUP_M`` row tiles sweep all column tiles together, so the B columns they share
are read from L2 rather than HBM.

Two-level accumulation (FP8): each 128-deep K slice is one ``tl.dot`` into a fresh accumulator,
then scaled by ``sfa[rows, slice] * sfb[cols, slice]`` and added to the fp32 accumulator on the
CUDA cores. With ``PIPELINE`` the dot of slice k+1 is issued before slice k is promoted, so the
tensor cores need not idle during the promotion. With ``SCALE_PREFETCH`` = 1 or 2 the scales of
the next one or two slices are loaded ahead by hand (Triton's pipeliner only pipelines the loads
that feed ``tl.dot``).

Interpreter notes: bf16 ``tl.dot`` is wrong under TRITON_INTERPRET (Triton issue 11584), so
``UPCAST`` turns operands to fp32 there; fp8 dots are exact there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.deep_gemm.gemm.config import GemmConfig, num_sms
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div

__all__ = ["DENSE", "CONTIGUOUS", "MASKED", "launch_gemm"]

DENSE, CONTIGUOUS, MASKED = 0, 1, 2


@triton.jit
def _raster(tile_id, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk the column tiles together: their shared B columns stay in L2.
    width = GROUP_M * tiles_n
    first_m = (tile_id // width) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile_id % width) % rows, (tile_id % width) // rows


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr, sfa_ptr, sfb_ptr, layout_ptr,
    M, N, K, G,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bn, stride_bk,
    stride_dg, stride_dm, stride_dn,
    stride_cg, stride_cm, stride_cn,
    stride_sag, stride_sam, stride_sak,
    stride_sbg, stride_sbn, stride_sbk,
    MODE: tl.constexpr,
    SCALED: tl.constexpr,
    SFB_GRAN_N: tl.constexpr,
    HAS_C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PIPELINE: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    SCALE_PREFETCH: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_mn = tiles_m * tiles_n
    if MODE == 2:
        num_tiles = tiles_mn * G
    else:
        num_tiles = tiles_mn * SPLIT_K
    k_blocks = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_blocks, SPLIT_K)
    # One scale per (128-column block, K slice) of B: a scalar per tile when the tile fits in one block.
    SFB_SCALAR: tl.constexpr = SFB_GRAN_N >= BLOCK_N

    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_k = 0
        if MODE == 2:
            # The M block is the slowest index: the valid tiles (rows < masked_m[g]) form a prefix of
            # the order, which the round-robin over programs spreads evenly.
            pid_m = tile_id // (G * tiles_n)
            rest = tile_id % (G * tiles_n)
            g = rest // tiles_n
            pid_n = rest % tiles_n
            # Clamped to max_m: under graph capture masked_m is not checked on the host, and a
            # bad value must not write into the next group's rows.
            rows_valid = tl.minimum(tl.load(layout_ptr + g), M)
            live = pid_m * BLOCK_M < rows_valid
        else:
            pid_k = tile_id // tiles_mn
            pid_m, pid_n = _raster(tile_id % tiles_mn, tiles_m, tiles_n, GROUP_M)
            rows_valid = M
            g = tile_id * 0
            live = pid_m >= 0
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if MODE == 1:
            expert = tl.load(layout_ptr + offs_m, mask=offs_m < M, other=-1)
            g = tl.max(expert, axis=0)
            live = (g >= 0) & (g < G)  # an index past the experts (unchecked under capture) reads nothing
        if live:
            g64 = g.to(tl.int64)
            # Out-of-range rows / columns read row 0 instead of being masked: no mask in the K loop,
            # and their results are never stored.
            rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
            rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
            rk = tl.arange(0, BLOCK_K)
            k_lo = pid_k * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, k_blocks)
            if USE_TMA:
                if MODE == 2:
                    tma_row_a = g * M + pid_m * BLOCK_M
                else:
                    tma_row_a = pid_m * BLOCK_M
                tma_row_b = g * N + pid_n * BLOCK_N
                a_ptrs = a_ptr
                b_ptrs = b_ptr
            else:
                a_ptrs = a_ptr + g64 * stride_ag + rm[:, None] * stride_am + (k_lo * BLOCK_K + rk)[None, :] * stride_ak
                b_ptrs = b_ptr + g64 * stride_bg + rn[None, :] * stride_bn + (k_lo * BLOCK_K + rk)[:, None] * stride_bk
            sfa_base = sfa_ptr + g64 * stride_sag + rm * stride_sam
            if SFB_SCALAR:
                sfb_base = sfb_ptr + g64 * stride_sbg + (pid_n * BLOCK_N // SFB_GRAN_N) * stride_sbn
            else:
                sfb_base = sfb_ptr + g64 * stride_sbg + (rn // SFB_GRAN_N) * stride_sbn
            sfa_ptrs = sfa_base + k_lo * stride_sak
            sfb_ptrs = sfb_base + k_lo * stride_sbk
            if SCALED and SCALE_PREFETCH > 0:
                # Scales of the next slice(s), loaded ahead by hand: the software pipeliner only
                # pipelines the loads that feed the dot, so an in-loop scale load would expose one
                # memory latency per slice. Indices clamp to the last slice to stay in bounds.
                k_last = tl.maximum(k_hi - 1, 0)
                sa_q0 = tl.load(sfa_base + tl.minimum(k_lo, k_last) * stride_sak)
                sb_q0 = tl.load(sfb_base + tl.minimum(k_lo, k_last) * stride_sbk)
                if SCALE_PREFETCH > 1:
                    sa_q1 = tl.load(sfa_base + tl.minimum(k_lo + 1, k_last) * stride_sak)
                    sb_q1 = tl.load(sfb_base + tl.minimum(k_lo + 1, k_last) * stride_sbk)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if SCALED and PIPELINE:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
                prev_sa = tl.load(sfa_ptrs)
                prev_sb = tl.load(sfb_ptrs)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                prev = tl.dot(a, b)
                for _ in tl.range(k_lo + 1, k_hi, num_stages=NUM_STAGES):
                    a_ptrs += BLOCK_K * stride_ak
                    b_ptrs += BLOCK_K * stride_bk
                    sfa_ptrs += stride_sak
                    sfb_ptrs += stride_sbk
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                    sa = tl.load(sfa_ptrs)
                    sb = tl.load(sfb_ptrs)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    cur = tl.dot(a, b)
                    if SFB_SCALAR:
                        acc += prev * (prev_sa * prev_sb)[:, None]
                    else:
                        acc += prev * prev_sa[:, None] * prev_sb[None, :]
                    prev = cur
                    prev_sa = sa
                    prev_sb = sb
                if SFB_SCALAR:
                    acc += prev * (prev_sa * prev_sb)[:, None]
                else:
                    acc += prev * prev_sa[:, None] * prev_sb[None, :]
            else:
                for kb in tl.range(k_lo, k_hi, num_stages=NUM_STAGES):
                    if USE_TMA:
                        # a_ptr / b_ptr are TMA descriptors over [rows, K]: no address registers,
                        # out-of-range rows arrive as zeros.
                        a = a_ptr.load([tma_row_a, kb * BLOCK_K])
                        b = b_ptr.load([tma_row_b, kb * BLOCK_K]).T
                    elif EVEN_K:
                        a = tl.load(a_ptrs)
                        b = tl.load(b_ptrs)
                    else:
                        # Only bf16 GEMMs take K % 128 != 0: the last slice is masked.
                        k_ok = kb * BLOCK_K + rk < K
                        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    if SCALED:
                        if SCALE_PREFETCH == 0:
                            sa = tl.load(sfa_ptrs)
                            sb = tl.load(sfb_ptrs)
                        elif SCALE_PREFETCH == 1:
                            sa = sa_q0
                            sb = sb_q0
                            sa_q0 = tl.load(sfa_base + tl.minimum(kb + 1, k_last) * stride_sak)
                            sb_q0 = tl.load(sfb_base + tl.minimum(kb + 1, k_last) * stride_sbk)
                        else:
                            sa = sa_q0
                            sb = sb_q0
                            sa_q0 = sa_q1
                            sb_q0 = sb_q1
                            sa_q1 = tl.load(sfa_base + tl.minimum(kb + 2, k_last) * stride_sak)
                            sb_q1 = tl.load(sfb_base + tl.minimum(kb + 2, k_last) * stride_sbk)
                        if SFB_SCALAR:
                            acc += tl.dot(a, b) * (sa * sb)[:, None]
                        else:
                            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
                        sfa_ptrs += stride_sak
                        sfb_ptrs += stride_sbk
                    else:
                        acc = tl.dot(a, b, acc)
                    if not USE_TMA:
                        a_ptrs += BLOCK_K * stride_ak
                        b_ptrs += BLOCK_K * stride_bk

            row_ok = offs_m < rows_valid
            if MODE == 1:
                row_ok = row_ok & (expert == g)
            mask = row_ok[:, None] & (offs_n < N)[None, :]
            om = offs_m.to(tl.int64)
            if SPLIT_K > 1:
                # d_ptr is the fp32 workspace [SPLIT_K, M, N]; stride_dg steps between splits.
                tl.store(d_ptr + pid_k * stride_dg + om[:, None] * stride_dm + offs_n[None, :] * stride_dn, acc, mask=mask)
            else:
                if HAS_C:
                    c = tl.load(c_ptr + g64 * stride_cg + om[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=mask, other=0.0)
                    acc += c.to(tl.float32)
                d_ptrs = d_ptr + g64 * stride_dg + om[:, None] * stride_dm + offs_n[None, :] * stride_dn
                tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr, d_ptr, c_ptr, M, N,
    stride_ws, stride_dm, stride_dn, stride_cm, stride_cn,
    SPLIT_K: tl.constexpr, HAS_C: tl.constexpr, BLOCK: tl.constexpr,
):
    # Sum the fp32 partials of the K splits (workspace [SPLIT_K, M, N], contiguous), add C, cast.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_C:
        acc += tl.load(c_ptr + row * stride_cm + col * stride_cn, mask=ok, other=0.0).to(tl.float32)
    tl.store(d_ptr + row * stride_dm + col * stride_dn, acc.to(d_ptr.dtype.element_ty), mask=ok)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    if t is None:
        return 0, 0, 0
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def launch_gemm(
    mode: int,
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, config: GemmConfig, *,
    sfa: torch.Tensor | None = None, sfb: torch.Tensor | None = None, c: torch.Tensor | None = None,
    layout: torch.Tensor | None = None, sfb_gran_n: int = GROUP_SIZE,
) -> torch.Tensor:
    """Launch the GEMM kernel on already-validated *logical* operands and write ``d``.

    Shapes by mode (K-major or any other strides):
    DENSE: a [M, K], b [N, K], d [M, N], c [M, N] or None;
    CONTIGUOUS: a [M, K], b [G, N, K], d [M, N], layout = m_indices [M] int32;
    MASKED: a [G, max_m, K], b [G, N, K], d [G, max_m, N], layout = masked_m [G] int32.
    FP8 operands come with sfa ([.., rows, K/128]) and sfb ([.., ceil(N/sfb_gran_n), K/128]);
    bf16 operands with neither.
    """
    scaled = sfa is not None
    k = a.shape[-1]
    if mode == MASKED:
        groups, m = a.shape[0], a.shape[1]
    else:
        groups, m = (b.shape[0] if b.dim() == 3 else 1), a.shape[0]
    n = b.shape[-2]
    if m == 0 or n == 0:
        return d
    if k == 0:
        # No K slices: D = C (or 0) wherever D is written.
        _fill_empty_k(mode, d, c, layout)
        return d
    if config.split_k > 1 and mode != DENSE:
        raise ValueError("split_k > 1 is only supported by the dense kernel")
    gluon_split_ok = config.split_k == 1 or (mode == DENSE and config.block_n == 128)
    if config.gluon_ws and scaled and c is None and gluon_split_ok and sfb_gran_n == GROUP_SIZE:
        from openinfra.kernels.deep_gemm.gemm.gluon_kernel import fp8_gemm_nt_gluon_ws, gluon_ws_supported

        if gluon_ws_supported(mode, a, b, d):
            return fp8_gemm_nt_gluon_ws(a, sfa, b, sfb, d, num_buffers=config.num_stages, group_m=config.group_m,
                                        block_n=config.block_n, mode=mode, layout=layout, split_k=config.split_k)
    if config.gluon and mode == DENSE and scaled and c is None and config.split_k == 1 and sfb_gran_n == GROUP_SIZE:
        from openinfra.kernels.deep_gemm.gemm.gluon_kernel import fp8_gemm_nt_gluon, gluon_supported

        if gluon_supported(a, b, d):
            return fp8_gemm_nt_gluon(a, sfa, b, sfb, d, num_buffers=config.num_stages, group_m=config.group_m)
    a_arg, b_arg, use_tma = a, b, config.use_tma and not config.pipeline_promote and _tma_ok(a, b, k)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a.reshape(-1, k), [config.block_m, GROUP_SIZE])
        b_arg = TensorDescriptor.from_tensor(b.reshape(-1, k), [config.block_n, GROUP_SIZE])
    interpret = interpreter_enabled()
    upcast = interpret and not scaled
    tiles = ceil_div(m, config.block_m) * ceil_div(n, config.block_n) * (groups if mode == MASKED else config.split_k)
    sms = num_sms(d.device)
    grid = (max(1, min(sms * config.programs_per_sm, tiles)),)
    dummy = d
    if config.split_k > 1:
        out = torch.empty(config.split_k, m, n, dtype=torch.float32, device=d.device)
        out_strides = (out.stride(0), out.stride(1), out.stride(2))
        has_c_main = False
    else:
        out = d
        out_strides = _strides3(d)
        has_c_main = c is not None
    _gemm_kernel[grid](
        a_arg, b_arg, out, c if has_c_main else dummy, sfa if scaled else dummy, sfb if scaled else dummy,
        layout if layout is not None else dummy,
        m, n, k, groups,
        *_strides3(a), *_strides3(b), *out_strides, *_strides3(c if has_c_main else None),
        *_strides3(sfa), *_strides3(sfb),
        MODE=mode, SCALED=scaled, SFB_GRAN_N=sfb_gran_n, HAS_C=has_c_main, SPLIT_K=config.split_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=GROUP_SIZE, GROUP_M=config.group_m,
        NUM_SMS=grid[0], NUM_STAGES=config.num_stages, PIPELINE=config.pipeline_promote and scaled,
        UPCAST=upcast, EVEN_K=k % GROUP_SIZE == 0, USE_TMA=use_tma,
        SCALE_PREFETCH=config.scale_prefetch if not config.pipeline_promote else 0, num_warps=config.num_warps,
    )
    if config.split_k > 1:
        block = 1024
        _split_k_reduce_kernel[(ceil_div(m * n, block),)](
            out, d, c if c is not None else dummy, m, n,
            out.stride(0), d.stride(0), d.stride(1),
            c.stride(0) if c is not None else 0, c.stride(1) if c is not None else 0,
            SPLIT_K=config.split_k, HAS_C=c is not None, BLOCK=block, num_warps=4,
        )
    return d


def _tma_ok(a: torch.Tensor, b: torch.Tensor, k: int) -> bool:
    """TMA needs FP8, K-major operands whose leading dimensions fold into one row index, a 16-byte
    aligned base and row pitch. Other layouts (the nn / tn / tt views, bf16) take the pointer path."""
    if a.element_size() != 1:
        return False  # bf16: a 128-deep tile row is 256 bytes, past the 128-byte TMA swizzle width
    for t in (a, b):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (k * t.element_size()) % 16:
            return False
        if t.dim() == 3 and t.stride(0) != t.shape[1] * t.stride(1):
            return False
        if t.stride(-2) != k:
            return False
    return True


def _fill_empty_k(mode: int, d: torch.Tensor, c: torch.Tensor | None, layout: torch.Tensor | None) -> None:
    fill = c.to(d.dtype) if c is not None else torch.zeros_like(d)
    if mode == DENSE:
        d.copy_(fill)
    elif mode == CONTIGUOUS:
        rows = layout >= 0
        d[rows] = fill[rows]
    else:
        valid = torch.arange(d.shape[1], device=d.device)[None, :] < layout[:, None]
        d[valid] = fill[valid]
