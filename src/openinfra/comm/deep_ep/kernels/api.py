"""Public row kernels of DeepEP: argument checks, then Triton on Hopper or the PyTorch reference.

``scatter_rows`` (permute, optionally fused with the FP8 cast) and ``gather_reduce`` (weighted
unpermute + bias) are what dispatch and combine are made of; they are public so that a MoE layer
can permute / unpermute locally with the same code, and so the benchmark can time them alone.
"""

from __future__ import annotations

import torch

from openinfra.kernels.backend import use_triton
from openinfra.comm.deep_ep.kernels.reference import gather_reduce_reference, scatter_rows_reference

__all__ = ["scatter_rows", "gather_reduce"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_rows(name: str, t: object, ndim: int = 2) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")
    return t


def _check_index(index: object, rows: int, name: str = "index") -> torch.Tensor:
    _check_rows(name, index)
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {index.dtype}")
    if index.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(index.shape)}")
    return index


def scatter_rows(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    out_scales: torch.Tensor | None = None,
    cast_fp8: bool = False,
    round_scale: bool = False,
) -> None:
    """Permute rows: ``out[index[n, s]] = src[n]`` for every ``index[n, s] >= 0``; in place.

    Args:
        src: [N, H], any dtype (rows contiguous). With ``cast_fp8`` it must be bf16/fp16/fp32 and
            H a multiple of 128.
        index: [N, S] int64/int32 destination rows of ``out``; -1 means "not sent". Two slots must
            not name the same destination row.
        out: [M, H] destination; its dtype is ``src``'s, or ``torch.float8_e4m3fn`` with ``cast_fp8``.
        out_scales: [M, H // 128] float32 scales, required with ``cast_fp8``: ``src[n] ~= out[d] * scale``
            per 128-channel group, ``scale = max(amax, 1e-4) / 448``.
        cast_fp8: quantize on the way (the fused permute + cast of an FP8 dispatch).
        round_scale: round each scale up to a power of two (DeepGEMM's UE8M0 scales).
    """
    _check_rows("src", src)
    _check_index(index, src.shape[0])
    _check_rows("out", out)
    if out.shape[1] != src.shape[1]:
        raise ValueError(f"out must have {src.shape[1]} columns like src, got shape {tuple(out.shape)}")
    if out.device != src.device or index.device != src.device:
        raise ValueError(f"src, index and out must be on one device, got {src.device}, {index.device}, {out.device}")
    if cast_fp8:
        if src.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"src must be bf16/fp16/fp32 to cast to FP8, got {src.dtype}")
        if src.shape[1] % 128:
            raise ValueError(f"the FP8 cast needs a hidden size that is a multiple of 128, got {src.shape[1]}")
        if out.dtype != torch.float8_e4m3fn:
            raise TypeError(f"out must be torch.float8_e4m3fn when cast_fp8, got {out.dtype}")
        _check_rows("out_scales", out_scales)
        if out_scales.dtype != torch.float32 or tuple(out_scales.shape) != (out.shape[0], src.shape[1] // 128):
            raise ValueError(
                f"out_scales must be float32 [{out.shape[0]}, {src.shape[1] // 128}], "
                f"got {out_scales.dtype} {tuple(out_scales.shape)}"
            )
    elif out.dtype != src.dtype:
        raise TypeError(f"out must have src's dtype {src.dtype} (no cast requested), got {out.dtype}")
    if use_triton(src):
        from openinfra.comm.deep_ep.kernels.kernel import scatter_rows_triton

        # Triton has no pointer type for every dtype (fp8 in, bool); move their bytes instead.
        if not cast_fp8 and src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bool):
            src, out = src.view(torch.uint8), out.view(torch.uint8)
        scatter_rows_triton(src, index, out, out_scales, cast_fp8, round_scale)
    else:
        scatter_rows_reference(src, index, out, out_scales, cast_fp8, round_scale)


def gather_reduce(
    src: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | tuple[torch.Tensor | None, ...] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpermute and reduce: ``out[t] = sum_s weights[t, s] * src[index[t, s]] + bias``, -1 skipped.

    Args:
        src: [M, H] bf16/fp16/fp32 rows (rows contiguous).
        index: [T, S] int64/int32 source rows; -1 slots contribute nothing (a row with no valid
            slot becomes ``bias`` or zero).
        weights: optional [T, S] float32 per-slot weights (None: plain sum).
        bias: None, a [T, H] tensor, or a tuple of up to two, added after the sum.
        out: optional [T, H] output (default: new, ``src``'s dtype).

    Returns:
        ``out`` [T, H]; accumulation in fp32, slots in ascending order.
    """
    _check_rows("src", src)
    if src.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"src must be bf16/fp16/fp32, got {src.dtype}")
    rows = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 2 else -1
    _check_index(index, rows)
    if weights is not None:
        _check_rows("weights", weights)
        if tuple(weights.shape) != tuple(index.shape):
            raise ValueError(f"weights must have index's shape {tuple(index.shape)}, got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
    biases = tuple(b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None)
    if len(biases) > 2:
        raise ValueError(f"bias takes at most two tensors, got {len(biases)}")
    for i, b in enumerate(biases):
        _check_rows(f"bias[{i}]", b)
        if tuple(b.shape) != (rows, src.shape[1]):
            raise ValueError(f"bias[{i}] must be [{rows}, {src.shape[1]}], got {tuple(b.shape)}")
    b0 = biases[0] if len(biases) > 0 else None
    b1 = biases[1] if len(biases) > 1 else None
    if out is None:
        out = torch.empty(rows, src.shape[1], dtype=src.dtype, device=src.device)
    else:
        _check_rows("out", out)
        if tuple(out.shape) != (rows, src.shape[1]):
            raise ValueError(f"out must be [{rows}, {src.shape[1]}], got {tuple(out.shape)}")
    if use_triton(src):
        from openinfra.comm.deep_ep.kernels.kernel import gather_reduce_triton

        return gather_reduce_triton(src, index, weights, b0, b1, out)
    return gather_reduce_reference(src, index, weights, b0, b1, out)
