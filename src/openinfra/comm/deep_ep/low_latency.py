"""Low-latency (decode) mode: one message per (token, expert), expert-major output, no host sync.

Dispatch:
1. each valid (token t, slot k) becomes a message to the rank owning expert ``topk_idx[t, k]``; the
   messages to one rank take consecutive slots of a fixed block of ``M = Tmax * K`` slots (so the
   all-to-all has equal splits and needs no count exchange, hence no host sync);
2. permute + optional FP8 cast in one kernel (``scatter_rows``), the (local expert, source token)
   pair of each message in an int32 side buffer next to its scales;
3. two ``all_to_all_single`` calls (payload, side);
4. the receiver places each message at ``[local expert, slot]`` of ``[L, R * Tmax, H]``: per expert,
   source-rank-major blocks packed from slot 0, so ``recv_count[e]`` rows are valid. With
   ``return_recv_hook`` step 3 is only issued; the hook waits for it and does step 4.

Combine sends row ``[e, j]`` back through the same slot and, at the origin, sums
``topk_weights[t, k] * row`` over the token's slots (``gather_reduce``), in fp32, output bf16.

The price of no host sync on ``all_to_all_single``: the padded blocks travel whole (R x Tmax x K rows
per rank). The symmetric-memory transport (device-side splits) avoids that where it is available.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from openinfra.comm.deep_ep.kernels import gather_reduce, scatter_rows
from openinfra.comm.deep_ep.launch import Collectives, Finish

__all__ = ["LowLatencyHandle", "ll_dispatch_issue", "ll_combine_issue", "LowLatencyOutputs"]


class LowLatencyHandle(NamedTuple):
    """Layout of one low-latency dispatch (the first five fields are DeepEP's handle).

    Attributes:
        recv_src_info: [L, R * Tmax] int32, the source token index of each received row.
        recv_layout_range: [L, R] int64, ``(begin << 32) | count`` of each source rank's block per expert.
        num_max_dispatch_tokens_per_rank: Tmax.
        hidden: H.
        num_experts: E.
        recv_row_of_slot: [R * M] int64, flat row (``e * R * Tmax + j``) where each received slot landed, -1 empty.
        send_slot: [T, K] int64, the send slot of each (token, top-k) message, -1 for ``topk_idx == -1``.
        num_tokens: T at the origin.
        recv_counts_per_rank: [R] int64, messages received from each rank (the combine's block counts).
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    recv_row_of_slot: torch.Tensor
    send_slot: torch.Tensor
    num_tokens: int
    recv_counts_per_rank: torch.Tensor | None = None


class LowLatencyOutputs:
    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None = None
    recv_count: torch.Tensor
    handle: LowLatencyHandle


def _message_slots(topk_idx: torch.Tensor, num_ranks: int, experts_per_rank: int, slots: int) -> torch.Tensor:
    """[T, K] int64 send slot of each (token, k) message, in (token, k) order per destination; -1 if none."""
    idx = topk_idx.long()
    valid = idx >= 0
    dest = torch.where(valid, idx // experts_per_rank, torch.full_like(idx, num_ranks)).view(-1, 1)
    onehot = torch.zeros(dest.shape[0], num_ranks + 1, dtype=torch.int64, device=idx.device)
    onehot.scatter_(1, dest, 1)
    order = (torch.cumsum(onehot, 0) - 1).gather(1, dest).view_as(idx)
    return torch.where(valid, dest.view_as(idx) * slots + order, torch.full_like(idx, -1))


def ll_dispatch_issue(
    rank: int, num_ranks: int, x: torch.Tensor, topk_idx: torch.Tensor, max_tokens: int, num_experts: int,
    use_fp8: bool, round_scale: bool, use_ue8m0: bool, stats: torch.Tensor | None, result: LowLatencyOutputs,
) -> Callable[[Collectives], Finish]:
    """The issue step of a low-latency dispatch (module docstring); fills ``result``."""
    device = x.device
    num_tokens, hidden = x.shape
    k = topk_idx.shape[1]
    experts = num_experts // num_ranks
    slots = max_tokens * k
    groups = hidden // 128 if use_fp8 else 0
    capacity = num_ranks * max_tokens  # rows per local expert

    def issue(coll: Collectives) -> Finish:
        send_slot = _message_slots(topk_idx, num_ranks, experts, slots)
        valid = topk_idx >= 0
        dest = torch.where(valid, topk_idx.long() // experts, torch.full_like(topk_idx, num_ranks, dtype=torch.int64))
        send_counts = torch.zeros(num_ranks + 1, dtype=torch.int64, device=device)
        send_counts.scatter_add_(0, dest.view(-1), torch.ones(dest.numel(), dtype=torch.int64, device=device))
        send_counts = send_counts[:num_ranks]
        total = num_ranks * slots
        payload = torch.empty(total, hidden, dtype=torch.float8_e4m3fn if use_fp8 else x.dtype, device=device)
        side = torch.full((total, 2 + groups), -1, dtype=torch.int32, device=device)
        scatter_rows(x, send_slot, payload, side[:, 2:].view(torch.float32) if use_fp8 else None,
                     cast_fp8=use_fp8, round_scale=round_scale or use_ue8m0)
        idx = topk_idx.long()
        meta = torch.stack([(idx % experts).to(torch.int32),
                            torch.arange(num_tokens, dtype=torch.int32, device=device).unsqueeze(1).expand_as(idx)], dim=2)
        scatter_rows(meta.view(-1, 2), send_slot.view(-1, 1), side[:, :2])
        recv_payload = torch.empty_like(payload)
        recv_side = torch.empty_like(side)
        coll.all_to_all_blocks(recv_payload, payload, send_counts)
        coll.all_to_all_blocks(recv_side, side, send_counts, fill=-1)

        recv_x = torch.empty(experts, capacity, hidden, dtype=payload.dtype, device=device)
        if use_fp8 and use_ue8m0:
            # four UE8M0 exponent bytes per int32, the last two dims column-major (TMA-friendly)
            result.recv_scales = torch.empty(experts, (groups + 3) // 4, capacity, dtype=torch.int32, device=device).transpose(1, 2)
        elif use_fp8:
            result.recv_scales = torch.empty(experts, groups, capacity, dtype=torch.float32, device=device).transpose(1, 2)
        result.recv_x = recv_x
        result.recv_count = torch.empty(experts, dtype=torch.int32, device=device)
        result.handle = LowLatencyHandle(
            recv_src_info=torch.empty(experts, capacity, dtype=torch.int32, device=device),
            recv_layout_range=torch.empty(experts, num_ranks, dtype=torch.int64, device=device),
            num_max_dispatch_tokens_per_rank=max_tokens, hidden=hidden, num_experts=num_experts,
            recv_row_of_slot=torch.empty(total, dtype=torch.int64, device=device),
            send_slot=send_slot, num_tokens=num_tokens,
            recv_counts_per_rank=torch.empty(num_ranks, dtype=torch.int64, device=device),
        )

        def finish() -> list[torch.Tensor]:
            h = result.handle
            expert = recv_side[:, 0].long().view(num_ranks, slots)
            valid = expert >= 0
            ebin = torch.where(valid, expert, torch.full_like(expert, experts))
            onehot = torch.zeros(num_ranks, slots, experts + 1, dtype=torch.int64, device=device)
            onehot.scatter_(2, ebin.unsqueeze(2), 1)
            within = (torch.cumsum(onehot, 1) - 1).gather(2, ebin.unsqueeze(2)).squeeze(2)  # [R, M]
            counts = onehot.sum(1)[:, :experts]  # [R, L]: messages from rank s to local expert e
            h.recv_counts_per_rank.copy_(onehot.sum(1)[:, :experts].sum(1))
            begins = torch.cumsum(counts, 0) - counts
            pos = begins.gather(1, ebin.clamp(max=experts - 1)) + within
            ok = valid & (pos < capacity)
            row = torch.where(ok, ebin * capacity + pos, torch.full_like(pos, -1)).view(-1)
            h.recv_row_of_slot.copy_(row)
            flat_x = recv_x.view(experts * capacity, hidden)
            scatter_rows(recv_payload.view(torch.uint8) if use_fp8 else recv_payload, row.unsqueeze(1),
                         flat_x.view(torch.uint8) if use_fp8 else flat_x)
            src_flat = h.recv_src_info.view(-1)
            src_flat.fill_(-1)
            scatter_rows(recv_side[:, 1:2], row.unsqueeze(1), src_flat.unsqueeze(1))
            total_counts = counts.sum(0).clamp(max=capacity)
            result.recv_count.copy_(total_counts)
            h.recv_layout_range.copy_(((begins << 32) | counts).T)
            if use_fp8:
                flat_sf = torch.zeros(experts * capacity, groups, dtype=torch.float32, device=device)
                scatter_rows(recv_side[:, 2:].contiguous().view(torch.float32), row.unsqueeze(1), flat_sf)
                if use_ue8m0:
                    exps = ((flat_sf.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
                    padded = torch.zeros(exps.shape[0], (groups + 3) // 4 * 4, dtype=torch.uint8, device=device)
                    padded[:, :groups] = exps
                    flat_sf = padded.view(torch.int32)
                result.recv_scales.copy_(flat_sf.view(experts, capacity, -1))
            if stats is not None:
                stats.add_(total_counts.to(stats.dtype))
            outs = [recv_x, result.recv_scales, result.recv_count, h.recv_src_info, h.recv_layout_range, h.recv_row_of_slot]
            return [t for t in outs if t is not None]

        return finish

    return issue


def ll_combine_issue(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle, out: torch.Tensor,
) -> Callable[[Collectives], Finish]:
    """The issue step of a low-latency combine: rows back through their slots, weighted sum at the origin."""

    def issue(coll: Collectives) -> Finish:
        flat = x.reshape(-1, x.shape[-1])
        send = gather_reduce(flat, handle.recv_row_of_slot.unsqueeze(1))
        back = torch.empty_like(send)
        coll.all_to_all_blocks(back, send, handle.recv_counts_per_rank)
        weights = topk_weights.masked_fill(topk_idx < 0, 0.0).contiguous()

        def finish() -> list[torch.Tensor]:
            gather_reduce(back, handle.send_slot, weights, out=out)
            return [out]

        return finish

    return issue
