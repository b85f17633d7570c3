"""Triton kernels of MLA decoding: split-KV attention over the paged cache, and the combine.

``_mla_attn_kernel``: one program per (piece of the tile schedule, KV head x row tile) computes its
request's keys in the piece's block range (see :mod:`metadata`). Query rows of one KV head are folded into the M
dimension of the tile (``rows = s_q * h_q / h_kv``: query token major, head minor), so one K/V
tile read from the cache serves up to 64 rows. K is the 576-dim latent row, loaded as its 512
"nope" dims and 64 rope dims; V is the same 512-dim tile (one load serves both matrix products).
Online softmax in base 2, fp32 accumulators; the probabilities go to the tensor cores in the
cache's 16-bit type. Constexpr flags pick the variants:

- ``SPARSE``: each request is one (batch, query token) whose keys are given by a list of physical
  token indices (``page * page_size + offset``; < 0, >= num_tokens, or past ``topk_length`` are
  skipped); otherwise keys come from the block table in order and ``CAUSAL`` may apply.
- ``FP8``: the cache is 656-byte rows (e4m3 + 4 power-of-two fp32 scales + bf16 rope) and each
  tile is dequantized to bf16 in registers right after its load.
- ``HAS_SINK``: attention-sink scaling of the final output; ``WRITE_MAX``: also store the max logit.

A piece that covers its whole request writes the final output and lse; pieces of a request cut by
the schedule's chunk boundaries write fp32 partials (output normalized by its own sum, lse in base 2), which
``_mla_combine_kernel`` merges and which also writes the empty requests (output 0, lse +inf).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from openinfra.kernels.backend import interpreter_enabled
from openinfra.kernels.flash_mla.layout import (
    BLOCK_M, FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, HEAD_DIM_ROPE, HEAD_DIM_V, MAX_GRID_Y, PAGE_BLOCK_SIZE,
    ceil_div,
)

__all__ = ["mla_attention_triton", "launch_combine", "KernelConfig", "uses_gluon_decode"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _round_to_16bit_grid(v, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    # Round fp32 v to the nearest value with MANT_BITS mantissa bits (bf16: 7, fp16: 10), ties to
    # even, staying in fp32. Only used under Triton's CPU interpreter, whose fp32 -> bf16/fp16
    # conversion truncates instead of rounding; after this the conversion is exact.
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    quantum_exp = tl.maximum(exponent, MIN_EXP) - MANT_BITS
    quantum = ((quantum_exp + 127) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(v) / quantum  # exact: division by a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds t to an integer, ties to even
    rounded = (t * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _to_16bit(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        if dtype == tl.bfloat16:
            v = _round_to_16bit_grid(v, 7, -126)
        else:
            v = _round_to_16bit_grid(v, 10, -14)
    return v.to(dtype)


@triton.jit
def _finish_rows(acc, m2, l, head, sink_ptr, out_ptrs, lse_ptrs, max_ptrs, row_ok,
                 HAS_SINK: tl.constexpr, WRITE_MAX: tl.constexpr, D_V: tl.constexpr, INTERPRET: tl.constexpr):
    # acc: [BM, D_V] un-normalized; m2: row max (base-2 units); l: row sum of exp2(s - m2).
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    lse = (m2 + tl.log2(l_safe)) * 0.6931471805599453
    o = acc / l_safe[:, None]
    if HAS_SINK:
        sink = tl.load(sink_ptr + head, mask=row_ok, other=0.0)
        o = o * (1.0 / (1.0 + tl.exp(sink - lse)))[:, None]
    o = tl.where(empty[:, None], 0.0, o)
    lse = tl.where(empty, float("inf"), lse)
    tl.store(out_ptrs, _to_16bit(o, out_ptrs.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    tl.store(lse_ptrs, lse, mask=row_ok)
    if WRITE_MAX:
        tl.store(max_ptrs, tl.where(empty, float("-inf"), m2 * 0.6931471805599453), mask=row_ok)


@triton.jit
def _attend_tile(acc, m_i, l_i, q_nope, q_pe, krow, valid, keep, scale_log2, cols, rcols,
                 MASKED: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
                 D_V: tl.constexpr, SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr, FP8_TILE: tl.constexpr):
    """One K tile of online softmax attention: load the [BLOCK_N] cache rows at ``krow`` (the 512
    "nope" dims serve as K and V, plus the 64 rope dims), S = Q K^T (base-2 scaled), update the
    running max ``m_i``, sum ``l_i`` and the [BM, D_V] accumulator. With MASKED, rows where
    ``valid`` is false load as zeros and scores outside ``keep`` [BM, BLOCK_N] are -inf; without
    it every key is used (the caller knows the tile is whole)."""
    if FP8:
        if MASKED:
            raw = tl.load(krow[:, None] + cols[None, :], mask=valid[:, None], other=0)
        else:
            raw = tl.load(krow[:, None] + cols[None, :])
        vals = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        sptr = (krow[:, None] + SCALE_OFF + 4 * tl.arange(0, D_V // FP8_TILE)[None, :]).to(tl.pointer_type(tl.float32))
        rptr = (krow[:, None] + ROPE_OFF + 2 * rcols[None, :]).to(tl.pointer_type(tl.bfloat16))
        if MASKED:
            sc = tl.load(sptr, mask=valid[:, None], other=0.0)
            k_pe = tl.load(rptr, mask=valid[:, None], other=0.0)
        else:
            sc = tl.load(sptr)
            k_pe = tl.load(rptr)
        vals = tl.reshape(tl.reshape(vals, [BLOCK_N, D_V // FP8_TILE, FP8_TILE]) * sc[:, :, None], [BLOCK_N, D_V])
        k_nope = vals.to(tl.bfloat16)  # exact: e4m3 times a power of two fits bf16
    elif MASKED:
        k_nope = tl.load(krow[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
        k_pe = tl.load(krow[:, None] + D_V + rcols[None, :], mask=valid[:, None], other=0.0)
    else:
        k_nope = tl.load(krow[:, None] + cols[None, :])
        k_pe = tl.load(krow[:, None] + D_V + rcols[None, :])
    if INTERPRET:  # the interpreter's 16-bit dot is wrong: compute it in fp32
        k_nope_mm = k_nope.to(tl.float32)
        k_pe_mm = k_pe.to(tl.float32)
    else:
        k_nope_mm = k_nope
        k_pe_mm = k_pe
    s = tl.dot(q_nope, tl.trans(k_nope_mm))
    s = tl.dot(q_pe, tl.trans(k_pe_mm), s)
    s = s * scale_log2
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p16 = _to_16bit(p, k_nope.dtype, INTERPRET)
    if INTERPRET:
        acc = acc * alpha[:, None] + tl.dot(p16.to(tl.float32), k_nope_mm)
    else:
        acc = tl.dot(p16, k_nope, acc * alpha[:, None])
    return acc, m_new, l_i


# Integer arguments that vary between calls but never shape a vector access: not specialized, so
# a new batch size, head count or page size reuses the compiled kernel (each compile is seconds).
_NO_SPEC = ["s_q", "n_tokens", "page_size", "h_kv", "G", "R", "stride_btb", "stride_ib", "stride_is",
            "stride_lb", "stride_lh", "stride_ls"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _mla_attn_kernel(
    q_ptr, kv_ptr, bt_ptr, len_ptr, idx_ptr, sched_ptr, splits_ptr, sink_ptr,
    out_ptr, lse_ptr, max_ptr, oacc_ptr, lacc_ptr,
    s_q, n_tokens, page_size, h_kv, G, R, scale_log2,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb, stride_ib, stride_is,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCHED_BLOCK: tl.constexpr,
    D_V: tl.constexpr, D_R: tl.constexpr,
    CAUSAL: tl.constexpr, SPARSE: tl.constexpr, FP8: tl.constexpr,
    HAS_SINK: tl.constexpr, WRITE_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr, FP8_TILE: tl.constexpr, PIECES_FIRST: tl.constexpr,
):
    # row blocks vary fastest in launch order, so the CTAs reading one piece's pages run together
    # and all but the first read them from L2 (piece-major order streamed every page m_blocks times);
    # PIECES_FIRST: more pieces than the grid's second dimension takes (MAX_GRID_Y)
    if PIECES_FIRST:
        piece = tl.program_id(0)
        pid1 = tl.program_id(1)
    else:
        piece = tl.program_id(1)
        pid1 = tl.program_id(0)
    kvh = pid1 % h_kv
    mb = pid1 // h_kv
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    r_s = rows // G  # query token of each row (dense folding: token major)
    head = kvh * G + rows % G
    cols = tl.arange(0, D_V)
    rcols = tl.arange(0, D_R)
    offs_n = tl.arange(0, BLOCK_N)

    meta = sched_ptr + piece * 8
    req = tl.load(meta + 0)
    if req < 0:  # unused row of the piece table
        return
    lo = tl.load(meta + 1) * SCHED_BLOCK
    hi = tl.load(meta + 2) * SCHED_BLOCK
    split_id = tl.load(meta + 3)
    length = tl.load(len_ptr + req)
    split_base = tl.load(splits_ptr + req)
    n_split = tl.load(splits_ptr + req + 1) - split_base
    if n_split == 0:  # defensive: the schedule lists no piece of an empty request
        return
    if SPARSE:
        bi = req // s_q
        si = r_s * 0 + req % s_q
    else:
        bi = req
        si = r_s
    q_row = q_ptr + bi.to(tl.int64) * stride_qb + si.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    q_nope = tl.load(q_row[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_row[:, None] + D_V + rcols[None, :], mask=row_ok[:, None], other=0.0)
    if INTERPRET:  # the interpreter's 16-bit dot is wrong: compute it in fp32
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    if CAUSAL:
        last_key = length - s_q + si  # [BM]: the last key each row may see
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], tl.float32)
    stop = tl.minimum(hi, length)
    # The page index (dense) or token indices (sparse) of each K tile are loaded one tile
    # ahead and carried through the loop: when the cache load's address came from a load in
    # the same iteration, Triton's software pipeliner kept a single buffer and waited on it
    # every tile (seen in the TTGIR for sm_90); carried, the tile loads get multi-buffered.
    if SPARSE:
        idx_row = idx_ptr + bi.to(tl.int64) * stride_ib + (req % s_q) * stride_is
        tok_next = tl.load(idx_row + lo + offs_n, mask=(lo + offs_n < stop), other=-1)
    else:
        bt_row = bt_ptr + bi.to(tl.int64) * stride_btb
        # Dense pages hold SCHED_BLOCK (= 64) tokens (the API enforces it): a compile-time page size
        # turns the per-token division and modulo into shifts and masks.
        page_next = tl.load(bt_row + lo // SCHED_BLOCK, mask=lo < stop, other=0)
    if SPARSE:
        for start in range(lo, stop, BLOCK_N):
            pos = start + offs_n
            tok = tok_next
            tok_next = tl.load(idx_row + BLOCK_N + pos, mask=BLOCK_N + pos < length, other=-1)
            valid = (pos < length) & (tok >= 0) & (tok < n_tokens)
            tok = tl.where(valid, tok, 0)
            krow = (kv_ptr + (tok // page_size).to(tl.int64) * stride_kb + (tok % page_size).to(tl.int64) * stride_kt
                    + kvh * stride_kh)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_nope, q_pe, krow, valid, valid[None, :] & row_ok[:, None],
                                         scale_log2, cols, rcols, True, FP8, INTERPRET, BLOCK_N, D_V,
                                         SCALE_OFF, ROPE_OFF, FP8_TILE)
    else:
        # Tiles whose keys every row may see run without masks (no predicates on the loads, no
        # select on the scores); the ones cut by the length or, with CAUSAL, by the diagonal run
        # after them with masks. A tile never straddles pages: BLOCK_N divides the 64-token page.
        open_end = stop
        if CAUSAL:
            open_end = tl.minimum(stop, length - s_q + 1)  # keys <= length - s_q are visible to every row
        full_end = lo
        if not FP8:  # (the FP8 tile's dequantization leaves no registers for a second loop body)
            full_end = lo + tl.maximum(open_end - lo, 0) // BLOCK_N * BLOCK_N
            for start in range(lo, full_end, BLOCK_N):
                page = page_next
                page_next = tl.load(bt_row + (start + BLOCK_N) // SCHED_BLOCK, mask=start + BLOCK_N < stop, other=0)
                # one 64-bit page base per tile, 32-bit offsets inside the page
                krow = (kv_ptr + page.to(tl.int64) * stride_kb + kvh * stride_kh
                        + ((start + offs_n) % SCHED_BLOCK) * stride_kt)
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_nope, q_pe, krow, row_ok, row_ok[:, None],
                                             scale_log2, cols, rcols, False, FP8, INTERPRET, BLOCK_N, D_V,
                                             SCALE_OFF, ROPE_OFF, FP8_TILE)
        for start in range(full_end, stop, BLOCK_N):
            pos = start + offs_n
            page = page_next
            page_next = tl.load(bt_row + (start + BLOCK_N) // SCHED_BLOCK, mask=start + BLOCK_N < stop, other=0)
            krow = kv_ptr + page.to(tl.int64) * stride_kb + kvh * stride_kh + (pos % SCHED_BLOCK) * stride_kt
            valid = pos < length
            keep = valid[None, :] & row_ok[:, None]
            if CAUSAL:
                keep = keep & (pos[None, :] <= last_key[:, None])
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_nope, q_pe, krow, valid, keep,
                                         scale_log2, cols, rcols, True, FP8, INTERPRET, BLOCK_N, D_V,
                                         SCALE_OFF, ROPE_OFF, FP8_TILE)

    if n_split == 1:
        o_rows = out_ptr + bi.to(tl.int64) * stride_ob + si.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
        l_off = bi.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + si.to(tl.int64) * stride_ls
        _finish_rows(acc, m_i, l_i, head, sink_ptr, o_rows[:, None] + cols[None, :], lse_ptr + l_off,
                     max_ptr + l_off, row_ok, HAS_SINK, WRITE_MAX, D_V, INTERPRET)
    else:
        split = split_base + split_id
        slot_row = (split.to(tl.int64) * h_kv + kvh) * R + rows
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        tl.store(oacc_ptr + slot_row[:, None] * D_V + cols[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
        tl.store(lacc_ptr + slot_row, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)


@triton.jit(do_not_specialize=["s_q", "h_kv", "G", "R", "stride_lb", "stride_lh", "stride_ls"])
def _mla_combine_kernel(
    splits_ptr, sink_ptr, out_ptr, lse_ptr, max_ptr, oacc_ptr, lacc_ptr,
    s_q, h_kv, G, R,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    BLOCK_R: tl.constexpr, D_V: tl.constexpr, SPARSE: tl.constexpr, HAS_SINK: tl.constexpr,
    WRITE_MAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, D_V)
    base = tl.load(splits_ptr + req)
    n = tl.load(splits_ptr + req + 1) - base
    if n != 1:  # one split: the attention kernel already wrote the final rows
        if SPARSE:
            bi = req // s_q
            si = (rows // G) * 0 + req % s_q
        else:
            bi = req
            si = rows // G
        head = kvh * G + rows % G
        mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for k in range(0, n):
            lk = tl.load(lacc_ptr + ((base + k).to(tl.int64) * h_kv + kvh) * R + rows, mask=row_ok, other=float("-inf"))
            mx = tl.maximum(mx, lk)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D_V], tl.float32)
        for k in range(0, n):
            slot_row = ((base + k).to(tl.int64) * h_kv + kvh) * R + rows
            lk = tl.load(lacc_ptr + slot_row, mask=row_ok, other=float("-inf"))
            w = tl.exp2(lk - mx_safe)
            total += w
            o = tl.load(oacc_ptr + slot_row[:, None] * D_V + cols[None, :], mask=row_ok[:, None], other=0.0)
            acc += w[:, None] * o
        o_rows = out_ptr + bi.to(tl.int64) * stride_ob + si.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
        l_off = bi.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + si.to(tl.int64) * stride_ls
        # acc / total is the merged output; (mx, total) the merged max and sum in base 2. WRITE_MAX is
        # only set for sparse prefill, which never splits: here it only marks empty rows (-inf).
        _finish_rows(acc, mx_safe, total, head, sink_ptr, o_rows[:, None] + cols[None, :], lse_ptr + l_off,
                     max_ptr + l_off, row_ok, HAS_SINK, WRITE_MAX, D_V, INTERPRET)


class KernelConfig:
    """Launch parameters of the attention kernel; ``None`` picks the default for the row count.

    Defaults come from the compiler's resource report for sm_90 (Triton's TTGIR and ptxas -v of the
    kernel compiled for the H200 without a device; numbers in benchmarks/notes/flash_mla.md): with
    16-32 rows per tile, 8 warps and 64-token K tiles double-buffered by the pipeliner (three
    stages) fit in ~200 registers and 168-188 KB of shared memory; with 64 rows the [64, 512] fp32
    accumulator alone takes 128 registers per thread at 8 warps, and the 73 KB q tile leaves room
    for double-buffered 32-token tiles only (64-token ones need 295 KB).
    """

    def __init__(self, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None):
        if block_m not in (None, 16, 32, 64):
            raise ValueError(f"block_m must be 16, 32 or 64, got {block_m}")
        if block_n not in (None, 16, 32, 64):
            raise ValueError(f"block_n must be 16, 32 or 64, got {block_n}")
        self.block_m, self.block_n, self.num_warps, self.num_stages = block_m, block_n, num_warps, num_stages

    def resolve(self, rows: int, dense_16bit: bool = True) -> tuple[int, int, int, int]:
        """(block_m, block_n, num_warps, num_stages) for tiles of ``rows`` query rows.

        ``dense_16bit``: block-table keys from a bf16/fp16 cache. Its defaults are the fastest of the
        H200 sweep (benchmarks/notes/flash_mla.md, run 3): 64-token K tiles at every row count,
        double-buffered at 32 rows, single-stage issue at 16 and 64 rows, where the pipeliner's
        third buffer cost more (registers, shared memory) than it hid. The FP8 and sparse variants
        keep the resource-report defaults (64 rows: 32-token tiles, three stages, no spills).
        """
        bm = self.block_m or min(BLOCK_M, max(16, triton.next_power_of_2(rows)))
        if dense_16bit:
            bn = self.block_n or 64
            ns = self.num_stages or (3 if bm == 32 else 2)
        else:
            bn = self.block_n or (32 if bm >= 64 else 64)
            ns = self.num_stages or 3
        nw = self.num_warps or 8
        return bm, bn, nw, ns

    def __repr__(self) -> str:
        return (f"KernelConfig(block_m={self.block_m}, block_n={self.block_n}, num_warps={self.num_warps}, "
                f"num_stages={self.num_stages})")


def gluon_decode_enabled() -> bool:
    """The Gluon decode kernel may run at all: not under the interpreter, and not switched off with
    OPENINFRA_MLA_GLUON=0 (then the Triton kernels take every call)."""
    return not interpreter_enabled() and os.environ.get("OPENINFRA_MLA_GLUON", "1") != "0"


def uses_gluon_decode(q: torch.Tensor, kv: torch.Tensor, rows: int, *, paged: bool, sparse: bool, is_fp8: bool,
                      has_sink: bool, write_max: bool) -> bool:
    """Whether :func:`mla_attention_triton` runs this call on the Gluon decode kernel
    (:mod:`.gluon_kernel`): where :func:`.gluon_kernel.gluon_decode_supported` takes it, with a
    block table, outside the interpreter, unless OPENINFRA_MLA_GLUON=0."""
    if not paged or not gluon_decode_enabled():
        return False
    from openinfra.kernels.flash_mla.gluon_kernel import gluon_decode_supported

    return gluon_decode_supported(q, kv, rows, sparse=sparse, is_fp8=is_fp8, has_sink=has_sink, write_max=write_max)


def mla_attention_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    lengths: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    *,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_table: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    n_tokens: int = 0,
    causal: bool = False,
    is_fp8: bool = False,
    attn_sink: torch.Tensor | None = None,
    max_logits: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> None:
    """Launch the attention kernel and the combine kernel (arguments already validated).

    q: [b, s_q, h_q, 576] (any strides, last one 1); kv: [num_blocks, page, h_kv, 576] 16-bit or
    [num_blocks, page, 1, 656] uint8; lengths: [num_requests] int32 (dense: b requests, the
    cache lengths; sparse: b * s_q requests, the top-k lengths); out: [b, s_q, h_q, 512];
    lse: [b, h_q, s_q] fp32 (any strides); max_logits like lse or None. Writes out, lse, max_logits.
    """
    config = config or KernelConfig()
    b, s_q, h_q, _ = q.shape
    page, h_kv = kv.shape[1], kv.shape[2]
    sparse = indices is not None
    g = h_q // h_kv
    rows = g if sparse else s_q * g
    bm, bn, num_warps, num_stages = config.resolve(rows, dense_16bit=not (sparse or is_fp8))
    m_blocks = ceil_div(rows, bm)
    pieces = tile_scheduler_metadata.shape[0]
    dev = q.device
    # Partials: at most one per row of the piece table.
    cap = pieces
    oacc = torch.empty(cap * h_kv * rows * HEAD_DIM_V, dtype=torch.float32, device=dev)
    lacc = torch.empty(cap * h_kv * rows, dtype=torch.float32, device=dev)
    # stand-ins for the absent optional tensors: never read (their constexpr flags are off), so an
    # argument of the right dtype does, with no allocation or fill launched per call
    bt = block_table if block_table is not None else lengths
    idx = indices if indices is not None else lengths
    sink = attn_sink if attn_sink is not None else lse
    mx = max_logits if max_logits is not None else lse
    kv_arg = kv.view(torch.uint8) if is_fp8 else kv
    interpret = interpreter_enabled()
    if uses_gluon_decode(q, kv, rows, paged=block_table is not None, sparse=sparse, is_fp8=is_fp8,
                         has_sink=attn_sink is not None, write_max=max_logits is not None):
        from openinfra.kernels.flash_mla.gluon_kernel import mla_decode_gluon

        mla_decode_gluon(q, kv, lengths, tile_scheduler_metadata, num_splits, softmax_scale, out=out, lse=lse,
                         block_table=block_table, causal=causal, oacc=oacc, lacc=lacc)
    else:
        pieces_first = pieces > MAX_GRID_Y
        grid = (pieces, h_kv * m_blocks) if pieces_first else (h_kv * m_blocks, pieces)
        _mla_attn_kernel[grid](
            q, kv_arg, bt, lengths, idx, tile_scheduler_metadata, num_splits, sink,
            out, lse, mx, oacc, lacc,
            s_q, n_tokens, page, h_kv, g, rows, softmax_scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            kv_arg.stride(0), kv_arg.stride(1), kv_arg.stride(2),
            bt.stride(0) if block_table is not None else 0,
            idx.stride(0) if sparse else 0, idx.stride(1) if sparse else 0,
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, SCHED_BLOCK=PAGE_BLOCK_SIZE,
            D_V=HEAD_DIM_V, D_R=HEAD_DIM_ROPE,
            CAUSAL=causal, SPARSE=sparse, FP8=is_fp8,
            HAS_SINK=attn_sink is not None, WRITE_MAX=max_logits is not None, INTERPRET=interpret,
            SCALE_OFF=FP8_SCALE_OFFSET, ROPE_OFF=FP8_ROPE_OFFSET, FP8_TILE=FP8_TILE, PIECES_FIRST=pieces_first,
            num_warps=num_warps, num_stages=num_stages,
        )
    launch_combine(num_splits, out, lse, oacc, lacc, s_q=s_q, h_kv=h_kv, g=g, rows=rows, sparse=sparse,
                   attn_sink=attn_sink, max_logits=max_logits)


def launch_combine(num_splits: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, oacc: torch.Tensor,
                   lacc: torch.Tensor, *, s_q: int, h_kv: int, g: int, rows: int, sparse: bool,
                   attn_sink: torch.Tensor | None = None, max_logits: torch.Tensor | None = None) -> None:
    """Merge the fp32 partials of every split request into out / lse (/ max_logits); requests
    with one split were written whole by the attention kernel. num_splits: [n_req + 1] int32
    prefix sums; oacc [slots * h_kv * rows * 512] / lacc [slots * h_kv * rows] fp32 (base-2 lse)."""
    sink = attn_sink if attn_sink is not None else lse  # (never read without HAS_SINK)
    mx = max_logits if max_logits is not None else lse
    block_r = 16
    _mla_combine_kernel[(num_splits.shape[0] - 1, h_kv, ceil_div(rows, block_r))](
        num_splits, sink, out, lse, mx, oacc, lacc,
        s_q, h_kv, g, rows,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        BLOCK_R=block_r, D_V=HEAD_DIM_V, SPARSE=sparse, HAS_SINK=attn_sink is not None,
        WRITE_MAX=max_logits is not None, INTERPRET=interpreter_enabled(), num_warps=4,
    )
