"""The FP8 KV cache in FlashMLA's 656-byte-per-token layout: quantize bf16 latents, and dequantize.

Per token and per 128 values of c_kv: ``scale = 2^ceil(log2(max(amax / 448, 1e-4)))`` (a power of
two, so dequantization is exact), ``q = e4m3(x / scale)`` rounded to nearest even. The 64 rope
values stay bf16. See :mod:`openinfra.kernels.flash_mla.layout` for the byte map.
"""

from __future__ import annotations

import torch

from openinfra.kernels.flash_mla.layout import (
    FP8_BYTES_PER_TOKEN, FP8_NUM_TILES, FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, HEAD_DIM_QK, HEAD_DIM_V,
)

__all__ = ["quantize_kv_cache_fp8", "dequantize_kv_cache_fp8", "fp8_cache_bytes"]

_E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-4


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    # Exact: frexp gives x = m * 2^e with m in [0.5, 1); x is a power of two iff m == 0.5.
    m, e = torch.frexp(x)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(x), e)


def quantize_kv_cache_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Quantize a bf16 latent cache into the 656-byte FP8 layout.

    Args:
        kv: [..., 576] bfloat16 (typically [num_blocks, page_block_size, 1, 576]); any strides.

    Returns:
        [..., 656] ``torch.float8_e4m3fn`` (a byte container: view it as uint8 to read the scales
        and rope values), contiguous. Pass it to ``flash_mla_with_kvcache(..., is_fp8_kvcache=True)``.
    """
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype != torch.bfloat16:
        raise ValueError(f"kv must be bfloat16, got {kv.dtype}")
    if kv.dim() < 1 or kv.shape[-1] != HEAD_DIM_QK:
        raise ValueError(f"kv's last dimension must be {HEAD_DIM_QK}, got shape {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    x = kv.reshape(-1, HEAD_DIM_QK)
    out = torch.empty(x.shape[0], FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    nope = x[:, :HEAD_DIM_V].float().view(-1, FP8_NUM_TILES, FP8_TILE)
    scale = _pow2_ceil((nope.abs().amax(-1) / _E4M3_MAX).clamp(min=_AMAX_FLOOR))  # [t, 4]
    # x / scale is exact (a power of two), so the only rounding is the e4m3 cast itself.
    q = (nope / scale[..., None]).to(torch.float8_e4m3fn).view(-1, HEAD_DIM_V)
    out[:, :FP8_SCALE_OFFSET] = q.view(torch.uint8)
    out[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET] = scale.contiguous().view(torch.uint8).view(-1, 4 * FP8_NUM_TILES)
    out[:, FP8_ROPE_OFFSET:] = x[:, HEAD_DIM_V:].contiguous().view(torch.uint8)
    return out.view(torch.float8_e4m3fn).view(*lead, FP8_BYTES_PER_TOKEN)


def dequantize_kv_cache_fp8(cache: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_kv_cache_fp8`: [..., 656] uint8 / e4m3 bytes -> [..., 576] bf16.

    Exact up to the final bf16 rounding of ``e4m3 * power-of-two`` (which bf16 always holds).
    """
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"cache must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise ValueError(f"cache must be uint8 or float8_e4m3fn bytes, got {cache.dtype}")
    if cache.dim() < 1 or cache.shape[-1] != FP8_BYTES_PER_TOKEN:
        raise ValueError(f"cache's last dimension must be {FP8_BYTES_PER_TOKEN} bytes, got shape {tuple(cache.shape)}")
    lead = cache.shape[:-1]
    b = cache.reshape(-1, FP8_BYTES_PER_TOKEN).view(torch.uint8)
    nope = b[:, :FP8_SCALE_OFFSET].contiguous().view(torch.float8_e4m3fn).float().view(-1, FP8_NUM_TILES, FP8_TILE)
    scale = b[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].contiguous().view(torch.float32)  # [t, 4]
    rope = b[:, FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16)
    out = torch.empty(b.shape[0], HEAD_DIM_QK, dtype=torch.bfloat16, device=cache.device)
    out[:, :HEAD_DIM_V] = (nope * scale[..., None]).view(-1, HEAD_DIM_V)
    out[:, HEAD_DIM_V:] = rope
    return out.view(*lead, HEAD_DIM_QK)


def fp8_cache_bytes(num_tokens: int) -> int:
    """Bytes of an FP8 cache holding ``num_tokens`` tokens (656 per token)."""
    return num_tokens * FP8_BYTES_PER_TOKEN
