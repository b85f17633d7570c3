"""Argument checks shared by the buffer's entry points: each error names the argument."""

from __future__ import annotations

import torch

__all__ = [
    "check_tensor", "check_topk_idx", "check_topk_weights", "check_hidden", "check_fp8_pair",
    "check_expert_ids", "HIDDEN_DTYPES",
]

#: Activation dtypes a dispatch / combine moves (DeepEP itself takes bf16; fp16 / fp32 cost nothing extra here).
HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    return t


def check_topk_idx(topk_idx: object, num_tokens: int | None = None) -> torch.Tensor:
    check_tensor("topk_idx", topk_idx, 2, (torch.int64, torch.int32))
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx must have {num_tokens} rows (one per token), got shape {tuple(topk_idx.shape)}")
    return topk_idx


def check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every id in [-1, num_experts). Reads the tensor's min / max (a host sync on a GPU)."""
    if topk_idx.numel() == 0:
        return
    lo, hi = torch.aminmax(topk_idx)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"topk_idx holds expert ids in [{lo}, {hi}]; they must be -1 (no expert) or in [0, {num_experts})")


def check_topk_weights(topk_weights: object, topk_idx: torch.Tensor, name: str = "topk_weights") -> torch.Tensor:
    check_tensor(name, topk_weights, 2, (torch.float32,))
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"{name} must have topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_weights.shape)}")
    return topk_weights


def check_hidden(name: str, x: object, dtypes: tuple[torch.dtype, ...] = HIDDEN_DTYPES) -> torch.Tensor:
    return check_tensor(name, x, 2, dtypes)


def check_fp8_pair(x: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8 [T, H] e4m3, scales [T, H // 128] float32)``, H a multiple of 128."""
    if not (isinstance(x, tuple) and len(x) == 2):
        raise TypeError("x must be a tensor or a (fp8 tensor, scales) pair")
    values, scales = x
    check_tensor("x[0]", values, 2, (torch.float8_e4m3fn,))
    check_tensor("x[1]", scales, 2, (torch.float32,))
    if values.shape[1] % 128:
        raise ValueError(f"FP8 hidden size must be a multiple of 128, got {values.shape[1]}")
    if tuple(scales.shape) != (values.shape[0], values.shape[1] // 128):
        raise ValueError(f"x[1] (scales) must be [{values.shape[0]}, {values.shape[1] // 128}], got {tuple(scales.shape)}")
    return values, scales
