"""Multi-head latent attention (MLA): the training/prefill path and the absorbed decode path.

Shapes: b batch, s new tokens, h heads, L cached tokens; nope/rope/v per-head widths; c =
kv_lora_rank. The KV path compresses each token to ``[c_kv (c) | k_rope (rope)]``, the row that is
cached. Prefill expands the latent back to per-head keys and values with ``wkv_b``. Decode never
expands it: ``wkv_b``'s key half ``W_UK [h, nope, c]`` is folded into the query
(``q_nope @ W_UK`` -> [b, s, h, c]) and its value half ``W_UV [h, v, c]`` into the output, so
attention runs directly over the cached latent rows in "MQA mode" (one shared 576-wide key per
token at V3 size, the value being its first c columns) - the layout flash_mla consumes.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from openinfra.model.config import ModelConfig
from openinfra.model.kv_cache import CacheBatch
from openinfra.model.layers import Linear, RMSNorm
from openinfra.model.rope import apply_rope

__all__ = ["MLA", "paged_latent_attention", "flash_mla_usable"]

DecodeBackend = Literal["auto", "flash_mla", "reference"]


def _flash_mla():
    try:
        mod = importlib.import_module("openinfra.kernels.flash_mla")
    except ImportError:
        return None
    return mod if hasattr(mod, "flash_mla_with_kvcache") and hasattr(mod, "get_mla_metadata") else None


def _is_fp8_cache(k_cache: torch.Tensor) -> bool:
    return k_cache.dtype in (torch.float8_e4m3fn, torch.uint8) and k_cache.shape[-1] == 656


def flash_mla_usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``openinfra.kernels.flash_mla`` exists and takes this problem: bf16/fp16 queries, 64-token
    pages, 576-wide rows in q's dtype or FlashMLA's 656-byte FP8 rows (with bf16 queries). Checked per
    call, the kernel being optional."""
    if _flash_mla() is None or q.shape[-1] != 576 or k_cache.shape[1] != 64:
        return False
    if _is_fp8_cache(k_cache):
        return q.dtype == torch.bfloat16
    return q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype and k_cache.shape[-1] == 576


