"""Dense 16-bit MLA decoding in Gluon for Hopper: S computed once per tile, warpgroups in roles.

Why a second kernel: with 64 query rows the [64, 512] fp32 output tile takes 128 registers per
thread even split over two warpgroups, and plain ``tl.dot`` then makes *both* warpgroups compute
the whole S = Q K^T of every tile (plus 9 layout conversions): a third of the tensor-core work
is duplicated (benchmarks/notes/flash_mla.md). Here each warpgroup has one job:

- the producer warp streams the 64-token K tiles of the request (pages from the block table,
  [64, 512] latent + [64, 64] rope through TMA, any block stride) into two stages;
- warpgroup 0 computes S = Q K^T (Q stays in shared memory), the online softmax, hands P (16-bit,
  shared memory) and the rescale factors to warpgroup 1, and accumulates O[:, :256] = P V[:, :256];
- warpgroup 1 accumulates O[:, 256:] = P V[:, 256:].

Barriers: ``full`` (TMA bytes of a stage), ``empty`` (both warpgroups done with a stage),
``p_ready`` / ``p_free`` (one P buffer: warpgroup 1 has read it before warpgroup 0 writes the
next), ``fin`` (the final row sums for warpgroup 1's normalization). A tile cut by the length has
its K rows past the length zeroed in shared memory before any P V product reads them (the cache
holds anything there, NaN in the tests; 0 x NaN would poison the output).

Same schedule, outputs and partials as the Triton kernel (:mod:`.kernel`): a piece covering its
whole request writes out and lse; other pieces write fp32 partials for the combine kernel. Taken
for dense bf16/fp16 caches with h_kv = 1 and s_q x h_q >= MIN_ROWS (= 16; the rows of a 64-row
tile past s_q x h_q are zeros), no attention sink, no max-logit output; everything else runs the
Triton kernel. The sparse kernel (:mod:`.gluon_sparse`) reuses the prologue helpers and both math
partitions, with a gathering producer warpgroup in the TMA warp's place.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from openinfra.kernels.flash_mla.layout import HEAD_DIM_QK, HEAD_DIM_V, MAX_GRID_Y, PAGE_BLOCK_SIZE, ceil_div

__all__ = ["gluon_decode_supported", "mla_decode_gluon"]

_LOG2E = 1.4426950408889634
# Query rows (s_q x h_q) from which the Gluon kernel takes a call. Below 64 the tile's rows past R
# are zeros (wasted MMA work): the decode is memory-bound there, and a 64-row tile's compute per
# page (~2.3 us) still fits under the page's stream time at full-machine bandwidth.
MIN_ROWS = 16


@gluon.jit
def _producer(knope_desc, kpe_desc, k_bufs, kpe_bufs, full, empty, bt_row, first_page, n_tiles):
    for i in range(n_tiles):
        s = i % 2
        # a fresh barrier has completed the phase before its first: the first lap does not wait
        mbarrier.wait(empty.index(s), ((i // 2) & 1) ^ 1)
        page = gl.load(bt_row + first_page + i)
        mbarrier.expect(full.index(s), knope_desc.block_type.nbytes + kpe_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(knope_desc, [page, 0, 0], full.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(kpe_desc, [page, 0, 512], full.index(s), kpe_bufs.index(s))


@gluon.jit
def _store_half(o, l, m2, COL0: gl.constexpr, row0, R, G, bi, n_split, split, out_ptr, lse_ptr, oacc_ptr, lacc_ptr,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls):
    # o: [64, 256] un-normalized columns COL0 ... of the output; l / m2: row sums / maxima (base 2)
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    cols = COL0 + gl.arange(0, 256, layout=gl.SliceLayout(0, o_layout))
    row_ok = rows < R
    si = rows // G
    head = rows % G  # h_kv = 1
    empty = l == 0.0
    l_safe = gl.where(empty, 1.0, l)
    o = o / l_safe[:, None]
    if n_split == 1:
        o = gl.where(empty[:, None], 0.0, o)
        o_rows = out_ptr + bi.to(gl.int64) * stride_ob + si.to(gl.int64) * stride_os + head.to(gl.int64) * stride_oh
        gl.store(o_rows[:, None] + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if COL0 == 0:
            lse = gl.where(empty, float("inf"), (m2 + gl.log2(l_safe)) * 0.6931471805599453)
            l_off = bi.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + si.to(gl.int64) * stride_ls
            gl.store(lse_ptr + l_off, lse, mask=row_ok)
    elif n_split > 1:  # (0: an unused row of the piece table or an empty request: nothing to write)
        slot_row = split.to(gl.int64) * R + rows
        gl.store(oacc_ptr + slot_row[:, None] * 512 + cols[None, :], o, mask=row_ok[:, None])
        if COL0 == 0:
            gl.store(lacc_ptr + slot_row, gl.where(empty, float("-inf"), m2 + gl.log2(l_safe)), mask=row_ok)


@gluon.jit
def _softmax_partition(q_smem, qpe_smem, k_bufs, kpe_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty, p_ready, p_free,
                       fin, n_tiles, lo, open_end, length, s_q, row0, R, G, bi, n_split, split, scale_log2,
                       out_ptr, lse_ptr, oacc_ptr, lacc_ptr, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                       stride_ls, CAUSAL: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    chunk_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, s_layout))
    last_key = length - s_q + rows // G  # causal: the last key each row may see
    zero_s = gl.zeros((64, 64), dtype=gl.float32, layout=s_layout)
    m_i = gl.full((64, ), float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros((64, ), dtype=gl.float32, layout=gl.SliceLayout(1, s_layout))
    o = gl.zeros((64, 256), dtype=gl.float32, layout=o_layout)
    for i in range(n_tiles):
        st = i % 2
        mbarrier.wait(full.index(st), (i // 2) & 1)
        k = k_bufs.index(st).reshape([64, 512])  # [64 tokens, 512]
        s = warpgroup_mma(q_smem, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma(qpe_smem, kpe_bufs.index(st).reshape([64, 64]).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        s = s * scale_log2
        start = lo + i * 64
        if start + 64 > open_end:  # a tile cut by the length or the causal diagonal
            pos = start + cols
            keep = (pos < length)[None, :] & (rows < R)[:, None]
            if CAUSAL:
                keep = keep & (pos[None, :] <= last_key[:, None])
            s = gl.where(keep, s, float("-inf"))
            n_valid = length - start
            if n_valid < 64:
                # zero the V rows past the length before any P V product reads them
                r = gl.arange(0, 64, layout=gl.SliceLayout(1, chunk_layout))
                for c in gl.static_range(8):
                    part = k.slice(c * 64, 64, dim=1)
                    x = part.load(chunk_layout)
                    part.store(gl.where((r < n_valid)[:, None], x, gl.zeros_like(x)))
                fence_async_shared()
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        # hand P and the rescale factors to warpgroup 1 once it has read the previous ones
        mbarrier.wait(p_free, (i & 1) ^ 1)
        p_smem.store(p.to(p_smem.dtype))
        alpha_smem.store(alpha)
        fence_async_shared()
        mbarrier.arrive(p_ready, count=1)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        o = warpgroup_mma(p_smem, k.slice(0, 256, dim=1), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
        mbarrier.arrive(empty.index(st), count=1)
    l_smem.store(l_i)
    m_smem.store(m_i)
    mbarrier.arrive(fin, count=1)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
    _store_half(o, l_o, m_o, 0, row0, R, G, bi, n_split, split, out_ptr, lse_ptr, oacc_ptr, lacc_ptr,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls)


@gluon.jit
def _pv_partition(k_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty, p_ready, p_free, fin, n_tiles, row0, R, G, bi,
                  n_split, split, out_ptr, lse_ptr, oacc_ptr, lacc_ptr, stride_ob, stride_os, stride_oh, stride_lb,
                  stride_lh, stride_ls):
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    o = gl.zeros((64, 256), dtype=gl.float32, layout=o_layout)
    for i in range(n_tiles):
        st = i % 2
        mbarrier.wait(full.index(st), (i // 2) & 1)
        mbarrier.wait(p_ready, i & 1)
        alpha = alpha_smem.load(row_layout)
        o = o * alpha[:, None]
        o = warpgroup_mma(p_smem, k_bufs.index(st).reshape([64, 512]).slice(256, 256, dim=1), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
        mbarrier.arrive(p_free, count=1)
        mbarrier.arrive(empty.index(st), count=1)
    mbarrier.wait(fin, 0)
    l_o = l_smem.load(row_layout)
    m_o = m_smem.load(row_layout)
    _store_half(o, l_o, m_o, 256, row0, R, G, bi, n_split, split, out_ptr, lse_ptr, oacc_ptr, lacc_ptr,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls)


@gluon.jit
def _piece_bounds(sched_ptr, len_ptr, splits_ptr, s_q, SCHED_BLOCK: gl.constexpr, CAUSAL: gl.constexpr,
                  PIECES_FIRST: gl.constexpr):
    """This program's piece of the schedule: (request, first row, first key, tiles, open end,
    length, splits of the request, partial slot)."""
    # row blocks vary fastest in launch order: the CTAs of one piece run together and share its
    # keys through L2 (piece-major order read every key once per row block from HBM);
    # PIECES_FIRST: more pieces than the grid's second dimension takes (MAX_GRID_Y)
    if PIECES_FIRST:
        piece = gl.program_id(0)
        row0 = gl.program_id(1) * 64
    else:
        piece = gl.program_id(1)
        row0 = gl.program_id(0) * 64
    meta = sched_ptr + piece * 8
    req = gl.load(meta + 0)
    lo = gl.load(meta + 1) * SCHED_BLOCK
    hi = gl.load(meta + 2) * SCHED_BLOCK
    split_id = gl.load(meta + 3)
    req_ok = req >= 0  # unused rows of the piece table have req = -1
    req = gl.maximum(req, 0)
    length = gl.load(len_ptr + req)
    split_base = gl.load(splits_ptr + req)
    n_split = gl.where(req_ok, gl.load(splits_ptr + req + 1) - split_base, 0)
    stop = gl.minimum(hi, length)
    n_tiles = gl.where(n_split > 0, gl.cdiv(gl.maximum(stop - lo, 0), 64), 0)
    open_end = stop
    if CAUSAL:
        open_end = gl.minimum(stop, length - s_q + 1)  # keys <= length - s_q are visible to every row
    return req, row0, lo, n_tiles, open_end, length, n_split, split_base + split_id


@gluon.jit
def _stage_q(q_ptr, req, row0, R, G, stride_qb, stride_qs, stride_qh):
    """Q [64 rows, 576] of one row block into shared memory (rows: query token major, head minor;
    zeros past R): returns the [64, 512] and [64, 64] parts."""
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [64, 512], swizzled)
    qpe_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [64, 64], swizzled)
    chunk_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, chunk_layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, chunk_layout))
    row_ok = rows < R
    q_row = (q_ptr + req.to(gl.int64) * stride_qb + (rows // G).to(gl.int64) * stride_qs
             + (rows % G).to(gl.int64) * stride_qh)
    for c in gl.static_range(8):
        q_smem.slice(c * 64, 64, dim=1).store(gl.load(q_row[:, None] + c * 64 + cols[None, :], mask=row_ok[:, None],
                                                      other=0.0))
    qpe_smem.store(gl.load(q_row[:, None] + 512 + cols[None, :], mask=row_ok[:, None], other=0.0))
    fence_async_shared()
    return q_smem, qpe_smem


@gluon.jit
def _exchange_buffers(dtype: gl.constexpr):
    """P (one [64, 64] buffer), the rescale factors, the final row sums and maxima, and the
    barriers: full / empty per K stage (empty counts both warpgroups), p_ready, p_free, fin."""
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_smem = gl.allocate_shared_memory(dtype, [64, 64], swizzled)
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    alpha_smem = gl.allocate_shared_memory(gl.float32, [64], plain)
    l_smem = gl.allocate_shared_memory(gl.float32, [64], plain)
    m_smem = gl.allocate_shared_memory(gl.float32, [64], plain)
    full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    sync = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())  # p_ready, p_free, fin
    for i in gl.static_range(2):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(3):
        mbarrier.init(sync.index(i), count=1)
    return p_smem, alpha_smem, l_smem, m_smem, full, empty, sync


@gluon.jit
def _release_barriers(full, empty, sync):
    for i in gl.static_range(2):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(3):
        mbarrier.invalidate(sync.index(i))


@gluon.jit
def _mla_decode_kernel(q_ptr, knope_desc, kpe_desc, bt_ptr, len_ptr, sched_ptr, splits_ptr, out_ptr, lse_ptr, oacc_ptr,
                       lacc_ptr, s_q, G, R, scale_log2, stride_qb, stride_qs, stride_qh, stride_btb,
                       stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                       SCHED_BLOCK: gl.constexpr, CAUSAL: gl.constexpr, PIECES_FIRST: gl.constexpr):
    req, row0, lo, n_tiles, open_end, length, n_split, split = _piece_bounds(
        sched_ptr, len_ptr, splits_ptr, s_q, SCHED_BLOCK, CAUSAL, PIECES_FIRST)
    q_smem, qpe_smem = _stage_q(q_ptr, req, row0, R, G, stride_qb, stride_qs, stride_qh)
    k_bufs = gl.allocate_shared_memory(knope_desc.dtype, [2] + knope_desc.block_type.shape, knope_desc.layout)
    kpe_bufs = gl.allocate_shared_memory(kpe_desc.dtype, [2] + kpe_desc.block_type.shape, kpe_desc.layout)
    p_smem, alpha_smem, l_smem, m_smem, full, empty, sync = _exchange_buffers(q_ptr.dtype.element_ty)
    bt_row = bt_ptr + req.to(gl.int64) * stride_btb
    gl.warp_specialize([
        (_softmax_partition, (q_smem, qpe_smem, k_bufs, kpe_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty,
                              sync.index(0), sync.index(1), sync.index(2), n_tiles, lo, open_end, length, s_q, row0,
                              R, G, req, n_split, split, scale_log2, out_ptr, lse_ptr, oacc_ptr, lacc_ptr, stride_ob,
                              stride_os, stride_oh, stride_lb, stride_lh, stride_ls, CAUSAL)),
        (_pv_partition, (k_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty, sync.index(0), sync.index(1),
                         sync.index(2), n_tiles, row0, R, G, req, n_split, split, out_ptr, lse_ptr, oacc_ptr,
                         lacc_ptr, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls)),
        (_producer, (knope_desc, kpe_desc, k_bufs, kpe_bufs, full, empty, bt_row, lo // SCHED_BLOCK, n_tiles)),
    ], [4, 1], [208, 40])
    _release_barriers(full, empty, sync)


def gluon_decode_supported(q: torch.Tensor, kv: torch.Tensor, rows: int, *, sparse: bool, is_fp8: bool,
                           has_sink: bool, write_max: bool) -> bool:
    """Whether :func:`mla_decode_gluon` takes this call: Hopper, dense 16-bit cache with h_kv = 1
    and 64-token pages whose strides TMA can address, >= MIN_ROWS query rows, no sink, no max logits."""
    if sparse or is_fp8 or has_sink or write_max or rows < MIN_ROWS or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if kv.dtype not in (torch.bfloat16, torch.float16) or q.dtype != kv.dtype or kv.shape[2] != 1:
        return False
    if kv.shape[1] != PAGE_BLOCK_SIZE or kv.shape[3] != HEAD_DIM_QK or kv.stride(3) != 1 or q.stride(3) != 1:
        return False
    return all((s * kv.element_size()) % 16 == 0 for s in (kv.stride(0), kv.stride(1))) and kv.data_ptr() % 16 == 0


def mla_decode_gluon(q, kv, lengths, tile_scheduler_metadata, num_splits, softmax_scale, *, out, lse, block_table,
                     causal, oacc, lacc) -> None:
    """Launch the attention kernel (the combine kernel stays the caller's): same arguments as
    :func:`.kernel.mla_attention_triton` for the calls :func:`gluon_decode_supported` accepts;
    ``oacc`` [pieces * rows * 512] / ``lacc`` [pieces * rows] fp32 partial buffers."""
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    cache = kv[:, :, 0, :]  # [num_blocks, 64, 576], any block stride
    elt = gl.bfloat16 if kv.dtype == torch.bfloat16 else gl.float16
    knope_desc = TensorDescriptor.from_tensor(cache, [1, 64, HEAD_DIM_V],
                                              gl.NVMMASharedLayout.get_default_for([1, 64, HEAD_DIM_V], elt))
    kpe_desc = TensorDescriptor.from_tensor(cache, [1, 64, 64], gl.NVMMASharedLayout.get_default_for([1, 64, 64], elt))
    pieces = tile_scheduler_metadata.shape[0]
    pieces_first = pieces > MAX_GRID_Y
    _mla_decode_kernel[(pieces, ceil_div(rows, 64)) if pieces_first else (ceil_div(rows, 64), pieces)](
        q, knope_desc, kpe_desc, block_table, lengths, tile_scheduler_metadata, num_splits, out, lse, oacc, lacc,
        s_q, h_q, rows, softmax_scale * _LOG2E, q.stride(0), q.stride(1), q.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        SCHED_BLOCK=PAGE_BLOCK_SIZE, CAUSAL=causal, PIECES_FIRST=pieces_first, num_warps=4)
