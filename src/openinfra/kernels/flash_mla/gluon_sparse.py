"""Sparse MLA decoding in Gluon for Hopper: the dense warp-specialized kernel with a gathering producer.

The dense kernel (:mod:`.gluon_kernel`) streams 64-token pages through TMA. In sparse decoding
each query token has its own top-k keys, scattered over the cache, so TMA (one box per copy)
cannot fetch them; and from the FP8 cache they need dequantizing before the bf16 tensor-core
work. Here a producer *warpgroup* (4 warps) takes the TMA warp's place: for each tile of 64
packed indices of a query token it loads the token rows (656-byte FP8 rows: 512 e4m3 latents,
4 fp32 scales, 64 bf16 rope values; or 16-bit rows), dequantizes them in registers and stores
the bf16 [64, 576] tile into the K stage in the swizzled layout the MMAs read, then signals the
stage full. The two math warpgroups (S = Q K^T and the online softmax; the two halves of P V)
are the dense kernel's, unchanged.

This replaces gather-then-dense (:func:`.sparse_gather.gather_tokens` writing a bf16 workspace
that the dense kernel reads back): the selected rows are read once from the cache (656 bytes a
token from FP8 instead of 656 read + 1,152 written + 1,152 read), with no workspace.

Latency: a tile's indices are loaded two tiles ahead, its rows are requested into L2 then
(``prefetch.global.L2``, no registers held), and its loads keep two of the four scale groups in
flight; the producer holds one tile at a time (4 warps x 120 registers: the register file and
the kernel's 168-register floor leave no room for more warps or a second tile).

Inputs (:func:`mla_sparse_decode_fused`): the indices packed per query token
(:func:`.sparse_gather.pack_valid_indices`: valid indices first, their count as the length), and
the schedule the API built for the b * s_q top-k rows. Tiles past a row's count are loaded as
zeros (the dense softmax masks them by the length).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from openinfra.kernels.flash_mla.gluon_kernel import (
    _LOG2E, _exchange_buffers, _piece_bounds, _pv_partition, _release_barriers, _softmax_partition, _stage_q,
)
from openinfra.kernels.flash_mla.layout import (
    FP8_BYTES_PER_TOKEN, FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, HEAD_DIM_QK, HEAD_DIM_V, MAX_GRID_Y,
    PAGE_BLOCK_SIZE, ceil_div,
)

__all__ = ["mla_sparse_decode_fused", "SparseKernelConfig"]


class SparseKernelConfig(NamedTuple):
    """Register split and producer schedule (variants timed in benchmarks/notes/flash_mla.md, run 21).

    The softmax warpgroup (the default partition) gets what the two worker warpgroups leave of the
    64 K registers, less 8: 128 x (168 + 120) leaves it 216; no partition spills
    (``sass_loops.py gluon-mla-sparse 168,120,2,2``). A whole FP8 tile in registers would take ~110
    of the producer's 120 and spilled; two scale groups in flight do not."""
    pv_regs: int = 168  # the P V warpgroup: its [64, 256] fp32 accumulator is 128 of them
    producer_regs: int = 120
    prefetch: int = 2  # a tile's FP8 loads: 0 one scale group at a time, 2 two in flight
    l2_ahead: int = 2  # request a tile's rows into L2 this many tiles ahead (0, 1, 2)
    debug: int = 0  # probe only: 1 loads hit L1 (one row for all), 4 no producer work


# the FP8 row layout (layout.py) as compile-time constants of the kernels
_SCALE_OFF = gl.constexpr(FP8_SCALE_OFFSET)
_ROPE_OFF = gl.constexpr(FP8_ROPE_OFFSET)
_TILE = gl.constexpr(FP8_TILE)


@gluon.jit
def _tile_indices(idx_row, j, count):
    # [64] packed positions j -> cache token indices (int32; 0 past the count)
    return gl.load(idx_row + j, mask=j < count, other=0)


@gluon.jit
def _token_rows(cache_ptr, tok, page, stride_block, stride_page):
    # [64] token indices -> row pointers (int32 division: int64 division is a slow subroutine)
    blk = tok // page
    return cache_ptr + blk.to(gl.int64) * stride_block + (tok - blk * page).to(gl.int64) * stride_page


