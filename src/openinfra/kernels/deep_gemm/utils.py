"""Small shared helpers of DeepGEMM's public surface: constants, alignment, the error metric."""

from __future__ import annotations

import torch

__all__ = [
    "ceil_div", "align", "FP8_E4M3_MAX", "GROUP_SIZE", "calc_diff",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
]

#: Largest finite float8_e4m3fn value; scales map each group's amax onto it.
FP8_E4M3_MAX = 448.0
#: Channels per scale group (1x128 for activations, 128x128 for weights).
GROUP_SIZE = 128


def ceil_div(x: int, y: int) -> int:
    """``ceil(x / y)`` for non-negative ints."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return ceil_div(x, y) * y


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows each expert's segment is padded to in the M-grouped contiguous layout (128).

    A tile of the grouped kernel never straddles two experts because every segment starts on a
    multiple of this; the padding rows carry ``m_indices == -1`` and are skipped.
    """
    return GROUP_SIZE


def get_mk_alignment_for_contiguous_layout() -> int:
    """Alias of :func:`get_m_alignment_for_contiguous_layout` (also the K alignment of the
    K-grouped layout: each group's K is a multiple of 128)."""
    return GROUP_SIZE


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's error metric ``1 - 2 sum(x*y) / sum(x*x + y*y)``, computed in float64.

    0 for identical tensors, about ``rel_err**2 / 2`` for small relative errors; the FP8 GEMMs
    are held to < 1e-3 against the fp32 product of the unquantized inputs. Two all-zero tensors
    give 0. NaN or inf anywhere gives NaN, which fails every ``<`` check.
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0 if torch.isfinite(x).all() and torch.isfinite(y).all() else float("nan")
    return float(1 - 2 * (x * y).sum() / denominator)


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_float_matrix(name: str, x: object) -> torch.Tensor:
    """The casts' input check: a 2-D bf16 / fp16 / fp32 tensor, else an error naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [m, n], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    return x
