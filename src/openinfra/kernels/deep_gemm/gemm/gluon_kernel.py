"""The FP8 GEMM in Gluon, for Hopper: the promotion of one K slice overlaps the MMA of the next.

Two kernels. ``fp8_gemm_nt_gluon_ws`` (warp-specialized, persistent: a TMA producer warp and two
math warpgroups, DeepGEMM's structure; K slices in pairs, see its section below) is what
:func:`..config.choose_config` picks for FP8 GEMMs on Hopper from M = 512 (dense; 256 when the
tiles fill the SMs) and 256 rows a group (grouped contiguous / masked): 0.98-0.99x cuBLAS at
M = 4096 on the H200, 1.2-1.4x the Triton kernel (benchmarks/notes/deep_gemm.md, run 9). ``fp8_gemm_nt_gluon`` (one partition, one tile per program; opt-in
``GemmConfig(gluon=True)``) came first and measured 0.80-0.97x the Triton kernel (sweep 3): a
CTA-wide barrier around every TMA issue, no overlap of one tile's epilogue with the next's loads.

D[M, N] (bf16) = sum over 128-deep K slices k of  sfa[:, k] * sfb[n_block, k] * (A_k @ B_k^T)

with A [M, K] e4m3 (1x128 scales ``sfa``) and B [N, K] e4m3 (128x128 scales ``sfb``), the same
semantics as the Triton kernel in :mod:`.kernel` (DENSE mode, no C, no split-K). Why a second
kernel: Triton keeps a wgmma in flight only across ``acc = dot(a, b, acc)`` chains, so the
two-level accumulation ``acc += dot(a, b) * scale`` waits for every slice's MMA before its 64
promotion FMAs per thread, and the tensor cores idle meanwhile (benchmarks/notes/deep_gemm.md,
"Compiler evidence"). Gluon exposes the wgmma issue and wait separately, so step k

1. issues the TMA loads of slice k + NUM_BUFFERS - 1 (into slice k - 1's buffer, whose MMA was
   waited for in step k - 1),
2. issues the MMA of slice k into a fresh accumulator (``use_acc=False``),
3. adds slice k - 1's finished product times its scales into the fp32 accumulator while the
   tensor cores work on slice k,
4. waits for slice k's MMA (so only finished products cross the loop's back edge).

Three [BLOCK_M, BLOCK_N] fp32 register tiles are live (accumulator, product in flight, product
being promoted): 3 x 64 registers per thread at 128 x 128 with 8 warps. Tiles are assigned in
groups of GROUP_M row tiles for L2 reuse. Out-of-range rows and columns load as zeros (TMA) and
are clipped by the TMA store. Only on sm_90 with a real GPU: Gluon has no interpreter, so the CPU
path and the tests' oracle stay the PyTorch reference and the Triton kernel.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from openinfra.kernels.deep_gemm.gemm.config import num_sms
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div

__all__ = ["fp8_gemm_nt_gluon", "fp8_gemm_nt_gluon_ws", "gluon_supported"]


@gluon.jit
def _issue_loads(step, a_desc, b_desc, off_m, off_n, bars, a_bufs, b_bufs, NUM_BUFFERS: gl.constexpr, pred):
    # TMA loads of K slice ``step`` into buffer step % NUM_BUFFERS; its barrier counts the bytes.
    index = step % NUM_BUFFERS
    bar = bars.index(index)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [off_m, step * 128], bar, a_bufs.index(index), pred)
    tma.async_copy_global_to_shared(b_desc, [off_n, step * 128], bar, b_bufs.index(index), pred)


@gluon.jit
def _issue_mma(step, bars, a_bufs, b_bufs, zero, NUM_BUFFERS: gl.constexpr):
    # Wait for slice ``step``'s tiles, then start its MMA into a fresh accumulator (async).
    index = step % NUM_BUFFERS
    mbarrier.wait(bars.index(index), (step // NUM_BUFFERS) & 1)
    return warpgroup_mma(a_bufs.index(index), b_bufs.index(index).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def _fp8_gemm_nt_kernel(a_desc, b_desc, d_desc, sfa_ptr, sfb_ptr, M, N, K, stride_sam, stride_sak, stride_sbn,
                        stride_sbk, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = d_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = d_desc.block_type.shape[1]
    gl.static_assert(NUM_BUFFERS >= 2, "one buffer for the MMA, at least one loading")

    # Tile of this program, grouped along M for L2 reuse of the B tiles.
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    rows = off_m + gl.arange(0, BLOCK_M, layout=row_layout)
    row_ok = rows < M
    sfa_rows = sfa_ptr + rows.to(gl.int64) * stride_sam
    sfb_col = sfb_ptr + (off_n // 128) * stride_sbn  # one B scale block per 128 columns: BLOCK_N == 128

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_BUFFERS] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_BUFFERS] + b_desc.block_type.shape, b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.init(bars.index(i), count=1)

    num_k = gl.cdiv(K, 128)
    zero = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)

    # Prologue: slices 0 .. NB - 2 loading.
    for i in gl.static_range(NUM_BUFFERS - 1):
        _issue_loads(i, a_desc, b_desc, off_m, off_n, bars, a_bufs, b_bufs, NUM_BUFFERS, i < num_k)

    # Step k: load slice k + NB - 1 (into slice k - 1's buffer, whose MMA finished last step),
    # start slice k's MMA, promote slice k - 1's finished product while it runs, then wait for it.
    # Only finished products cross the back edge: an MMA still in flight there would make the
    # register allocator copy its accumulator, and ptxas then serializes every wgmma (C7514).
    done = zero
    done_scale = gl.zeros((BLOCK_M, ), dtype=gl.float32, layout=row_layout)
    for k in range(0, num_k):
        _issue_loads(k + NUM_BUFFERS - 1, a_desc, b_desc, off_m, off_n, bars, a_bufs, b_bufs, NUM_BUFFERS,
                     k + NUM_BUFFERS - 1 < num_k)
        scale = gl.load(sfa_rows + k * stride_sak, mask=row_ok, other=0.0) * gl.load(sfb_col + k * stride_sbk)
        mma = _issue_mma(k, bars, a_bufs, b_bufs, zero, NUM_BUFFERS)
        # A wait that returns at once (one group in flight) but orders the promotion after the
        # MMA's issue: without it the scheduler hoists the independent FMAs above the wgmma.
        acc, done = warpgroup_mma_wait(num_outstanding=1, deps=(acc, done))
        acc += done * done_scale[:, None]
        done = warpgroup_mma_wait(num_outstanding=0, deps=(mma, ))
        done_scale = scale
    acc += done * done_scale[:, None]

    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.invalidate(bars.index(i))

    d_smem = gl.allocate_shared_memory(d_desc.dtype, d_desc.block_type.shape, d_desc.layout)
    d_smem.store(acc.to(d_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(d_desc, [off_m, off_n], d_smem)
    tma.store_wait(pendings=0)


def gluon_supported(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether :func:`fp8_gemm_nt_gluon` takes these operands: the dense case of
    :func:`gluon_ws_supported` (Hopper, e4m3 K-major A / B and a bf16 D, 2-D, 16-byte aligned rows)."""
    return gluon_ws_supported(_DENSE, a, b, d)


