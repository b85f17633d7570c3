"""Expert computation in the grouped-GEMM layouts DeepGEMM defines.

- Contiguous (training / prefill): the (token, expert) pairs are sorted by expert and stacked along
  M, each expert's block padded to ``alignment`` rows; ``m_indices[M]`` names each row's expert,
  -1 for padding rows (which are skipped). DeepGEMM's ``m_grouped_fp8_gemm_nt_contiguous`` takes it.
- Masked (decode): a [E, max_m, dim] tensor where only the first ``masked_m[e]`` rows of group e
  are meaningful (DeepGEMM's ``m_grouped_fp8_gemm_nt_masked``, fed by DeepEP's low-latency dispatch;
  the static shape is what CUDA graphs need).

The GEMM itself runs through deep_gemm's FP8 grouped kernels when requested (``fp8=True``) on a
Hopper GPU with the kernels present; otherwise through ``torch._grouped_mm`` (bf16 on CUDA) or a
per-expert loop / ``torch.bmm`` (everywhere). All paths are differentiable; the FP8 forward's
backward runs in the weight dtype (straight-through).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

__all__ = ["ContiguousLayout", "MaskedLayout", "contiguous_layout", "masked_layout",
           "grouped_linear_contiguous", "grouped_linear_masked"]


@dataclass
class ContiguousLayout:
    """Rows of the contiguous layout. ``row_token``/``row_slot``/``m_indices``: [M] (-1 on padding);
    ``counts``: [E] int64 tokens per expert; ``offsets``: E+1 host ints, expert e owns rows
    ``offsets[e] : offsets[e] + counts[e]`` of its padded block ``offsets[e] : offsets[e+1]``."""

    row_token: torch.Tensor
    row_slot: torch.Tensor
    m_indices: torch.Tensor
    counts: torch.Tensor
    offsets: list[int]
    alignment: int


@dataclass
class MaskedLayout:
    """``token_index``/``slot``: [E, max_m] int64 (-1 where unused); ``masked_m``: [E] int32."""

    token_index: torch.Tensor
    slot: torch.Tensor
    masked_m: torch.Tensor


def _sorted_pairs(indices: torch.Tensor, num_experts: int):
    """Sort (token, slot) pairs by expert. Returns token, slot, expert, rank-within-expert, counts [E]
    and the host copy of ``[counts..., min index, max index]`` (one device-to-host transfer: on a GPU
    every sync stalls the launch queue, so the range check and the layout sizes share it)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [tokens, topk], got shape {tuple(indices.shape)}")
    flat = indices.flatten()
    # Out-of-range ids must not reach bincount (it would grow the histogram): clamp, check on the host.
    counts = torch.bincount(flat.clamp(0, num_experts - 1), minlength=num_experts)
    if flat.numel():
        lo_hi = torch.stack([flat.min(), flat.max()])
    else:
        lo_hi = torch.zeros(2, dtype=flat.dtype, device=flat.device)
    host = torch.cat([counts, lo_hi.to(counts.dtype)]).tolist()
    if flat.numel() and (host[-2] < 0 or host[-1] >= num_experts):
        raise ValueError(f"indices must lie in [0, {num_experts}), got range [{host[-2]}, {host[-1]}]")
    order = torch.argsort(flat, stable=True)  # stable: tokens keep their order inside an expert
    expert = flat[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[expert]
    k = indices.shape[1]
    return order // k, order % k, expert, rank, counts, host[:num_experts]


def contiguous_layout(indices: torch.Tensor, num_experts: int, alignment: int = 1) -> ContiguousLayout:
    """Build the contiguous layout for routing ``indices`` [T, topk] (alignment 128 for DeepGEMM)."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    token, slot, expert, rank, counts, host_counts = _sorted_pairs(indices, num_experts)
    padded = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(padded, 0) - padded
    offsets = [0]
    for c in host_counts:
        offsets.append(offsets[-1] + (c + alignment - 1) // alignment * alignment)
    m = offsets[-1]
    rows = starts[expert] + rank
    dev = indices.device
    row_token = torch.full((m,), -1, dtype=torch.int64, device=dev).index_copy_(0, rows, token)
    row_slot = torch.full((m,), -1, dtype=torch.int64, device=dev).index_copy_(0, rows, slot)
    m_indices = torch.full((m,), -1, dtype=torch.int32, device=dev).index_copy_(0, rows, expert.to(torch.int32))
    return ContiguousLayout(row_token, row_slot, m_indices, counts, offsets, alignment)


def masked_layout(indices: torch.Tensor, num_experts: int, max_m: int | None = None) -> MaskedLayout:
    """Build the masked layout for ``indices`` [T, topk]; ``max_m`` defaults to T (an expert gets a
    token at most once). More than ``max_m`` tokens for one expert raises ValueError (never dropped)."""
    token, slot, expert, rank, counts, host_counts = _sorted_pairs(indices, num_experts)
    max_m = indices.shape[0] if max_m is None else max_m
    if host_counts and max(host_counts) > max_m:
        raise ValueError(f"an expert received {max(host_counts)} tokens, more than max_m={max_m}")
    dev = indices.device
    token_index = torch.full((num_experts, max_m), -1, dtype=torch.int64, device=dev)
    slots = torch.full((num_experts, max_m), -1, dtype=torch.int64, device=dev)
    token_index[expert, rank] = token
    slots[expert, rank] = slot
    return MaskedLayout(token_index, slots, counts.to(torch.int32))


# --- the GEMMs -------------------------------------------------------------------------------------

def _deep_gemm_grouped(kind: str):
    try:
        mod = importlib.import_module("openinfra.kernels.deep_gemm")
    except ImportError:
        return None
    needed = (kind, "per_token_cast_to_fp8", "per_block_cast_to_fp8")
    return mod if all(hasattr(mod, n) for n in needed) else None


def _fp8_ok(x: torch.Tensor, w: torch.Tensor, kind: str) -> bool:
    from openinfra.kernels.backend import use_triton

    return (x.is_cuda and use_triton(x) and w.shape[-1] % 128 == 0 and w.shape[-2] % 128 == 0
            and _deep_gemm_grouped(kind) is not None)


def _quantize_weight(dg, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize the [E, N, K] expert weights, cached on the tensor until it changes (its version
    counter moves on every in-place update, e.g. an optimizer step): decode reuses one quantization."""
    cached = getattr(w, "_oi_fp8", None)
    if cached is not None and cached[0] == (w.data_ptr(), w._version):
        return cached[1], cached[2]
    e, n, k = w.shape
    wq, ws = dg.per_block_cast_to_fp8(w.detach().reshape(e * n, k))  # 128-row blocks never straddle experts
    wq, ws = wq.view(e, n, k), ws.view(e, n // 128, -1)
    w._oi_fp8 = ((w.data_ptr(), w._version), wq, ws)
    return wq, ws


def _segment_mm(x: torch.Tensor, w: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """out[rows of expert e] = x[rows] @ w[e].T, padding blocks included (their rows are zero)."""
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(x.device)[0] >= 9:
        ends = torch.tensor(offsets[1:], dtype=torch.int32, device=x.device)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    if offsets[0] != 0 or offsets[-1] != x.shape[0]:
        raise ValueError(f"offsets must run from 0 to x's {x.shape[0]} rows, got {offsets[0]} .. {offsets[-1]}")
    # One split and one unbind, not a slice of x and an index of w per expert: under autograd each
    # slice's / index's backward allocates and zero-fills a gradient of the *whole* tensor, i.e.
    # 2 x E full-size fills per product (~60% of a `small` training step on CPU); split's and
    # unbind's backward put the pieces together once.
    sizes = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    parts = [xe @ we.t() for xe, we in zip(x.split(sizes), w.unbind(0))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, w.shape[1])


class _FP8Contiguous(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, m_indices, offsets):  # type: ignore[override]
        dg = _deep_gemm_grouped("m_grouped_fp8_gemm_nt_contiguous")
        xq, xs = dg.per_token_cast_to_fp8(x.contiguous())
        wq, ws = _quantize_weight(dg, w)
        out = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
        dg.m_grouped_fp8_gemm_nt_contiguous((xq, xs), (wq, ws), out, m_indices)
        out = out.masked_fill((m_indices < 0)[:, None], 0)
        ctx.save_for_backward(x, w)
        ctx.offsets = offsets
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        dx = _segment_mm(grad, w.transpose(1, 2), ctx.offsets)
        dw = torch.stack([grad[a:b].t() @ x[a:b].to(w.dtype) for a, b in zip(ctx.offsets[:-1], ctx.offsets[1:])])
        return dx, dw, None, None


class _FP8Masked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, masked_m):  # type: ignore[override]
        dg = _deep_gemm_grouped("m_grouped_fp8_gemm_nt_masked")
        e, max_m, k = x.shape
        xq, xs = dg.per_token_cast_to_fp8(x.reshape(e * max_m, k).contiguous())
        wq, ws = _quantize_weight(dg, w)
        out = torch.empty(e, max_m, w.shape[1], dtype=torch.bfloat16, device=x.device)
        expected = max(1, int(masked_m.float().mean().ceil()))
        dg.m_grouped_fp8_gemm_nt_masked((xq.view(e, max_m, k), xs.view(e, max_m, -1)), (wq, ws), out, masked_m, expected)
        valid = torch.arange(max_m, device=x.device)[None, :] < masked_m[:, None]
        out = out.masked_fill(~valid[..., None], 0)
        ctx.save_for_backward(x, w)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        return torch.bmm(grad, w), torch.bmm(grad.transpose(1, 2), x.to(w.dtype)), None


def grouped_linear_contiguous(x: torch.Tensor, w: torch.Tensor, layout: ContiguousLayout, fp8: bool = False) -> torch.Tensor:
    """x [M, K] rows in the contiguous layout, w [E, N, K] -> [M, N] (padding rows give zeros)."""
    if x.shape[0] != layout.offsets[-1] or w.shape[0] != len(layout.offsets) - 1:
        raise ValueError(f"x rows ({x.shape[0]}) / experts ({w.shape[0]}) do not match the layout "
                         f"({layout.offsets[-1]} rows, {len(layout.offsets) - 1} experts)")
    if fp8 and layout.alignment % 128 == 0 and _fp8_ok(x, w, "m_grouped_fp8_gemm_nt_contiguous"):
        return _FP8Contiguous.apply(x, w, layout.m_indices, layout.offsets)
    return _segment_mm(x, w, layout.offsets)


def grouped_linear_masked(x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """x [E, max_m, K], w [E, N, K] -> [E, max_m, N]; rows >= masked_m[e] are not meaningful."""
    if x.dim() != 3 or x.shape[0] != w.shape[0]:
        raise ValueError(f"x must be [E={w.shape[0]}, max_m, K], got {tuple(x.shape)}")
    if fp8 and _fp8_ok(x, w, "m_grouped_fp8_gemm_nt_masked"):
        return _FP8Masked.apply(x, w, masked_m.to(torch.int32))
    return torch.bmm(x, w.transpose(1, 2))