@gluon.jit
def _prefetch_rows_l2(rows, ok, ROW_BYTES: gl.constexpr):
    # ask L2 for every 128-byte line of the [64] rows (no registers held, nothing waited for)
    LINES: gl.constexpr = (ROW_BYTES + 127) // 128 + 1  # a row not aligned to a line spans one more
    COLS: gl.constexpr = 8 if LINES <= 8 else 16
    pf: gl.constexpr = gl.BlockedLayout([1, COLS // 8], [4, 8], [4, 1], [1, 0])
    r = gl.convert_layout(rows, gl.SliceLayout(1, pf))
    m = gl.convert_layout(ok, gl.SliceLayout(1, pf))
    k = gl.arange(0, COLS, layout=gl.SliceLayout(0, pf))
    off = gl.minimum(k * 128, ROW_BYTES - 1)
    addr = r[:, None] + off[None, :]
    live = (m[:, None] & (k < LINES)[None, :]).to(gl.int32)
    gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [addr, live], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _load_fp8_group(rows, ok, e, c: gl.constexpr, SCALE_OFF: gl.constexpr, TILE: gl.constexpr):
    # scale group c of 64 FP8 rows: ([64, 128] e4m3 bytes, [64] fp32 scales); invalid rows read as 0
    x = gl.load(rows[:, None] + c * TILE + e[None, :], mask=ok[:, None], other=0)
    scale = gl.load((rows + SCALE_OFF + 4 * c).to(gl.pointer_type(gl.float32)), mask=ok, other=0.0)
    return x, scale


@gluon.jit
def _store_fp8_group(k, x, scale, c: gl.constexpr, TILE: gl.constexpr):
    v = x.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, None]
    k.slice(c * TILE, TILE, dim=1).store(v.to(gl.bfloat16))


@gluon.jit
def _gather_producer(cache_ptr, idx_row, k_bufs, kpe_bufs, full, empty, lo, count, n_tiles, page, stride_block,
                     stride_page, IS_FP8: gl.constexpr, SCALE_OFF: gl.constexpr, ROPE_OFF: gl.constexpr,
                     TILE: gl.constexpr, PREFETCH: gl.constexpr, L2_AHEAD: gl.constexpr, ROW_BYTES: gl.constexpr,
                     DEBUG: gl.constexpr):
    # 4 warps. FP8 latents: [64 tokens, 128 values] a scale group, 16 bytes a thread (one 128-bit load)
    lat8: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    # 16-bit values (latents of a 16-bit cache, rope of both): [64 tokens, 64 values], 8 a thread;
    # the same rows per thread as lat8, so moving a row vector between the two costs nothing
    lat16: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    row8: gl.constexpr = gl.SliceLayout(1, lat8)
    row16: gl.constexpr = gl.SliceLayout(1, lat16)
    e8 = gl.arange(0, TILE, layout=gl.SliceLayout(0, lat8))
    e16 = gl.arange(0, 64, layout=gl.SliceLayout(0, lat16))
    # indices are loaded two tiles ahead: a tile's rows are known a tile before its loads, so
    # (L2_AHEAD) their lines can be requested into L2 then, and the loads wait for L2, not HBM
    j0 = lo + gl.arange(0, 64, layout=row8)
    tok = _tile_indices(idx_row, j0, count)
    tok_next = _tile_indices(idx_row, j0 + 64, count)
    if L2_AHEAD != 0:
        _prefetch_rows_l2(_token_rows(cache_ptr, tok, page, stride_block, stride_page), j0 < count, ROW_BYTES)
    if L2_AHEAD == 2:
        _prefetch_rows_l2(_token_rows(cache_ptr, tok_next, page, stride_block, stride_page), j0 + 64 < count,
                          ROW_BYTES)
    for i in range(n_tiles):
        st = i % 2
        j = lo + i * 64 + gl.arange(0, 64, layout=row8)
        ok8 = j < count
        row_tok = tok
        if DEBUG == 1:  # (probe) every row is token 0's: the loads hit L1, the conversion stays
            row_tok = tok * 0
        rows8 = _token_rows(cache_ptr, row_tok, page, stride_block, stride_page)
        if L2_AHEAD == 1:
            _prefetch_rows_l2(_token_rows(cache_ptr, tok_next, page, stride_block, stride_page), j + 64 < count,
                              ROW_BYTES)
        tok = tok_next
        tok_next = _tile_indices(idx_row, j + 128, count)
        rows16 = gl.convert_layout(rows8, row16)
        ok16 = gl.convert_layout(ok8, row16)
        k = k_bufs.index(st).reshape([64, 512])
        # a fresh barrier has completed the phase before its first: the first lap does not wait
        phase = ((i // 2) & 1) ^ 1
        if DEBUG == 4:  # (probe) the producer only passes stages on: the consumers' speed alone
            mbarrier.wait(empty.index(st), phase)
        elif IS_FP8:
            rope_rows = (rows16 + ROPE_OFF).to(gl.pointer_type(gl.bfloat16))
            if PREFETCH == 2:
                # two scale groups in flight: each load overlaps the conversion of the one before
                xa, sa = _load_fp8_group(rows8, ok8, e8, 0, SCALE_OFF, TILE)
                xb, sb = _load_fp8_group(rows8, ok8, e8, 1, SCALE_OFF, TILE)
                mbarrier.wait(empty.index(st), phase)
                _store_fp8_group(k, xa, sa, 0, TILE)
                xa, sa = _load_fp8_group(rows8, ok8, e8, 2, SCALE_OFF, TILE)
                _store_fp8_group(k, xb, sb, 1, TILE)
                xb, sb = _load_fp8_group(rows8, ok8, e8, 3, SCALE_OFF, TILE)
                rope = gl.load(rope_rows[:, None] + e16[None, :], mask=ok16[:, None], other=0.0)
                _store_fp8_group(k, xa, sa, 2, TILE)
                _store_fp8_group(k, xb, sb, 3, TILE)
            else:
                mbarrier.wait(empty.index(st), phase)
                for c in gl.static_range(512 // TILE):
                    x, scale = _load_fp8_group(rows8, ok8, e8, c, SCALE_OFF, TILE)
                    _store_fp8_group(k, x, scale, c, TILE)
                rope = gl.load(rope_rows[:, None] + e16[None, :], mask=ok16[:, None], other=0.0)
        else:
            mbarrier.wait(empty.index(st), phase)
            for c in gl.static_range(8):
                x = gl.load(rows16[:, None] + c * 64 + e16[None, :], mask=ok16[:, None], other=0.0)
                k.slice(c * 64, 64, dim=1).store(x.to(gl.bfloat16))
            rope = gl.load(rows16[:, None] + 512 + e16[None, :], mask=ok16[:, None], other=0.0)
        if DEBUG != 4:
            kpe_bufs.index(st).reshape([64, 64]).store(rope.to(gl.bfloat16))
        if L2_AHEAD == 2:  # the tile after next, its indices having arrived during this tile
            _prefetch_rows_l2(_token_rows(cache_ptr, tok_next, page, stride_block, stride_page), j + 128 < count,
                              ROW_BYTES)
        # generic-proxy stores read by wgmma (async proxy): fence, then one arrive for the warpgroup
        fence_async_shared()
        mbarrier.arrive(full.index(st), count=1)


@gluon.jit
def _mla_sparse_kernel(q_ptr, cache_ptr, idx_ptr, len_ptr, sched_ptr, splits_ptr, out_ptr, lse_ptr, oacc_ptr,
                       lacc_ptr, G, R, scale_log2, page, stride_qb, stride_qh, stride_idx, stride_block,
                       stride_page, stride_ob, stride_oh, stride_lb, stride_lh,
                       SCHED_BLOCK: gl.constexpr, PIECES_FIRST: gl.constexpr, IS_FP8: gl.constexpr,
                       PV_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PREFETCH: gl.constexpr,
                       L2_AHEAD: gl.constexpr, ROW_BYTES: gl.constexpr,
                       DEBUG: gl.constexpr):
    # one "request" per query token (b * s_q of them, s_q = 1 each), its packed top-k as the keys
    req, row0, lo, n_tiles, open_end, length, n_split, split = _piece_bounds(
        sched_ptr, len_ptr, splits_ptr, 1, SCHED_BLOCK, False, PIECES_FIRST)
    q_smem, qpe_smem = _stage_q(q_ptr, req, row0, R, G, stride_qb, 0, stride_qh)
    kl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, 1, 64, 512], kl)
    kpe_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, 1, 64, 64], kl)
    p_smem, alpha_smem, l_smem, m_smem, full, empty, sync = _exchange_buffers(gl.bfloat16)
    idx_row = idx_ptr + req.to(gl.int64) * stride_idx
    gl.warp_specialize([
        (_softmax_partition, (q_smem, qpe_smem, k_bufs, kpe_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty,
                              sync.index(0), sync.index(1), sync.index(2), n_tiles, lo, open_end, length, 1, row0,
                              R, G, req, n_split, split, scale_log2, out_ptr, lse_ptr, oacc_ptr, lacc_ptr, stride_ob,
                              0, stride_oh, stride_lb, stride_lh, 0, False)),
        (_pv_partition, (k_bufs, p_smem, alpha_smem, l_smem, m_smem, full, empty, sync.index(0), sync.index(1),
                         sync.index(2), n_tiles, row0, R, G, req, n_split, split, out_ptr, lse_ptr, oacc_ptr,
                         lacc_ptr, stride_ob, 0, stride_oh, stride_lb, stride_lh, 0)),
        (_gather_producer, (cache_ptr, idx_row, k_bufs, kpe_bufs, full, empty, lo, length, n_tiles, page,
                            stride_block, stride_page, IS_FP8, _SCALE_OFF, _ROPE_OFF, _TILE, PREFETCH, L2_AHEAD,
                            ROW_BYTES, DEBUG)),
    ], [4, 4], [PV_REGS, PRODUCER_REGS])
    _release_barriers(full, empty, sync)


