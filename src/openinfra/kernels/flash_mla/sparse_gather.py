"""Sparse decoding on Hopper: the top-k tokens of each query token decoded by the dense kernel's
warpgroups, either fused (default) or as gather-then-dense.

Why not the sparse Triton kernel: every query token has its own top-k keys, so a kernel cannot
stream pages through TMA and, reading the FP8 cache, has to dequantize in the registers of the
warps doing the matrix work (75 TFLOPS at DeepSeek-V3.2's shape). Both Hopper paths first pack each
query token's valid indices to the front of its row (:func:`pack_valid_indices`; softmax does not
care about key order, so invalid ones, ``-1``, out of range or past ``topk_length``, are simply not
there), then:

- **fused** (:mod:`.gluon_sparse`): a producer warpgroup gathers and dequantizes each 64-token tile
  straight into the K stages of the warp-specialized decode kernel; no workspace.
- **gather-then-dense** (``OPENINFRA_MLA_SPARSE_FUSED=0``): :func:`gather_tokens` writes the tokens,
  dequantized, into a dense bf16 workspace of 64-token pages (656 bytes read + 1,152 written a
  token), which the dense kernel (:mod:`.gluon_kernel`) then reads as an ordinary paged cache.
  Workspace ``b * s_q * ceil(topk / 64) * 64 * 1152`` bytes (604 MB at b = 128, s_q = 2,
  topk = 2048); above WORKSPACE_LIMIT (4 GiB) the Triton sparse kernel runs instead.

Same results as :func:`.reference.mla_sparse_decode_reference` within the kernel tolerances (the
two paths agree bit for bit: the same dequantized bf16 keys, the same math warpgroups); the
attention sink rescales the output afterwards (``out * sigmoid(lse - sink)``, lse without the
sink, as FlashMLA).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from openinfra.kernels.flash_mla.layout import (
    FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE,
    ceil_div,
)

__all__ = ["pack_valid_indices", "gather_tokens", "sparse_decode_hopper", "uses_hopper_sparse_decode",
           "fused_sparse_enabled", "workspace_bytes", "WORKSPACE_LIMIT"]

#: Largest workspace the gathered path allocates (bytes); bigger calls run the Triton sparse kernel.
WORKSPACE_LIMIT = 4 << 30


def fused_sparse_enabled() -> bool:
    """Whether the Hopper sparse path runs the fused kernel (:mod:`.gluon_sparse`: the gathering
    producer feeds the dense kernel's math warpgroups) rather than gather-then-dense;
    OPENINFRA_MLA_SPARSE_FUSED=0 keeps gather-then-dense (for A/B timing)."""
    return os.environ.get("OPENINFRA_MLA_SPARSE_FUSED", "1") != "0"


def workspace_bytes(b: int, s_q: int, topk: int) -> int:
    """Bytes of the gathered bf16 workspace for ``b`` x ``s_q`` query tokens of ``topk`` keys."""
    return b * s_q * ceil_div(max(topk, 1), PAGE_BLOCK_SIZE) * PAGE_BLOCK_SIZE * HEAD_DIM_QK * 2


def uses_hopper_sparse_decode(q: torch.Tensor, h_kv: int, topk: int) -> bool:
    """Whether sparse decoding takes a Hopper path (Hopper, bf16 queries, h_kv = 1, at least the
    dense kernel's MIN_ROWS heads; not under the interpreter; OPENINFRA_MLA_GLUON=0 keeps the
    Triton sparse kernel); gather-then-dense also needs its workspace within :data:`WORKSPACE_LIMIT`."""
    from openinfra.kernels.flash_mla.gluon_kernel import MIN_ROWS
    from openinfra.kernels.flash_mla.kernel import gluon_decode_enabled

    if not gluon_decode_enabled() or not q.is_cuda:
        return False
    return (torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype == torch.bfloat16 and h_kv == 1
            and q.shape[2] >= MIN_ROWS and q.stride(-1) == 1
            and (fused_sparse_enabled() or workspace_bytes(q.shape[0], q.shape[1], topk) <= WORKSPACE_LIMIT))


@triton.jit
def _pack_kernel(idx_ptr, limit_ptr, packed_ptr, count_ptr, topk, n_tokens, s_q, stride_idx, stride_packed,
                 HAS_LIMIT: tl.constexpr, CHUNK: tl.constexpr):
    # one program per query token: its valid indices, in order, to the front of its packed row
    r = tl.program_id(0)
    limit = topk
    if HAS_LIMIT:
        limit = tl.minimum(tl.load(limit_ptr + r // s_q), topk)
    base = 0
    for start in range(0, topk, CHUNK):
        j = start + tl.arange(0, CHUNK)
        t = tl.load(idx_ptr + r.to(tl.int64) * stride_idx + j, mask=j < topk, other=-1)
        valid = (j < limit) & (t >= 0) & (t < n_tokens)
        rank = base + tl.cumsum(valid.to(tl.int32), axis=0) - 1
        tl.store(packed_ptr + r.to(tl.int64) * stride_packed + rank, t, mask=valid)
        base += tl.sum(valid.to(tl.int32), axis=0)
    tl.store(count_ptr + r, base)


def pack_valid_indices(indices: torch.Tensor, n_tokens: int,
                       topk_length: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices`` [b, s_q, topk] int32 -> (packed [b * s_q, topk] int32 with each row's valid
    indices first, in their order, the rest unspecified; counts [b * s_q] int32). Valid:
    0 <= index < n_tokens and, with ``topk_length`` [b], position < topk_length[request]."""
    b, s_q, topk = indices.shape
    idx = indices.reshape(b * s_q, topk)
    packed = torch.empty(b * s_q, topk, dtype=torch.int32, device=idx.device)
    counts = torch.empty(b * s_q, dtype=torch.int32, device=idx.device)
    if b * s_q:
        limit = topk_length if topk_length is not None else counts
        _pack_kernel[(b * s_q, )](idx, limit, packed, counts, topk, n_tokens, s_q, idx.stride(0), packed.stride(0),
                                  HAS_LIMIT=topk_length is not None, CHUNK=min(1024, triton.next_power_of_2(topk)),
                                  num_warps=4)
    return packed, counts


@triton.jit
def _gather_kernel(cache_ptr, idx_ptr, count_ptr, out_ptr, page, stride_block, stride_page, stride_idx, topk_pad,
                   IS_FP8: tl.constexpr, BLOCK_T: tl.constexpr, SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr,
                   TILE: tl.constexpr, D_V: tl.constexpr, D_QK: tl.constexpr):
    # one program: BLOCK_T slots of one query token's row of the workspace
    r = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    count = tl.load(count_ptr + r)
    ok = j < count  # slots past the count stay as they are: the decode kernel zeroes and masks them
    tok = tl.load(idx_ptr + r.to(tl.int64) * stride_idx + j, mask=ok, other=0).to(tl.int64)
    src = cache_ptr + (tok // page) * stride_block + (tok % page) * stride_page  # [BLOCK_T] token rows
    dst = out_ptr + (r.to(tl.int64) * topk_pad + j) * D_QK  # [BLOCK_T] bf16 rows
    if IS_FP8:
        # bytes [0, 512): e4m3 latents, 4 tiles of 128 with an fp32 scale each at SCALE_OFF; bf16 rope at ROPE_OFF
        t = tl.arange(0, D_V // TILE)
        c = (t * TILE)[:, None] + tl.arange(0, TILE)[None, :]  # [4, 128]
        m3 = ok[:, None, None]
        x = tl.load(src[:, None, None] + c[None, :, :], mask=m3, other=0)
        x = x.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale_ptr = (src + SCALE_OFF).to(tl.pointer_type(tl.float32))
        scale = tl.load(scale_ptr[:, None] + t[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, 4]
        tl.store(dst[:, None, None] + c[None, :, :], (x * scale[:, :, None]).to(tl.bfloat16), mask=m3)
        e = tl.arange(0, D_QK - D_V)
        rope_ptr = (src + ROPE_OFF).to(tl.pointer_type(tl.bfloat16))
        rope = tl.load(rope_ptr[:, None] + e[None, :], mask=ok[:, None], other=0.0)
        tl.store(dst[:, None] + D_V + e[None, :], rope, mask=ok[:, None])
    else:  # a 16-bit cache: copy the 576 values
        c = tl.arange(0, D_V)
        x = tl.load(src[:, None] + c[None, :], mask=ok[:, None], other=0.0)
        tl.store(dst[:, None] + c[None, :], x.to(tl.bfloat16), mask=ok[:, None])
        e = tl.arange(0, D_QK - D_V)
        x = tl.load(src[:, None] + D_V + e[None, :], mask=ok[:, None], other=0.0)
        tl.store(dst[:, None] + D_V + e[None, :], x.to(tl.bfloat16), mask=ok[:, None])


def gather_tokens(k_cache: torch.Tensor, packed: torch.Tensor, counts: torch.Tensor, is_fp8: bool, *,
                  block_t: int = 16, num_warps: int = 4) -> torch.Tensor:
    """The workspace [R * topk_pad / 64, 64, 1, 576] bf16 (pages of 64 tokens, R = packed rows): row
    r's first counts[r] tokens are cache tokens packed[r, :counts[r]] (dequantized from the FP8
    layout when ``is_fp8``); ``k_cache`` [num_blocks, page, 1, 656 bytes or 576 16-bit], any block
    and page strides."""
    rows, topk = packed.shape
    topk_pad = ceil_div(max(topk, 1), PAGE_BLOCK_SIZE) * PAGE_BLOCK_SIZE
    out = torch.empty(rows * topk_pad // PAGE_BLOCK_SIZE, PAGE_BLOCK_SIZE, 1, HEAD_DIM_QK, dtype=torch.bfloat16,
                      device=k_cache.device)
    if rows == 0:
        return out
    cache = k_cache.view(torch.uint8) if is_fp8 else k_cache
    _gather_kernel[(rows, ceil_div(topk, block_t))](
        cache, packed, counts, out, k_cache.shape[1], cache.stride(0), cache.stride(1), packed.stride(0), topk_pad,
        IS_FP8=is_fp8, BLOCK_T=block_t, SCALE_OFF=FP8_SCALE_OFFSET, ROPE_OFF=FP8_ROPE_OFFSET, TILE=FP8_TILE,
        D_V=HEAD_DIM_V, D_QK=HEAD_DIM_QK, num_warps=num_warps)
    return out


def sparse_decode_hopper(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor, meta: torch.Tensor,
                         splits: torch.Tensor, softmax_scale: float, *, is_fp8: bool,
                         topk_length: torch.Tensor | None, attn_sink: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decoding through the dense kernel's warpgroups (fused, or gather-then-dense with
    OPENINFRA_MLA_SPARSE_FUSED=0 or off the GPU). q [b, s_q, h_q, 576] 16-bit; indices [b, s_q, topk]
    int32; meta / splits: the schedule :func:`.api.flash_mla_with_kvcache` built for the b * s_q
    top-k rows (the dense layout's schedule: b * s_q requests of h_q rows, 64-token blocks). Returns
    out [b, s_q, h_q, 512] in q's dtype and lse [b, h_q, s_q] fp32 (+inf for a query token with no
    valid index, whose output is 0)."""
    from openinfra.kernels.flash_mla.kernel import mla_attention_triton

    b, s_q, h_q, d = q.shape
    n_tokens = k_cache.shape[0] * k_cache.shape[1]
    packed, counts = pack_valid_indices(indices, n_tokens, topk_length)
    rows = b * s_q
    out = torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=q.device)
    lse_rows = torch.empty(rows, h_q, 1, dtype=torch.float32, device=q.device)
    if fused_sparse_enabled() and q.is_cuda and rows:
        from openinfra.kernels.flash_mla.gluon_sparse import mla_sparse_decode_fused

        mla_sparse_decode_fused(q.reshape(rows, h_q, d), k_cache, packed, counts, meta, splits, softmax_scale,
                                is_fp8=is_fp8, out=out.view(rows, h_q, HEAD_DIM_V), lse=lse_rows.view(rows, h_q))
    else:
        work = gather_tokens(k_cache, packed, counts, is_fp8)
        pages = work.shape[0] // max(rows, 1)
        table = torch.arange(rows * pages, dtype=torch.int32, device=q.device).view(rows, pages)
        mla_attention_triton(q.reshape(rows, 1, h_q, d), work, counts, meta, splits, softmax_scale,
                             out=out.view(rows, 1, h_q, HEAD_DIM_V), lse=lse_rows, block_table=table)
    if attn_sink is not None:
        # the sink only adds e^sink to the softmax denominator: out * e^lse / (e^lse + e^sink)
        lse3 = lse_rows.view(b, s_q, h_q)
        # (a query token with no valid key has lse = +inf and output 0: its factor is moot, but an
        # infinite sink would make it NaN)
        factor = torch.where(torch.isposinf(lse3), 1.0, torch.sigmoid(lse3 - attn_sink.view(1, 1, h_q)))
        out.copy_(out.float() * factor[..., None])
    lse = lse_rows.view(b, s_q, h_q).transpose(1, 2).contiguous()
    return out, lse