def fp8_gemm_nt_gluon(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                      *, num_buffers: int = 4, group_m: int = 8) -> torch.Tensor:
    """D = A @ B^T with DeepGEMM's block scales; a [M, K], b [N, K] e4m3 (K-major), sfa [M, K/128],
    sfb [ceil(N/128), K/128] fp32 (any strides), d [M, N] bf16. Checked by :func:`gluon_supported`."""
    m, k = a.shape
    n = b.shape[0]
    block_m, block_n = 128, 128
    a_layout = gl.NVMMASharedLayout.get_default_for([block_m, GROUP_SIZE], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, GROUP_SIZE], gl.float8e4nv)
    d_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl.bfloat16)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, GROUP_SIZE], a_layout)
    b_desc = TensorDescriptor.from_tensor(b, [block_n, GROUP_SIZE], b_layout)
    d_desc = TensorDescriptor.from_tensor(d, [block_m, block_n], d_layout)
    grid = (ceil_div(m, block_m) * ceil_div(n, block_n),)
    _fp8_gemm_nt_kernel[grid](a_desc, b_desc, d_desc, sfa, sfb, m, n, k, sfa.stride(0), sfa.stride(1),
                              sfb.stride(0), sfb.stride(1), GROUP_M=group_m, NUM_BUFFERS=num_buffers, num_warps=8)
    return d