def _reference_attention(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                         seqlens: torch.Tensor, head_dim_v: int, scale: float) -> torch.Tensor:
    """Causal MQA over gathered pages, in (at least) float32. Query i of s attends keys [0, seqlen - s + i].
    An FP8 cache (656-byte rows) is dequantized row by row as it is gathered."""
    b, s, h, d = q.shape
    page = k_cache.shape[1]
    length = int(seqlens.max())
    pos = torch.arange(length, device=q.device)
    compute = torch.promote_types(q.dtype, torch.float32)
    rows = k_cache[block_table.long()[:, pos // page], (pos % page)[None, :], 0]
    if _is_fp8_cache(k_cache):
        fm = _flash_mla()
        if fm is None:
            raise RuntimeError("reading an FP8 KV cache needs openinfra.kernels.flash_mla")
        rows = fm.dequantize_kv_cache_fp8(rows)
    rows = rows.to(compute)  # [b, L, d]
    valid = pos[None, :] < seqlens[:, None]                                            # [b, L]
    rows = torch.where(valid[..., None], rows, 0.0)  # pages past a request's length may hold anything
    scores = torch.einsum("bshd,btd->bsht", q.to(compute), rows) * scale
    last = seqlens[:, None] - s + torch.arange(s, device=q.device)[None, :]            # [b, s]
    visible = pos[None, None, :] <= last[..., None]                                     # [b, s, L]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bsht,btc->bshc", probs, rows[..., :head_dim_v]).to(q.dtype)


def paged_latent_attention(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           seqlens: torch.Tensor, head_dim_v: int, scale: float,
                           backend: DecodeBackend = "auto", metadata: dict | None = None) -> tuple[torch.Tensor, str]:
    """Attention of absorbed queries over the paged latent cache.

    Args:
        q: [b, s, h, c + rope] absorbed queries.
        k_cache: [num_blocks, page_size, 1, c + rope] one layer's pages (or [..., 656] FP8 bytes).
        block_table: [b, max_blocks] int32; seqlens: [b] int32, tokens cached *including* the s new ones.
        head_dim_v: c (the value is the first c columns of each row).
        backend: ``auto`` (flash_mla when usable, else the reference), ``flash_mla`` or ``reference``.
        metadata: a dict the flash_mla schedule is cached in across layers of one step.

    Returns:
        ``(out [b, s, h, c], backend_used)``.
    """
    if backend not in ("auto", "flash_mla", "reference"):
        raise ValueError(f"backend must be 'auto', 'flash_mla' or 'reference', got {backend!r}")
    use_flash = backend == "flash_mla" or (backend == "auto" and flash_mla_usable(q, k_cache))
    if not use_flash:
        return _reference_attention(q, k_cache, block_table, seqlens, head_dim_v, scale), "reference"
    fm = _flash_mla()
    if fm is None:
        raise RuntimeError("backend='flash_mla' but openinfra.kernels.flash_mla is not available")
    seqlens = seqlens.to(torch.int32)
    md = metadata if metadata is not None else {}
    if "schedule" not in md:  # once per decode step; every layer reuses it
        md["schedule"] = fm.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
    tile_md, num_splits = md["schedule"]
    out, _lse = fm.flash_mla_with_kvcache(q, k_cache, block_table.to(torch.int32), seqlens, head_dim_v,
                                          tile_md, num_splits, softmax_scale=scale, causal=True,
                                          is_fp8_kvcache=_is_fp8_cache(k_cache))
    return out, "flash_mla"


class MLA(nn.Module):
    """DeepSeek-V3's attention block (parameter names match DeepSeek-V3's inference code)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.nope, self.rope, self.v_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        fp8 = cfg.gemm == "fp8"
        if cfg.q_lora_rank > 0:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, fp8)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, fp8)
        else:
            self.wq = Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, fp8)
        self.wkv_a = Linear(cfg.dim, cfg.latent_dim, fp8)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), fp8)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, fp8)
        self.softmax_scale = cfg.softmax_scale
        self.decode_backend: DecodeBackend = "auto"
        self.last_decode_backend: str | None = None  # which path the last absorbed call took

    # --- projections -----------------------------------------------------------------------------

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.q_lora_rank > 0 else self.wq(x)
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
        return self.kv_norm(latent), k_pe

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (nope part) and values from latents: [..., c] -> [..., h, nope], [..., h, v]."""
        kv = self.wkv_b(latent).unflatten(-1, (self.n_heads, self.nope + self.v_dim))
        return kv.split([self.nope, self.v_dim], dim=-1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` [h, nope, c] and ``W_UV`` [h, v, c]: wkv_b split per head into its key and value halves."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheBatch | None = None,
                layer: int = 0, mode: Literal["prefill", "decode"] = "prefill") -> torch.Tensor:
        """Attention output [b, s, dim] for x [b, s, dim].

        Args:
            cos, sin: [b or 1, s, rope/2] rotary tables at the new tokens' positions.
            cache: None for training (causal over x alone). Otherwise the new tokens are written at
                positions ``cache.cache_seqlens[b] + i`` of layer ``layer`` and attend to everything cached.
            mode: with a cache, ``prefill`` expands cached latents to per-head K/V (cheap when s is
                large); ``decode`` uses weight absorption over the latent rows (flash_mla's layout).
        """
        b, s, _ = x.shape
        q_nope, q_pe = self._queries(x, cos, sin)
        latent, k_pe = self._latent(x, cos, sin)
        if cache is None:
            k_nope, v = self._expand(latent)
            k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(-1, -1, self.n_heads, -1)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=self.softmax_scale).transpose(1, 2)
            return self.wo(o.flatten(2))

        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
        if mode == "decode" and cache.new_lengths is not None:  # checked before anything is written
            raise ValueError("new_lengths (ragged prefill) works in prefill mode only")
        positions = cache.cache_seqlens.long()[:, None] + torch.arange(s, device=x.device)[None, :]
        if cache.new_lengths is None:
            valid, added = None, s
        else:  # ragged prefill: only the first new_lengths[i] tokens of request i are real
            added = torch.tensor(cache.new_lengths, dtype=torch.int32, device=x.device)
            valid = torch.arange(s, device=x.device)[None, :] < added[:, None]
        cache.cache.write(layer, cache.block_table, positions, latent, k_pe, valid)
        seqlens = cache.cache_seqlens.to(torch.int32) + added
        if mode == "decode":
            w_uk, w_uv = self.absorbed_weights()
            q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))
            q = torch.cat([q_abs, q_pe], dim=-1).to(cache.cache.dtype)
            o_lat, used = paged_latent_attention(q, cache.cache.k_cache(layer), cache.block_table, seqlens,
                                                 self.kv_lora_rank, self.softmax_scale, self.decode_backend,
                                                 cache.flash_metadata)
            self.last_decode_backend = used
            o = torch.einsum("bshc,hdc->bshd", o_lat.to(x.dtype), w_uv.to(x.dtype))
            return self.wo(o.flatten(2))
        length = int(seqlens.max())
        rows = cache.cache.gather(layer, cache.block_table, length).to(x.dtype)  # [b, L, c + rope]
        pos = torch.arange(length, device=x.device)
        rows = torch.where((pos[None, :] < seqlens[:, None])[..., None], rows, 0.0)  # never read foreign pages
        k_nope, v = self._expand(rows[..., : self.kv_lora_rank])
        k = torch.cat([k_nope, rows[..., None, self.kv_lora_rank:].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        visible = pos[None, None, :] <= positions[..., None]          # [b, s, L]: causal within each request
        if valid is not None:  # padding queries see key 0 only (their outputs are discarded; no empty softmax)
            visible = visible & valid[..., None] | (pos[None, None, :] == 0)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=visible[:, None], scale=self.softmax_scale).transpose(1, 2)
        return self.wo(o.flatten(2))
