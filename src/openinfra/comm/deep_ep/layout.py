"""Dispatch layout: which rank and expert each token goes to, and where it sits in the send buffer.

Experts are placed contiguously: rank ``r`` owns experts ``[r * L, (r + 1) * L)`` with
``L = num_experts / num_ranks``. A token goes once to each rank that owns at least one of its
top-k experts, whatever the number of those experts.
"""

from __future__ import annotations

import torch

__all__ = ["compute_layout", "send_index_from_mask", "localize_topk"]


def compute_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``.

    ``topk_idx`` [T, K] int; -1 entries select nothing.
    """
    num_tokens = topk_idx.shape[0]
    per_rank = num_experts // num_ranks
    idx = topk_idx.long()
    valid = idx >= 0
    # -1 goes to a spill bin (index E, resp. R) that is dropped afterwards: no boolean indexing, so no host sync.
    expert_bin = torch.where(valid, idx, torch.full_like(idx, num_experts))
    num_tokens_per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=idx.device)
    num_tokens_per_expert.scatter_add_(0, expert_bin.view(-1), torch.ones_like(expert_bin.view(-1), dtype=torch.int32))
    rank_bin = torch.where(valid, idx // per_rank, torch.full_like(idx, num_ranks))
    hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.int32, device=idx.device)
    hits.scatter_add_(1, rank_bin, torch.ones_like(rank_bin, dtype=torch.int32))
    is_token_in_rank = hits[:, :num_ranks] > 0
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert[:num_experts], is_token_in_rank


def send_index_from_mask(is_token_in_rank: torch.Tensor, rank_offsets: torch.Tensor) -> torch.Tensor:
    """Send-buffer row of token ``t`` for rank ``j``: ``rank_offsets[j]`` + its order among rank j's tokens; -1 if not sent.

    Tokens keep their order within each destination, so received rows are source-rank-major and,
    within a source, in the source's token order.
    """
    mask = is_token_in_rank.to(torch.int64)
    order = torch.cumsum(mask, dim=0) - 1
    index = order + rank_offsets.to(torch.int64).unsqueeze(0)
    return torch.where(is_token_in_rank, index, torch.full_like(index, -1))


def localize_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, rank: int, experts_per_rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global expert ids -> this rank's local ids; other ranks' experts become -1 with weight 0."""
    lo = rank * experts_per_rank
    local = topk_idx - lo
    mine = (topk_idx >= lo) & (topk_idx < lo + experts_per_rank)
    local = torch.where(mine, local, torch.full_like(local, -1))
    if topk_weights is None:
        return local, None
    return local, torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
