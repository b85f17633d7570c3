"""Scale-factor layouts: the MN-major, TMA-aligned form DeepGEMM's kernels read scales in.

A scale tensor ``sf`` of logical shape ``[mn, k_groups]`` (or ``[g, mn, k_groups]``) is stored
"MN-major" when consecutive rows (tokens) are adjacent in memory, so one K step reads a contiguous
vector of scales. TMA needs each such column to start on a 16-byte boundary, so ``mn`` is padded
to a multiple of 4 fp32 values. Our kernels take scales in any strides; this helper exists so code
written against DeepGEMM (which needs it) ports unchanged, and because the MN-major form is also
the fastest one for our kernels to read.
"""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.utils import align

__all__ = ["get_tma_aligned_size", "get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor"]

_TMA_ALIGNMENT_BYTES = 16


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """``x`` elements rounded up so that ``x * element_size`` is a multiple of 16 bytes."""
    if _TMA_ALIGNMENT_BYTES % element_size:
        raise ValueError(f"element_size must divide 16, got {element_size}")
    return align(x, _TMA_ALIGNMENT_BYTES // element_size)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Return ``sf`` with the same logical shape, stored MN-major with the MN dimension padded.

    Args:
        sf: [mn, k_groups] or [g, mn, k_groups] float32 scales, any strides.

    Returns:
        A tensor equal to ``sf`` of the same shape whose strides are ``(1, aligned_mn)`` (2-D) or
        ``(aligned_mn * k_groups, 1, aligned_mn)`` (3-D), ``aligned_mn = align(mn, 4)``. Returned
        as-is when it is already in that layout.
    """
    if not isinstance(sf, torch.Tensor):
        raise TypeError(f"sf must be a torch.Tensor, got {type(sf).__name__}")
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf must be 2-D [mn, k_groups] or 3-D [g, mn, k_groups], got shape {tuple(sf.shape)}")
    if sf.dtype != torch.float32:
        raise ValueError(f"sf must be float32, got {sf.dtype}")
    squeeze = sf.dim() == 2
    x = sf.unsqueeze(0) if squeeze else sf
    g, mn, kg = x.shape
    aligned_mn = get_tma_aligned_size(mn, x.element_size())
    if x.stride(1) == 1 and x.stride(2) == aligned_mn and (g == 1 or x.stride(0) == aligned_mn * kg):
        return sf
    storage = torch.empty(g, kg, aligned_mn, dtype=sf.dtype, device=sf.device)
    out = storage[:, :, :mn].transpose(1, 2)
    out.copy_(x)
    return out.squeeze(0) if squeeze else out


#: DeepGEMM's earlier name for :func:`get_mn_major_tma_aligned_tensor` ("column-major" scales).
get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor
