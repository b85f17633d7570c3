"""Helpers shared by the DeepEP tests (module-level so spawned ranks can import them)."""

from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity of (x + 1) and (y + 1) in float64: 0 when equal (DeepEP's metric)."""
    if x.numel() == 0 and y.numel() == 0:
        return 0.0
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize [N, H] e4m3 with [N, H/128] fp32 scales (or UE8M0 bytes packed in int32) to bf16.

    ``scales`` may have any shape holding N rows in order (e.g. a flattened [L, R*Tmax, ...])."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    groups = x_fp8.shape[1] // 128
    if scales.dtype == torch.int32:
        # UE8M0: one exponent byte per group, four per int32, zero bytes padding the last one
        exps = scales.contiguous().reshape(-1).view(torch.uint8).reshape(x_fp8.shape[0], -1)[:, :groups]
        scales = (exps.to(torch.int32) << 23).view(torch.float32)
    values = x_fp8.float().view(x_fp8.shape[0], -1, 128)
    return (values * scales.reshape(x_fp8.shape[0], -1, 1)).view(x_fp8.shape).to(torch.bfloat16)


def unique_ranks(rank_idx: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Per row: the distinct ranks (descending), then -1 padding, same shape as ``rank_idx``."""
    out = torch.full_like(rank_idx, -1)
    for t in range(rank_idx.shape[0]):
        ranks = sorted({int(r) for r in rank_idx[t].tolist() if r >= 0}, reverse=True)
        out[t, : len(ranks)] = torch.tensor(ranks, dtype=rank_idx.dtype)
    return out


def routing(num_tokens: int, num_experts: int, num_topk: int, num_masked: int, device, generator) -> torch.Tensor:
    """Top-k of random scores, with ``num_masked`` random entries set to -1 (no expert)."""
    scores = torch.randn(num_tokens, num_experts, generator=generator).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1]
    # at most one masked slot per token, so every token still goes somewhere when num_topk > 1
    for t in torch.randperm(num_tokens, generator=generator)[:num_masked].tolist():
        k = int(torch.randint(num_topk, (1,), generator=generator))
        topk_idx[t, k] = -1
    return topk_idx.to(device)
