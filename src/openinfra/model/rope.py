"""Rotary position embedding with YaRN frequency interpolation.

Pairs are interleaved (channels 2i, 2i+1 rotate together), the layout DeepSeek-V3's checkpoints
use for the rope part of ``wq_b`` and ``wkv_a``. YaRN (Peng et al., 2023) keeps the fast-rotating
dimensions (more than ``beta_fast`` turns over the original context) unchanged, divides the slow ones
(fewer than ``beta_slow`` turns) by ``rope_factor``, and ramps linearly in between; the matching
attention-scale correction lives in :attr:`ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from openinfra.model.config import ModelConfig

__all__ = ["rope_frequencies", "rope_cos_sin", "apply_rope"]


def _correction_dim(turns: float, dim: int, base: float, original_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits ``turns`` times into the original context."""
    return dim * math.log(original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency per rotated pair: [qk_rope_head_dim // 2] float32 (radians per position)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.yarn:
        low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001  # a one-pair ramp still has to be a ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: extrapolate (unchanged), 0: interpolate (divided by the factor)
        freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables: [len(positions) or max_seq_len, qk_rope_head_dim // 2] float32."""
    freqs = rope_frequencies(cfg).to(device)
    if positions is None:
        positions = torch.arange(cfg.max_seq_len, device=device)
    angles = positions.to(device=device, dtype=torch.float32)[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x``.

    Args:
        x: [..., s, h, rope] (any float dtype); the rotation is computed in at least float32.
        cos, sin: [..., s, rope // 2] float32, broadcast over the head axis.

    Returns:
        Same shape and dtype as ``x``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (tests), bf16 goes up
    xf = x.to(compute).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.to(compute).unsqueeze(-2), sin.to(compute).unsqueeze(-2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
