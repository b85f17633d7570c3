"""FlashMLA's public entry points: argument checks, then the Triton kernels on Hopper or the reference.

Code written against FlashMLA ports by changing the import::

    from openinfra.kernels.flash_mla import get_mla_metadata, flash_mla_with_kvcache
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from openinfra.kernels.backend import use_triton
from openinfra.kernels.flash_mla.layout import FP8_BYTES_PER_TOKEN, HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE
from openinfra.kernels.flash_mla.metadata import TO_END, FlashMLASchedMeta, build_schedule, default_num_sm_parts
from openinfra.kernels.flash_mla.reference import (
    mla_decode_reference, mla_sparse_decode_reference, mla_sparse_prefill_reference,
)

__all__ = ["flash_mla_with_kvcache", "flash_mla_sparse_fwd"]

_Q_DTYPES = (torch.bfloat16, torch.float16)
_FP8_CACHE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


def _tensor(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x


def _int32(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (q's device), got {x.device}")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels need unit stride in the last dimension only; other strides are honoured.
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, q: torch.Tensor, is_fp8: bool, sparse: bool) -> None:
    _tensor("k_cache", k_cache, 4)
    if k_cache.device != q.device:
        raise ValueError(f"k_cache must be on {q.device} (q's device), got {k_cache.device}")
    if k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache must have unit stride in its last dimension, got strides {k_cache.stride()}")
    nb, page, h_kv, width = k_cache.shape
    if is_fp8:
        if k_cache.dtype not in _FP8_CACHE_DTYPES:
            raise ValueError(f"k_cache with is_fp8_kvcache=True must be uint8 or float8_e4m3fn bytes, got {k_cache.dtype}")
        if width != FP8_BYTES_PER_TOKEN:
            raise ValueError(f"k_cache with is_fp8_kvcache=True must hold {FP8_BYTES_PER_TOKEN} bytes per token, got {width}")
        if h_kv != 1:
            raise ValueError(f"k_cache with is_fp8_kvcache=True must have 1 KV head, got {h_kv}")
        if q.dtype != torch.bfloat16:
            raise ValueError(f"q must be bfloat16 with an FP8 cache, got {q.dtype}")
        if k_cache.stride(0) % 4 or k_cache.stride(1) % 4:
            raise ValueError(f"k_cache's block and token strides must be multiples of 4 bytes (fp32 scales), "
                             f"got {k_cache.stride()}")
    else:
        if k_cache.dtype != q.dtype:
            raise ValueError(f"k_cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
        if width != HEAD_DIM_QK:
            raise ValueError(f"k_cache's head dim must be {HEAD_DIM_QK}, got {width}")
    if not sparse and page != PAGE_BLOCK_SIZE:
        raise ValueError(f"k_cache's page_block_size must be {PAGE_BLOCK_SIZE} for dense decoding, got {page}")
    if page < 1 or nb < 1:
        raise ValueError(f"k_cache must hold at least one page of at least one token, got shape {tuple(k_cache.shape)}")
    h_q = q.shape[2]
    if h_q % h_kv:
        raise ValueError(f"num_heads_q ({h_q}) must be divisible by num_heads_k ({h_kv}) of k_cache")


def _check_table(block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int, page: int) -> None:
    # One host synchronisation: lengths within the table, used entries within the cache.
    b, max_blocks = block_table.shape
    lens = cache_seqlens.to(torch.int64)
    slots = torch.arange(max_blocks, device=block_table.device)
    used = slots[None, :] * page < lens[:, None]
    bad_entry = used & ((block_table < 0) | (block_table >= num_blocks))
    flags = torch.stack([(lens < 0).any(), (lens > max_blocks * page).any(), bad_entry.any()]).tolist()
    if flags[0]:
        raise ValueError("cache_seqlens must be >= 0")
    if flags[1]:
        raise ValueError(f"cache_seqlens exceeds block_table's capacity ({max_blocks} pages of {page} tokens)")
    if flags[2]:
        i, j = bad_entry.nonzero()[0].tolist()
        raise ValueError(f"block_table[{i}, {j}] = {int(block_table[i, j])} is out of range for k_cache's "
                         f"{num_blocks} blocks")


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _resolve_schedule(
    sched: object, num_splits: object, n_req: int, lengths_of: Callable[[], torch.Tensor], device: torch.device,
    rows_per_kv: int, h_kv: int, config: FlashMLASchedMeta.Config,
) -> tuple[torch.Tensor, torch.Tensor]:
    # lengths_of() builds the per-request lengths: called only when a schedule is built here
    if isinstance(sched, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta")
        if not sched.have_initialized:
            parts = default_num_sm_parts(device, h_kv, rows_per_kv)
            sched.tile_scheduler_metadata, sched.num_splits = build_schedule(lengths_of(), parts)
            sched.config = config
            sched.have_initialized = True
        elif sched.config != config:
            diff = [f.name for f in config.__dataclass_fields__.values()
                    if getattr(sched.config, f.name) != getattr(config, f.name)]
            raise ValueError(f"tile_scheduler_metadata was built for other inputs (differs in {', '.join(diff)}); "
                             "use a new get_mla_metadata() per shape")
        return sched.tile_scheduler_metadata, sched.num_splits
    if sched is None:
        parts = default_num_sm_parts(device, h_kv, rows_per_kv)
        return build_schedule(lengths_of(), parts)
    if not isinstance(sched, torch.Tensor) or sched.dim() != 2 or sched.shape[1] != 8 or sched.dtype != torch.int32:
        raise ValueError("tile_scheduler_metadata must be a FlashMLASchedMeta, or the [num_sm_parts, 8] int32 "
                         f"tensor of get_mla_metadata, got {type(sched).__name__} {tuple(getattr(sched, 'shape', ()))}")
    if (not isinstance(num_splits, torch.Tensor) or num_splits.dim() != 1 or num_splits.dtype != torch.int32
            or num_splits.shape[0] != n_req + 1):
        raise ValueError(f"num_splits must be the [{n_req + 1}] int32 tensor get_mla_metadata returned with "
                         f"tile_scheduler_metadata, got {type(num_splits).__name__} {tuple(getattr(num_splits, 'shape', ()))}")
    if sched.device != device or num_splits.device != device:
        raise ValueError(f"tile_scheduler_metadata and num_splits must be on {device}")
    return sched, num_splits


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: Union[FlashMLASchedMeta, torch.Tensor, None],
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    *,
    validate_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decoding attention (FlashMLA's ``flash_mla_with_kvcache``).

    Args:
        q: [b, s_q, h_q, 576] bf16 or fp16 (any strides).
        k_cache: dense [num_blocks, 64, h_kv, 576] in q's dtype; with ``is_fp8_kvcache``
            [num_blocks, page_block_size, 1, 656] bytes (see :func:`quantize_kv_cache_fp8`).
            Any block stride.
        block_table: [b, max_blocks] int32 (dense; may be None for sparse decoding).
        cache_seqlens: [b] int32, 0 allowed (dense; may be None for sparse decoding).
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` (either call style);
            ``None`` builds the schedule for this call only.
        softmax_scale: default ``576 ** -0.5``.
        causal: with s_q > 1, query i sees keys [0, s_k - s_q + i] (dense only).
        indices: sparse decoding: [b, s_q, topk] int32 physical token indices
            ``page * page_block_size + offset``; -1 (or any index outside the cache) is skipped.
        attn_sink: [h_q] fp32 (sparse only): output scaled by exp(lse) / (exp(lse) + exp(sink)).
        topk_length: [b] int32 (sparse only): request i uses its first topk_length[i] indices.
        validate_indices: check block-table entries and lengths against the cache (one host
            synchronisation; skipped while a CUDA graph is being captured).

    Returns:
        out [b, s_q, h_q, 512] in q's dtype; softmax_lse [b, h_q, s_q] fp32, natural log.
        Rows that see no key get out 0 and lse +inf.
    """
    _tensor("q", q, 4)
    if q.dtype not in _Q_DTYPES:
        raise ValueError(f"q must be bfloat16 or float16, got {q.dtype}")
    b, s_q, h_q, d = q.shape
    if d != HEAD_DIM_QK:
        raise ValueError(f"q's head dim must be {HEAD_DIM_QK}, got {d}")
    if b < 1 or s_q < 1 or h_q < 1:
        raise ValueError(f"q must have b, s_q, h_q >= 1, got shape {tuple(q.shape)}")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    sparse = indices is not None
    _check_cache(k_cache, q, is_fp8_kvcache, sparse)
    nb, page, h_kv, _ = k_cache.shape
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    softmax_scale = float(softmax_scale)
    dev = q.device

    if sparse:
        if causal:
            raise ValueError("causal must be False with indices (sparse decoding)")
        _tensor("indices", indices, 3)
        _int32("indices", indices, dev)
        if tuple(indices.shape[:2]) != (b, s_q) or indices.shape[2] < 1:
            raise ValueError(f"indices must be [b={b}, s_q={s_q}, topk>=1], got {tuple(indices.shape)}")
        topk = indices.shape[2]
        if topk_length is not None:
            _tensor("topk_length", topk_length, 1)
            _int32("topk_length", topk_length, dev)
            if topk_length.shape[0] != b:
                raise ValueError(f"topk_length must be [b={b}], got {tuple(topk_length.shape)}")
        if attn_sink is not None:
            _tensor("attn_sink", attn_sink, 1)
            if attn_sink.dtype != torch.float32 or attn_sink.shape[0] != h_q or attn_sink.device != dev:
                raise ValueError(f"attn_sink must be [h_q={h_q}] float32 on {dev}, got {tuple(attn_sink.shape)} "
                                 f"{attn_sink.dtype} on {attn_sink.device}")
    else:
        if attn_sink is not None or topk_length is not None:
            raise ValueError("attn_sink and topk_length apply to sparse decoding only (pass indices)")
        if block_table is None or cache_seqlens is None:
            raise ValueError("block_table and cache_seqlens are required for dense decoding")
        _tensor("block_table", block_table, 2)
        _int32("block_table", block_table, dev)
        _tensor("cache_seqlens", cache_seqlens, 1)
        _int32("cache_seqlens", cache_seqlens, dev)
        if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
            raise ValueError(f"block_table [{block_table.shape[0]}, ...] and cache_seqlens [{cache_seqlens.shape[0]}] "
                             f"must have q's batch size {b}")
        if validate_indices and not _capturing(block_table):
            _check_table(block_table, cache_seqlens, nb, page)
        topk = None

    if not use_triton(q):
        if sparse:
            return mla_sparse_decode_reference(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache,
                                               topk_length, attn_sink)
        return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                    is_fp8_kvcache)

    from openinfra.kernels.flash_mla.kernel import mla_attention_triton

    if sparse:
        # the top-k lengths of the b * s_q query tokens (built only where they are used: the Hopper
        # path takes the packed counts instead, so a call with a schedule launches nothing for them)
        def lengths_of() -> torch.Tensor:
            per = (topk_length.clamp(0, topk) if topk_length is not None
                   else torch.full((b,), topk, dtype=torch.int32, device=dev))
            return per.repeat_interleave(s_q).to(torch.int32)
        n_req, rows_per_kv = b * s_q, h_q
    else:
        def lengths_of() -> torch.Tensor:
            return cache_seqlens
        n_req, rows_per_kv = b, s_q * h_q // h_kv
    config = FlashMLASchedMeta.Config(b, s_q, h_q, page, h_kv, bool(causal), bool(is_fp8_kvcache), topk)
    meta, splits = _resolve_schedule(tile_scheduler_metadata, num_splits, n_req, lengths_of, dev, rows_per_kv, h_kv,
                                     config)
    q = _unit_last_stride(q)
    if sparse:
        indices = _unit_last_stride(indices)
        from openinfra.kernels.flash_mla.sparse_gather import sparse_decode_hopper, uses_hopper_sparse_decode

        if uses_hopper_sparse_decode(q, h_kv, topk):
            # Hopper: the top-k keys through the dense kernel's warpgroups (fused, or gather-then-dense)
            return sparse_decode_hopper(q, k_cache, indices, meta, splits, softmax_scale, is_fp8=is_fp8_kvcache,
                                        topk_length=topk_length, attn_sink=attn_sink)
    out = torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=dev)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=dev)
    mla_attention_triton(
        q, k_cache, lengths_of(), meta, splits, softmax_scale, out=out, lse=lse, block_table=block_table,
        indices=indices, n_tokens=nb * page, causal=causal, is_fp8=is_fp8_kvcache, attn_sink=attn_sink,
    )
    return out, lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill (FlashMLA's ``flash_mla_sparse_fwd``): each query token attends to its top-k keys.

    Args:
        q: [s_q, h_q, 576] bf16; kv: [s_kv, 1, 576] bf16 (any strides with a unit last one);
        indices: [s_q, 1, topk] int32 into kv's first dimension; -1, negative or >= s_kv is skipped.
        sm_scale: softmax scale. d_v: must be 512.
        attn_sink: [h_q] fp32: output scaled by exp(lse) / (exp(lse) + exp(sink)); +inf zeroes it.
        topk_length: [s_q] int32: token i uses only its first topk_length[i] indices.

    Returns:
        out [s_q, h_q, 512] bf16; max_logits [s_q, h_q] fp32 (-inf for a token with no valid index);
        lse [s_q, h_q] fp32, natural log of the scaled logits' sum (+inf for such a token).
    """
    _tensor("q", q, 3)
    _tensor("kv", kv, 3)
    _tensor("indices", indices, 3)
    if q.dtype != torch.bfloat16:
        raise ValueError(f"q must be bfloat16, got {q.dtype}")
    if kv.dtype != torch.bfloat16:
        raise ValueError(f"kv must be bfloat16, got {kv.dtype}")
    s_q, h_q, d = q.shape
    s_kv, h_kv, d_kv = kv.shape
    if d != HEAD_DIM_QK or d_kv != HEAD_DIM_QK:
        raise ValueError(f"q's and kv's head dim must be {HEAD_DIM_QK}, got {d} and {d_kv}")
    if d_v != HEAD_DIM_V:
        raise ValueError(f"d_v must be {HEAD_DIM_V}, got {d_v}")
    if h_kv != 1:
        raise ValueError(f"kv must have 1 KV head, got {h_kv}")
    if s_q < 1 or h_q < 1 or s_kv < 1:
        raise ValueError(f"q and kv must be non-empty, got {tuple(q.shape)} and {tuple(kv.shape)}")
    dev = q.device
    if kv.device != dev:
        raise ValueError(f"kv must be on {dev} (q's device), got {kv.device}")
    _int32("indices", indices, dev)
    if indices.shape[0] != s_q or indices.shape[1] != h_kv or indices.shape[2] < 1:
        raise ValueError(f"indices must be [s_q={s_q}, h_kv={h_kv}, topk>=1], got {tuple(indices.shape)}")
    topk = indices.shape[2]
    if topk_length is not None:
        _tensor("topk_length", topk_length, 1)
        _int32("topk_length", topk_length, dev)
        if topk_length.shape[0] != s_q:
            raise ValueError(f"topk_length must be [s_q={s_q}], got {tuple(topk_length.shape)}")
    if attn_sink is not None:
        _tensor("attn_sink", attn_sink, 1)
        if attn_sink.dtype != torch.float32 or attn_sink.shape[0] != h_q or attn_sink.device != dev:
            raise ValueError(f"attn_sink must be [h_q={h_q}] float32 on {dev}, got {tuple(attn_sink.shape)} "
                             f"{attn_sink.dtype} on {attn_sink.device}")
    sm_scale = float(sm_scale)
    if not use_triton(q):
        return mla_sparse_prefill_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)

    from openinfra.kernels.flash_mla.kernel import mla_attention_triton

    q = _unit_last_stride(q)
    kv = _unit_last_stride(kv)
    indices = _unit_last_stride(indices)
    lengths = (topk_length.clamp(0, topk) if topk_length is not None
               else torch.full((s_q,), topk, dtype=torch.int32, device=dev)).to(torch.int32)
    # No splitting (plenty of parallelism in prefill), so max_logits never needs merging.
    # one piece per query token with at least one index; tokens without any are written by the
    # combine kernel (output 0, lse +inf, max_logits -inf)
    has = lengths > 0
    meta = torch.zeros(s_q, 8, dtype=torch.int32, device=dev)
    meta[:, 0] = torch.where(has, torch.arange(s_q, dtype=torch.int32, device=dev), -1)
    meta[:, 2] = TO_END
    splits = torch.zeros(s_q + 1, dtype=torch.int32, device=dev)
    splits[1:] = torch.cumsum(has.to(torch.int32), 0)
    out = torch.empty(s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=dev)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=dev)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=dev)
    kv4 = kv.as_strided((s_kv, 1, 1, d), (kv.stride(0), kv.stride(0), kv.stride(1), 1))
    mla_attention_triton(
        q.unsqueeze(1), kv4, lengths, meta, splits, sm_scale, out=out.unsqueeze(1), lse=lse.unsqueeze(2),
        indices=indices, n_tokens=s_kv, attn_sink=attn_sink, max_logits=max_logits.unsqueeze(2),
    )
    return out, max_logits, lse
