"""PyTorch reference of the DeepEP row kernels: the CPU path and the oracle the Triton kernels match.

Two primitives cover every data movement of dispatch and combine:

- ``scatter_rows``: row ``n`` of ``src`` is written to rows ``index[n, s]`` of ``out`` for every
  ``s`` with ``index[n, s] >= 0`` (the *permute* of dispatch: one token to each of its destination
  slots), optionally quantized to FP8 e4m3 with one fp32 scale per 128 channels on the way (the
  fused *fp8 cast*), bit for bit what ``openinfra.kernels.deep_gemm.per_token_cast_to_fp8`` gives.
- ``gather_reduce``: ``out[t] = sum_s w[t, s] * src[index[t, s]] (+ bias0[t] + bias1[t])`` over the
  ``s`` with ``index[t, s] >= 0``, accumulated in fp32 in ascending ``s`` (the *unpermute* of
  combine: each token's partial results, weighted or not, summed back at its origin).

Arithmetic is spelled out in the same order as the kernels (product, then sum, one term at a time)
so the two agree bit for bit.
"""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.cast.reference import per_token_cast_to_fp8_reference

__all__ = ["scatter_rows_reference", "gather_reduce_reference"]


def scatter_rows_reference(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    out_scales: torch.Tensor | None = None,
    cast_fp8: bool = False,
    round_scale: bool = False,
) -> None:
    """``out[index[n, s]] = src[n]`` (FP8-cast when ``cast_fp8``; scales to ``out_scales``). In place."""
    if src.shape[0] == 0 or index.shape[1] == 0:
        return
    if cast_fp8:
        values, scales = per_token_cast_to_fp8_reference(src, use_ue8m0=round_scale)
    else:
        values, scales = src, None
    rows = torch.arange(src.shape[0], device=src.device).unsqueeze(1).expand_as(index)
    valid = index >= 0
    dst, srows = index[valid], rows[valid]
    out[dst] = values[srows].to(out.dtype)
    if cast_fp8:
        out_scales[dst] = scales[srows]


def gather_reduce_reference(
    src: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor | None = None,
    bias0: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_s weights[t, s] * src[index[t, s]] + bias0[t] + bias1[t]`` in fp32, ``-1`` skipped."""
    num_rows, num_slots = index.shape
    hidden = src.shape[1]
    acc = torch.zeros(num_rows, hidden, dtype=torch.float32, device=src.device)
    for s in range(num_slots):
        idx = index[:, s]
        valid = idx >= 0
        v = src[idx.clamp(min=0)].float()
        if weights is not None:
            v = v * weights[:, s : s + 1].float()
        acc = acc + torch.where(valid.unsqueeze(1), v, torch.zeros((), dtype=torch.float32, device=src.device))
    if bias0 is not None:
        acc = acc + bias0.float()
    if bias1 is not None:
        acc = acc + bias1.float()
    if out is None:
        return acc.to(src.dtype)
    out.copy_(acc.to(out.dtype))
    return out