# --- warp-specialized variant -------------------------------------------------------------------
# Persistent: each program walks the tiles pid, pid + programs, ... One producer warp issues the
# TMA loads into a ring of NUM_BUFFERS stages and runs on into the next tile's slices while the
# math warpgroups store the last one; two math warpgroups in separate partitions take the upper
# and lower 64 rows of each tile. They share each stage (its "empty" barrier counts both
# releases) but nothing else -- DeepGEMM's arrangement -- without the CTA-wide barriers the
# single-partition kernel pays around every TMA issue. Each math warpgroup takes the K slices in
# pairs (both MMAs in flight, the first promoted while the second runs), so its MMA pipe drains
# once per two slices: 0.81x -> 0.98x cuBLAS at M = 4096 (notes run 9). Stage index and barrier phase
# come from a step counter that runs across tiles, the same in every partition (every partition
# decodes the same tiles and skips the same empty ones).
# MODE (as in .kernel): DENSE stores through TMA; CONTIGUOUS (experts stacked along M, m_indices
# per row, -1 = padding) and MASKED (a [G, max_m, K], masked_m[g] rows of group g) store from
# registers with a row mask, since their padding rows must stay unwritten. A and B are read
# through 2-D descriptors over [rows, K] and [G * N, K]: a tile's rows past its group's end read
# the next group's data (zeros at the very end), never stored.
# Register split per thread: 256 (default partition) / 208 (second math warpgroup) / 40 (producer)
# = 64,512, exactly the 168 x 384 the launch holds: more would leave setmaxnreg.inc waiting forever.

_DENSE, _CONTIGUOUS, _MASKED = 0, 1, 2  # the MODE values of .kernel