def mla_sparse_decode_fused(q: torch.Tensor, k_cache: torch.Tensor, packed: torch.Tensor, counts: torch.Tensor,
                            meta: torch.Tensor, splits: torch.Tensor, softmax_scale: float, *, is_fp8: bool,
                            out: torch.Tensor, lse: torch.Tensor,
                            config: SparseKernelConfig = SparseKernelConfig()) -> None:
    """Sparse decode of R = b * s_q query tokens (attention kernel and combine), writing out / lse.

    q: [R, h_q, 576] bf16 (last stride 1); k_cache: [num_blocks, page, 1, 656] (FP8 layout, any
    dtype of that byte size) or [num_blocks, page, 1, 576] bf16, any block / page strides;
    packed: [R, topk] int32 valid cache token indices first (:func:`.sparse_gather.pack_valid_indices`),
    counts: [R] int32 their numbers; meta / splits: the schedule for R requests of h_q rows in
    64-token blocks. out: [R, h_q, 512] bf16 (last stride 1); lse: [R, h_q] fp32 (contiguous).
    """
    from openinfra.kernels.flash_mla.kernel import launch_combine

    n_rows, h_q, _ = q.shape
    cache = k_cache.view(torch.uint8) if is_fp8 else k_cache
    pieces = meta.shape[0]
    oacc = torch.empty(pieces * h_q * HEAD_DIM_V, dtype=torch.float32, device=q.device)
    lacc = torch.empty(pieces * h_q, dtype=torch.float32, device=q.device)
    pieces_first = pieces > MAX_GRID_Y
    row_blocks = ceil_div(h_q, 64)
    _mla_sparse_kernel[(pieces, row_blocks) if pieces_first else (row_blocks, pieces)](
        q, cache, packed, counts, meta, splits, out, lse, oacc, lacc, h_q, h_q, softmax_scale * _LOG2E,
        k_cache.shape[1], q.stride(0), q.stride(1), packed.stride(0), cache.stride(0), cache.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        SCHED_BLOCK=PAGE_BLOCK_SIZE, PIECES_FIRST=pieces_first, IS_FP8=is_fp8, PV_REGS=config.pv_regs,
        PRODUCER_REGS=config.producer_regs, PREFETCH=int(config.prefetch),
        L2_AHEAD=int(config.l2_ahead),
        ROW_BYTES=FP8_BYTES_PER_TOKEN if is_fp8 else HEAD_DIM_QK * k_cache.element_size(), DEBUG=config.debug,
        num_warps=4)
    # the combine kernel sees R requests of one query token each
    launch_combine(splits, out.view(n_rows, 1, h_q, HEAD_DIM_V), lse.view(n_rows, h_q, 1), oacc, lacc,
                   s_q=1, h_kv=1, g=h_q, rows=h_q, sparse=False)

