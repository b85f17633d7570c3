"""PyTorch references of the per-block and per-channel FP8 casts (CPU path and kernel oracle).

Same arithmetic as the per-token cast (``openinfra.kernels.deep_gemm.cast.reference``): fp32 amax
per group clamped at 1e-4, ``scale = amax / 448`` correctly rounded, optional rounding up to a
power of two, then ``x * (1 / scale)`` rounded to e4m3. Only the group shape differs:

- per block: one scale per 128 x 128 tile (weights, the B operand of the GEMMs);
- per channel: one scale per column per 128 rows (the K-grouped / weight-gradient operands, where
  K runs down the rows).
"""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.cast.reference import AMAX_FLOOR, ceil_to_ue8m0
from openinfra.kernels.deep_gemm.utils import FP8_E4M3_MAX, GROUP_SIZE, ceil_div

__all__ = ["per_block_cast_to_fp8_reference", "per_channel_cast_to_fp8_reference"]


def _scale(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    # Divide by a same-device tensor, not a Python float: on CUDA, PyTorch turns division by a
    # CPU scalar into multiplication by its reciprocal, which rounds differently from the kernels'
    # (and the CPU's) correctly rounded division.
    sf = amax / amax.new_full((), FP8_E4M3_MAX)
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    m, n = x.shape
    padded = torch.zeros(rows, cols, dtype=torch.float32, device=x.device)
    padded[:m, :n] = x.float()
    return padded


def per_block_cast_to_fp8_reference(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [m, n] -> (``y`` [m, n] e4m3, ``sf`` [ceil(m/128), ceil(n/128)] fp32), one scale per tile."""
    m, n = x.shape
    gm, gn = ceil_div(m, GROUP_SIZE), ceil_div(n, GROUP_SIZE)
    tiles = _pad(x, gm * GROUP_SIZE, gn * GROUP_SIZE).view(gm, GROUP_SIZE, gn, GROUP_SIZE)
    sf = _scale(tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR), use_ue8m0)
    y = (tiles * (1.0 / sf)[:, None, :, None]).to(torch.float8_e4m3fn)
    return y.view(gm * GROUP_SIZE, gn * GROUP_SIZE)[:m, :n].contiguous(), sf


def per_channel_cast_to_fp8_reference(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [m, n] -> (``y`` [m, n] e4m3, ``sf`` [ceil(m/128), n] fp32), one scale per column per 128 rows."""
    m, n = x.shape
    gm = ceil_div(m, GROUP_SIZE)
    groups = _pad(x, gm * GROUP_SIZE, n).view(gm, GROUP_SIZE, n)
    sf = _scale(groups.abs().amax(dim=1).clamp(min=AMAX_FLOOR), use_ue8m0)
    y = (groups * (1.0 / sf)[:, None, :]).to(torch.float8_e4m3fn)
    return y.view(gm * GROUP_SIZE, n)[:m].contiguous(), sf