@gluon.jit
def _ws_tile(tile, layout_ptr, M, N, ROWS, G, MODE: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
             WARPS: gl.constexpr):
    """(live, group, off_m within the group, off_n, A row, B row, rows of the group) of a tile."""
    tiles_n = gl.cdiv(N, BLOCK_N)
    if MODE == 2:
        # the M block is the slowest index: the live tiles (rows < masked_m[g]) form a prefix
        pid_m = tile // (G * tiles_n)
        rest = tile % (G * tiles_n)
        g = rest // tiles_n
        off_m = pid_m * 128
        off_n = (rest % tiles_n) * BLOCK_N
        # clamped to max_m: under graph capture masked_m is not checked on the host
        rows = gl.minimum(gl.load(layout_ptr + g), ROWS)
        live = off_m < rows
        a_row = g * ROWS + off_m
    else:
        tiles_m = gl.cdiv(M, 128)
        per_group = GROUP_M * tiles_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = gl.minimum(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % group_rows) * 128
        off_n = ((tile % per_group) // group_rows) * BLOCK_N
        rows = M
        a_row = off_m
        if MODE == 1:
            # a 128-row block holds one expert and padding: its expert is the max of its rows'
            idx_layout: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
            offs = off_m + gl.arange(0, 128, layout=idx_layout)
            g = gl.max(gl.load(layout_ptr + offs, mask=offs < M, other=-1), axis=0)
            live = (g >= 0) & (g < G)  # an index past the experts (unchecked under capture) reads nothing
        else:
            g = tile * 0
            live = tile >= 0
    return live, g, off_m, off_n, a_row, g * N + off_n, rows


@gluon.jit
def _ws_producer(a_desc, b_desc, a_bufs, b_bufs, full, empty, layout_ptr, M, N, ROWS, G, num_tiles, num_k,
                 MODE: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                 SPLIT: gl.constexpr):
    step = 0
    k_per = gl.cdiv(num_k, SPLIT)
    for item in range(gl.program_id(0), num_tiles * SPLIT, gl.num_programs(0)):
        tile = item // SPLIT
        k_lo = (item % SPLIT) * k_per
        k_hi = gl.minimum(k_lo + k_per, num_k)
        live, g, off_m, off_n, a_row, b_row, rows = _ws_tile(tile, layout_ptr, M, N, ROWS, G, MODE, BLOCK_N, GROUP_M, 1)
        if live:
            for k in range(k_lo, k_hi):
                s = step % NUM_BUFFERS
                # a fresh barrier has completed the phase before its first: the first lap does not wait
                mbarrier.wait(empty.index(s), ((step // NUM_BUFFERS) & 1) ^ 1)
                mbarrier.expect(full.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [a_row, k * 128], full.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [b_row, k * 128], full.index(s), b_bufs.index(s))
                step += 1


@gluon.jit
def _ws_store(acc, d_desc, d_smem, row, col):
    # the previous tile's store must have left d_smem before it is overwritten
    tma.store_wait(pendings=0)
    d_smem.store(acc.to(d_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(d_desc, [row, col], d_smem)


@gluon.jit
def _ws_store_rows(acc, d_ptr, layout_ptr, g, off_m, off_n, rows, N, stride_dg, stride_dm, MODE: gl.constexpr):
    # grouped layouts: the [64, 128] block at (off_m, off_n) of group g, rows < ``rows`` only (and,
    # contiguous, rows whose m_indices is not -1), columns < N
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    r = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, mma_layout))
    c = off_n + gl.arange(0, 128, layout=gl.SliceLayout(0, mma_layout))
    row_ok = r < rows
    if MODE == 1:
        row_ok = row_ok & (gl.load(layout_ptr + r, mask=row_ok, other=-1) >= 0)
    ptrs = d_ptr + g.to(gl.int64) * stride_dg + r.to(gl.int64)[:, None] * stride_dm + c[None, :]
    gl.store(ptrs, acc.to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & (c < N)[None, :])


@gluon.jit
def _ws_store_partial(acc, ws_ptr, part, off_m, off_n, M, N):
    # split-K: the fp32 [64, 128] partial of K part ``part`` into the workspace [SPLIT, M, N]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    r = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, mma_layout))
    c = off_n + gl.arange(0, 128, layout=gl.SliceLayout(0, mma_layout))
    ptrs = ws_ptr + (part.to(gl.int64) * M + r.to(gl.int64))[:, None] * N + c[None, :]
    gl.store(ptrs, acc, mask=(r < M)[:, None] & (c < N)[None, :])


@gluon.jit
def _ws_issue(step, a_bufs, b_bufs, full, product, HALF: gl.constexpr, NUM_BUFFERS: gl.constexpr):
    # the MMA of the slice in stage ``step`` into ``product``'s registers (its old value ignored)
    s = step % NUM_BUFFERS
    mbarrier.wait(full.index(s), (step // NUM_BUFFERS) & 1)
    return warpgroup_mma(a_bufs.index(s).slice(HALF * 64, 64), b_bufs.index(s).permute((1, 0)), product,
                         use_acc=False, is_async=True)


@gluon.jit
def _ws_scale(sfa_rows, r_ok, sfb_col, k, stride_sak, stride_sbk):
    # the [64] fp32 factors of K slice k: each row's A scale times the tile's B scale
    return gl.load(sfa_rows + k * stride_sak, mask=r_ok, other=0.0) * gl.load(sfb_col + k * stride_sbk)


@gluon.jit
def _ws_math(HALF: gl.constexpr, a_bufs, b_bufs, full, empty, d_desc, d_smem, d_ptr, ws_ptr, sfa_ptr, sfb_ptr,
             layout_ptr, M, N, ROWS, G, num_tiles, num_k, stride_dg, stride_dm, stride_sag, stride_sam, stride_sak,
             stride_sbg, stride_sbn, stride_sbk, MODE: gl.constexpr, GROUP_M: gl.constexpr,
             NUM_BUFFERS: gl.constexpr, SPLIT: gl.constexpr):
    # This warpgroup's [64, 128] half of each 128 x 128 tile: rows off_m + HALF * 64 ... (with
    # SPLIT > 1, of K slices [k_lo, k_hi) of it: work item = tile * SPLIT + part).
    # K slices go in pairs: both MMAs are issued into their own product registers, the first is
    # waited for and promoted while the second runs, then the second. The warpgroup's MMA pipe
    # drains once per two slices (a slice at a time, it drained every slice and the tensor cores
    # idled through both warpgroups' drains when they ran in phase). Nothing is in flight across
    # the loop's back edge, which keeps ptxas from serializing the wgmma (C7514/C7515).
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    zero = gl.zeros((64, 128), dtype=gl.float32, layout=mma_layout)
    step = 0
    k_per = gl.cdiv(num_k, SPLIT)
    for item in range(gl.program_id(0), num_tiles * SPLIT, gl.num_programs(0)):
        tile = item // SPLIT
        part = item % SPLIT
        k_lo = part * k_per
        k_hi = gl.minimum(k_lo + k_per, num_k)
        live, g, off_m, off_n, a_row, b_row, rows = _ws_tile(tile, layout_ptr, M, N, ROWS, G, MODE, 128, GROUP_M, 4)
        if live:
            r = off_m + HALF * 64 + gl.arange(0, 64, layout=row_layout)
            r_ok = r < rows
            g64 = g.to(gl.int64)
            sfa_rows = sfa_ptr + g64 * stride_sag + r.to(gl.int64) * stride_sam
            sfb_col = sfb_ptr + g64 * stride_sbg + (off_n // 128) * stride_sbn
            acc = gl.zeros((64, 128), dtype=gl.float32, layout=mma_layout)
            for k in range(k_lo, k_hi - 1, 2):
                scale0 = _ws_scale(sfa_rows, r_ok, sfb_col, k, stride_sak, stride_sbk)
                scale1 = _ws_scale(sfa_rows, r_ok, sfb_col, k + 1, stride_sak, stride_sbk)
                p0 = _ws_issue(step, a_bufs, b_bufs, full, zero, HALF, NUM_BUFFERS)
                p1 = _ws_issue(step + 1, a_bufs, b_bufs, full, zero, HALF, NUM_BUFFERS)
                p0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0, ))
                mbarrier.arrive(empty.index(step % NUM_BUFFERS), count=1)  # this warpgroup is done with it
                acc += p0 * scale0[:, None]
                p1 = warpgroup_mma_wait(num_outstanding=0, deps=(p1, ))
                mbarrier.arrive(empty.index((step + 1) % NUM_BUFFERS), count=1)
                acc += p1 * scale1[:, None]
                step += 2
            if (k_hi - k_lo) % 2 == 1:  # the odd slice out (none when a split-K part is empty)
                scale0 = _ws_scale(sfa_rows, r_ok, sfb_col, k_hi - 1, stride_sak, stride_sbk)
                p0 = _ws_issue(step, a_bufs, b_bufs, full, zero, HALF, NUM_BUFFERS)
                p0 = warpgroup_mma_wait(num_outstanding=0, deps=(p0, ))
                mbarrier.arrive(empty.index(step % NUM_BUFFERS), count=1)
                acc += p0 * scale0[:, None]
                step += 1
            if SPLIT > 1:
                _ws_store_partial(acc, ws_ptr, part, off_m + HALF * 64, off_n, M, N)
            elif MODE == 0:
                _ws_store(acc, d_desc, d_smem, off_m + HALF * 64, off_n)
            else:
                _ws_store_rows(acc, d_ptr, layout_ptr, g, off_m + HALF * 64, off_n, rows, N, stride_dg, stride_dm,
                               MODE)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_math_wide(HALF: gl.constexpr, a_bufs, b_bufs, full, empty, d_desc, d_smem, sfa_ptr, sfb_ptr, M, N,
                  num_tiles, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, GROUP_M: gl.constexpr,
                  NUM_BUFFERS: gl.constexpr):
    # Dense only. This warpgroup's [64, 256] part of each 128 x 256 tile: rows off_m + HALF * 64
    # ..., as two 128-column halves, each with its own B scale block. Two fp32 accumulators (128
    # registers) leave room for one product only, so each half is waited for and promoted before
    # the next is issued; the tensor cores stay busy through the other warpgroup's MMA meanwhile.
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    zero = gl.zeros((64, 128), dtype=gl.float32, layout=mma_layout)
    step = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        live, g, off_m, off_n, a_row, b_row, rows = _ws_tile(tile, sfa_ptr, M, N, M, 1, 0, 256, GROUP_M, 4)
        r = off_m + HALF * 64 + gl.arange(0, 64, layout=row_layout)
        r_ok = r < M
        sfa_rows = sfa_ptr + r.to(gl.int64) * stride_sam
        sfb_lo = sfb_ptr + (off_n // 128) * stride_sbn
        hi_ok = off_n + 128 < N  # the tile's right half exists (else its B rows load as zeros)
        acc_lo = gl.zeros((64, 128), dtype=gl.float32, layout=mma_layout)
        acc_hi = gl.zeros((64, 128), dtype=gl.float32, layout=mma_layout)
        for k in range(num_k):
            s = step % NUM_BUFFERS
            scale_a = gl.load(sfa_rows + k * stride_sak, mask=r_ok, other=0.0)
            scale_lo = scale_a * gl.load(sfb_lo + k * stride_sbk)
            scale_hi = scale_a * gl.load(sfb_lo + stride_sbn + k * stride_sbk, mask=hi_ok, other=0.0)
            mbarrier.wait(full.index(s), (step // NUM_BUFFERS) & 1)
            a = a_bufs.index(s).slice(HALF * 64, 64)
            b = b_bufs.index(s)
            mma = warpgroup_mma(a, b.slice(0, 128).permute((1, 0)), zero, use_acc=False, is_async=True)
            product = warpgroup_mma_wait(num_outstanding=0, deps=(mma, ))
            acc_lo += product * scale_lo[:, None]
            mma = warpgroup_mma(a, b.slice(128, 128).permute((1, 0)), zero, use_acc=False, is_async=True)
            product = warpgroup_mma_wait(num_outstanding=0, deps=(mma, ))
            mbarrier.arrive(empty.index(s), count=1)  # this warpgroup is done with stage s
            acc_hi += product * scale_hi[:, None]
            step += 1
        # the [64, 128] output buffer takes each half in turn
        _ws_store(acc_lo, d_desc, d_smem, off_m + HALF * 64, off_n)
        _ws_store(acc_hi, d_desc, d_smem, off_m + HALF * 64, off_n + 128)
    tma.store_wait(pendings=0)


@gluon.jit
def _fp8_gemm_nt_ws_kernel(a_desc, b_desc, d_desc, d_ptr, ws_ptr, sfa_ptr, sfb_ptr, layout_ptr, M, N, K, ROWS, G,
                           num_tiles, stride_dg, stride_dm, stride_sag, stride_sam, stride_sak, stride_sbg, stride_sbn,
                           stride_sbk, MODE: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                           SPLIT: gl.constexpr):
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(BLOCK_N == 128 or (BLOCK_N == 256 and MODE == 0), "tiles are 128 x 128, or 128 x 256 (dense)")
    gl.static_assert(SPLIT == 1 or (BLOCK_N == 128 and MODE == 0), "split-K: dense 128 x 128 tiles only")
    num_k = gl.cdiv(K, 128)
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_BUFFERS] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_BUFFERS] + b_desc.block_type.shape, b_desc.layout)
    d_smem = gl.allocate_shared_memory(d_desc.dtype, [2] + d_desc.block_type.shape, d_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both math warpgroups release a stage

    # 256 (default partition) / 208 / 40 as above; the other orders and splits tried with 128 x 256
    # tiles spill more (scripts/sass_loops.py gluon-gemm-ws 4,256)
    if BLOCK_N == 128:
        gl.warp_specialize([
            (_ws_math, (0, a_bufs, b_bufs, full, empty, d_desc, d_smem.index(0), d_ptr, ws_ptr, sfa_ptr, sfb_ptr,
                        layout_ptr, M, N, ROWS, G, num_tiles, num_k, stride_dg, stride_dm, stride_sag, stride_sam,
                        stride_sak, stride_sbg, stride_sbn, stride_sbk, MODE, GROUP_M, NUM_BUFFERS, SPLIT)),
            (_ws_math, (1, a_bufs, b_bufs, full, empty, d_desc, d_smem.index(1), d_ptr, ws_ptr, sfa_ptr, sfb_ptr,
                        layout_ptr, M, N, ROWS, G, num_tiles, num_k, stride_dg, stride_dm, stride_sag, stride_sam,
                        stride_sak, stride_sbg, stride_sbn, stride_sbk, MODE, GROUP_M, NUM_BUFFERS, SPLIT)),
            (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, full, empty, layout_ptr, M, N, ROWS, G, num_tiles, num_k,
                            MODE, BLOCK_N, GROUP_M, NUM_BUFFERS, SPLIT)),
        ], [4, 1], [208, 40])
    else:
        gl.warp_specialize([
            (_ws_math_wide, (0, a_bufs, b_bufs, full, empty, d_desc, d_smem.index(0), sfa_ptr, sfb_ptr, M, N,
                             num_tiles, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, GROUP_M, NUM_BUFFERS)),
            (_ws_math_wide, (1, a_bufs, b_bufs, full, empty, d_desc, d_smem.index(1), sfa_ptr, sfb_ptr, M, N,
                             num_tiles, num_k, stride_sam, stride_sak, stride_sbn, stride_sbk, GROUP_M, NUM_BUFFERS)),
            (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, full, empty, layout_ptr, M, N, ROWS, G, num_tiles, num_k,
                            MODE, BLOCK_N, GROUP_M, NUM_BUFFERS, SPLIT)),
        ], [4, 1], [208, 40])
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))


def _k_major_2d(t: torch.Tensor) -> bool:
    # a 2-D [rows, K] or 3-D [G, rows, K] operand that a 2-D TMA descriptor over [G * rows, K] can read
    if t.stride(-1) != 1 or (t.stride(-2) * t.element_size()) % 16 or t.data_ptr() % 16:
        return False
    return t.dim() == 2 or (t.dim() == 3 and t.stride(0) == t.shape[1] * t.stride(1))


def gluon_ws_supported(mode: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether :func:`fp8_gemm_nt_gluon_ws` takes these operands in layout ``mode`` (DENSE: a, b, d
    2-D; CONTIGUOUS: a, d 2-D and b [G, N, K]; MASKED: a, b, d 3-D): Hopper, e4m3 K-major A / B
    whose rows a 2-D TMA descriptor can address, a bf16 D with unit column stride (16-byte aligned
    rows for the dense TMA store)."""
    if not (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9):
        return False
    if not (a.dtype == b.dtype == torch.float8_e4m3fn and d.dtype == torch.bfloat16):
        return False
    dims = {_DENSE: (2, 2, 2), _CONTIGUOUS: (2, 3, 2), _MASKED: (3, 3, 3)}[mode]
    if (a.dim(), b.dim(), d.dim()) != dims or not (_k_major_2d(a) and _k_major_2d(b)) or d.stride(-1) != 1:
        return False
    return mode != _DENSE or ((d.stride(0) * 2) % 16 == 0 and d.data_ptr() % 16 == 0)


def fp8_gemm_nt_gluon_ws(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, d: torch.Tensor,
                         *, num_buffers: int = 4, group_m: int = 8, block_n: int = 128, mode: int = _DENSE,
                         layout: torch.Tensor | None = None, split_k: int = 1) -> torch.Tensor:
    """The warp-specialized persistent kernel. DENSE: a [M, K], b [N, K], d [M, N] bf16, sfa
    [M, K/128], sfb [ceil(N/128), K/128]; CONTIGUOUS: b [G, N, K], sfb [G, ceil(N/128), K/128],
    ``layout`` = m_indices [M] int32; MASKED: a [G, max_m, K], sfa [G, max_m, K/128], d
    [G, max_m, N], ``layout`` = masked_m [G] int32. Scales fp32, any strides; operands checked by
    :func:`gluon_ws_supported`. ``block_n`` 128 or 256 (256: dense only, at most 4 buffers).
    ``split_k`` > 1 (dense, 128 x 128 tiles): each tile's K slices are cut into that many parts,
    each a work item of its own writing an fp32 partial to a [split_k, M, N] workspace, which a
    second kernel sums into d -- for small M, where the tiles alone would leave most SMs idle."""
    if block_n not in (128, 256):
        raise ValueError(f"block_n: the warp-specialized kernel takes 128 or 256, got {block_n}")
    if split_k < 1 or (split_k > 1 and (mode != _DENSE or block_n != 128)):
        raise ValueError(f"split_k: >= 1, and > 1 only for dense 128 x 128 tiles; got {split_k} (mode {mode}, "
                         f"block_n {block_n})")
    if block_n == 256 and (num_buffers > 4 or mode != _DENSE):
        raise ValueError(f"block_n 256: dense problems and at most 4 stages only, got mode {mode}, "
                         f"{num_buffers} buffers")
    if (layout is None) != (mode == _DENSE):
        raise ValueError("layout: m_indices (contiguous) or masked_m (masked) is required, and only then")
    k = a.shape[-1]
    n = b.shape[-2]
    groups = b.shape[0] if b.dim() == 3 else 1
    rows = a.shape[-2]  # M (dense, contiguous) or max_m (masked)
    a2, b2 = a.reshape(-1, k), b.reshape(-1, k)  # views (gluon_ws_supported)
    a_layout = gl.NVMMASharedLayout.get_default_for([128, GROUP_SIZE], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, GROUP_SIZE], gl.float8e4nv)
    d_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    a_desc = TensorDescriptor.from_tensor(a2, [128, GROUP_SIZE], a_layout)
    b_desc = TensorDescriptor.from_tensor(b2, [block_n, GROUP_SIZE], b_layout)
    # the dense kernel stores through TMA; the grouped ones through d_ptr (the descriptor unused)
    d_desc = TensorDescriptor.from_tensor(d if mode == _DENSE else d.new_empty(64, 128), [64, 128], d_layout)
    tiles = ceil_div(rows, 128) * ceil_div(n, block_n) * (groups if mode == _MASKED else 1)
    if tiles == 0:
        return d
    sa = sfa.stride() if sfa.dim() == 3 else (0, ) + sfa.stride()
    sb = sfb.stride() if sfb.dim() == 3 else (0, ) + sfb.stride()
    sd = d.stride() if d.dim() == 3 else (0, ) + d.stride()
    grid = (min(num_sms(a.device), tiles * split_k),)
    ws = torch.empty(split_k, rows, n, dtype=torch.float32, device=d.device) if split_k > 1 else sfa
    _fp8_gemm_nt_ws_kernel[grid](a_desc, b_desc, d_desc, d, ws, sfa, sfb, layout if layout is not None else sfa,
                                 a2.shape[0], n, k, rows, groups, tiles, sd[0], sd[1], sa[0], sa[1], sa[2], sb[0],
                                 sb[1], sb[2], MODE=mode, GROUP_M=group_m, NUM_BUFFERS=num_buffers, SPLIT=split_k,
                                 num_warps=4)
    if split_k > 1:
        from openinfra.kernels.deep_gemm.gemm.kernel import _split_k_reduce_kernel

        block = 1024
        _split_k_reduce_kernel[(ceil_div(rows * n, block), )](ws, d, d, rows, n, ws.stride(0), d.stride(0), d.stride(1),
                                                              0, 0, SPLIT_K=split_k, HAS_C=False, BLOCK=block,
                                                              num_warps=4)
    return d
