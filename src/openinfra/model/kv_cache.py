"""The paged MLA latent cache and the block bookkeeping a serving engine needs.

Layout (what ``flash_mla_with_kvcache`` consumes): per layer a tensor
``[num_blocks, page_size, 1, kv_lora_rank + qk_rope_head_dim]``; row ``t`` of a request lives in
physical block ``block_table[b, t // page_size]`` at offset ``t % page_size`` and holds
``[normalized latent c_kv | rotated k_rope]``. One page pool is shared by all requests; a
:class:`BlockAllocator` hands pages out and takes them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openinfra.model.config import ModelConfig

__all__ = ["BlockAllocator", "PagedMLACache", "CacheBatch", "KVCacheManager"]


class BlockAllocator:
    """A free list of physical page ids ``0 .. num_blocks - 1`` (lowest id first, deterministic)."""

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` page ids; raises RuntimeError (nothing taken) when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise RuntimeError(f"KV cache out of pages: asked for {n}, {len(self._free)} of {self.num_blocks} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        """Give pages back; a page that is not allocated raises ValueError (double free)."""
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not allocated (double free or foreign id)")
        for p in pages:
            self._used.remove(p)
            self._free.append(p)
        self._free.sort(reverse=True)


def _fp8_cache_module():
    try:
        from openinfra.kernels import flash_mla
    except ImportError as exc:
        raise RuntimeError(f"an FP8 KV cache needs openinfra.kernels.flash_mla ({exc})") from None
    if not hasattr(flash_mla, "quantize_kv_cache_fp8"):
        raise RuntimeError("an FP8 KV cache needs openinfra.kernels.flash_mla.quantize_kv_cache_fp8")
    return flash_mla


class PagedMLACache:
    """The page pool for every layer: ``k_cache(layer)`` is [num_blocks, page_size, 1, latent_dim].

    Args:
        cfg: the model config (gives layers, kv_lora_rank, qk_rope_head_dim).
        num_blocks: physical pages in the pool.
        page_size: tokens per page (64 is what the flash_mla kernel takes).
        dtype, device: storage (bf16 on GPU; the model's dtype on CPU).
        fp8: store FlashMLA's FP8 layout instead: 656 bytes per token (512 e4m3 latent values, four
            power-of-two fp32 scales, 64 bf16 rope values) against 1152 in bf16. Needs the V3 widths
            (kv_lora 512 + rope 64) and ``openinfra.kernels.flash_mla``; rows are quantized on write,
            ``dtype`` (bf16) is then the dtype rows are read back in.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, page_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", fp8: bool = False):
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.cfg, self.page_size, self.num_blocks, self.fp8 = cfg, page_size, num_blocks, fp8
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self._row_dtype = dtype
        width = cfg.latent_dim
        if fp8:
            if (cfg.kv_lora_rank, cfg.qk_rope_head_dim) != (512, 64):
                raise ValueError("fp8=True needs kv_lora_rank 512 and qk_rope_head_dim 64 (FlashMLA's FP8 layout), "
                                 f"got {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}")
            if dtype != torch.bfloat16:
                raise ValueError(f"fp8=True reads rows back as bfloat16; dtype must be torch.bfloat16, got {dtype}")
            self._fp8 = _fp8_cache_module()
            width = 656
            dtype = torch.float8_e4m3fn
        # One allocation for all layers keeps the pool contiguous and easy to ship (3FS KVCache).
        self.storage = torch.zeros(cfg.n_layers, num_blocks, page_size, 1, width, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are written and read in (bf16 for an FP8 cache; ``storage.dtype`` holds the bytes)."""
        return self._row_dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def k_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, page_size, 1, kv_lora_rank + rope] view of one layer's pages."""
        return self.storage[layer]

    def write(self, layer: int, block_table: torch.Tensor, positions: torch.Tensor,
              latent: torch.Tensor, k_rope: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store rows at token ``positions`` [b, s] of each request: latent [b, s, kv_lora], k_rope [b, s, rope];
        ``valid`` [b, s] bool keeps padding tokens (ragged prefill) out of the cache."""
        pages = torch.gather(block_table.long(), 1, (positions // self.page_size).clamp(max=block_table.shape[1] - 1))
        offsets = positions % self.page_size
        rows = torch.cat([latent, k_rope], dim=-1).to(self.dtype)
        if valid is not None:
            pages, offsets, rows = pages[valid], offsets[valid], rows[valid]
        if self.fp8:
            rows = self._fp8.quantize_kv_cache_fp8(rows)
        self.storage[layer, pages, offsets, 0] = rows

    def gather(self, layer: int, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """Rows 0..length-1 of each request, [b, length, latent_dim] in :attr:`dtype` (rows past a
        request's own length are whatever the page holds)."""
        pos = torch.arange(length, device=block_table.device)
        pages = block_table.long()[:, pos // self.page_size]
        rows = self.storage[layer][pages, (pos % self.page_size)[None, :], 0]
        return self._fp8.dequantize_kv_cache_fp8(rows) if self.fp8 else rows

    def bytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


@dataclass
class CacheBatch:
    """What one forward call needs to read/write the cache for a batch of requests.

    ``block_table`` [b, max_blocks] int32 (logical page -> physical page); ``cache_seqlens`` [b] int32:
    tokens already cached per request *before* this call (the new tokens go at those positions).
    """

    cache: PagedMLACache
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    flash_metadata: dict = field(default_factory=dict)  # per-step flash_mla schedule, shared by layers
    #: Per request, the tokens its reserved pages hold (host ints). When set, a forward that would
    #: write past it raises instead of writing into a padding page that another request owns.
    capacity: list[int] | None = None
    #: Per request, the tokens cached before this call (host ints), when the caller knows them.
    lengths: list[int] | None = None
    #: Ragged prefill: request i contributes only its first ``new_lengths[i]`` tokens of the call
    #: (the rest of its row is padding: not cached, not routed, its logits meaningless). None = all s.
    new_lengths: list[int] | None = None

    def __post_init__(self) -> None:
        if self.block_table.dim() != 2 or self.block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be [b, max_blocks] int32, got {tuple(self.block_table.shape)} {self.block_table.dtype}")
        if self.cache_seqlens.shape != (self.block_table.shape[0],):
            raise ValueError(f"cache_seqlens must be [b={self.block_table.shape[0]}], got {tuple(self.cache_seqlens.shape)}")


class KVCacheManager:
    """Per-request page lists over one :class:`PagedMLACache`: reserve, advance, free.

    Typical decode step for requests ``ids``: ``manager.reserve(i, 1)`` for each, ``batch =
    manager.batch(ids)``, ``model(tokens, cache=batch)``, ``manager.advance(ids, 1)``.
    """

    def __init__(self, cache: PagedMLACache):
        self.cache = cache
        self._pages: dict[object, list[int]] = {}
        self._lengths: dict[object, int] = {}

    def add(self, seq_id: object) -> None:
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._pages[seq_id], self._lengths[seq_id] = [], 0

    def length(self, seq_id: object) -> int:
        return self._lengths[self._check(seq_id)]

    def pages(self, seq_id: object) -> list[int]:
        return list(self._pages[self._check(seq_id)])

    def _check(self, seq_id: object) -> object:
        if seq_id not in self._pages:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq_id

    def reserve(self, seq_id: object, n_new: int) -> None:
        """Make room for ``n_new`` more tokens of ``seq_id`` (allocates pages as needed)."""
        self._check(seq_id)
        need = -(-(self._lengths[seq_id] + n_new) // self.cache.page_size) - len(self._pages[seq_id])
        if need > 0:
            self._pages[seq_id] += self.cache.allocator.allocate(need)

    def advance(self, seq_ids: list, n: int | list[int]) -> None:
        """Record that ``n`` tokens of each sequence were written (after the forward call)."""
        ns = n if isinstance(n, list) else [n] * len(seq_ids)
        for s, k in zip(seq_ids, ns):
            self._check(s)
            if self._lengths[s] + k > len(self._pages[s]) * self.cache.page_size:
                raise ValueError(f"sequence {s!r}: advancing past its reserved pages (call reserve first)")
            self._lengths[s] += k

    def free(self, seq_id: object) -> None:
        self.cache.allocator.free(self._pages.pop(self._check(seq_id)))
        del self._lengths[seq_id]

    def batch(self, seq_ids: list, pad_page: int = 0, new_lengths: list[int] | None = None) -> CacheBatch:
        """A :class:`CacheBatch` for ``seq_ids`` (unused block-table slots hold ``pad_page``);
        ``new_lengths`` for a ragged prefill (see :class:`CacheBatch`)."""
        if not seq_ids:
            raise ValueError("seq_ids must not be empty")
        width = max(1, max(len(self._pages[self._check(s)]) for s in seq_ids))
        table = torch.full((len(seq_ids), width), pad_page, dtype=torch.int32)
        for i, s in enumerate(seq_ids):
            table[i, : len(self._pages[s])] = torch.tensor(self._pages[s], dtype=torch.int32)
        lengths = [self._lengths[s] for s in seq_ids]
        lens = torch.tensor(lengths, dtype=torch.int32)
        dev = self.cache.device
        capacity = [len(self._pages[s]) * self.cache.page_size for s in seq_ids]
        return CacheBatch(self.cache, table.to(dev), lens.to(dev), capacity=capacity, lengths=lengths,
                          new_lengths=list(new_lengths) if new_lengths is not None else None)
