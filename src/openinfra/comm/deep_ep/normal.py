"""Normal (high-throughput) mode: dispatch and combine over ``all_to_all_single`` with split sizes.

Dispatch, per call:
1. counts: every rank's ``num_tokens_per_rank`` and ``num_tokens_per_expert`` are all-gathered and
   read on the host (the one host sync of normal mode: the receive size is data dependent);
2. permute: each token is copied once into the send-buffer block of every rank it goes to, in
   token order (``scatter_rows``); its top-k ids / weights, FP8 scales and source index travel in
   a second, int32 "side" buffer with the same rows;
3. one ``all_to_all_single`` per buffer; received rows are source-rank-major;
4. the top-k ids are rewritten to this rank's local expert ids (-1 elsewhere, weight 0).

``num_worst_tokens`` replaces step 1's host sync: every rank pair gets a fixed block of
``num_worst_tokens // num_ranks`` slots, counts travel on the device, and the received rows are
compacted into ``num_worst_tokens`` output rows (padding: zeros, top-k id -1).

Combine sends each received row back along the same path and sums the copies of each token at its
origin (``gather_reduce``), adding up to two biases. A handle caches the layout, so a second
dispatch with it (``handle=...``) skips step 1, and combine needs nothing else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from openinfra.comm.deep_ep.kernels import gather_reduce, scatter_rows
from openinfra.comm.deep_ep.launch import Collectives, Finish
from openinfra.comm.deep_ep.layout import localize_topk, send_index_from_mask

__all__ = ["DispatchHandle", "dispatch_issue", "combine_issue", "DispatchOutputs"]


class DispatchHandle(NamedTuple):
    """The cached layout of one normal-mode dispatch (``handle[0]`` is DeepEP's rank prefix matrix).

    Attributes:
        rank_prefix_matrix: [R, R] int32, ``[i][j]`` = tokens ranks 0..i send to rank j; the rows from
            source ``i`` sit at ``[rank_prefix_matrix[i-1][rank], rank_prefix_matrix[i][rank])`` of recv_x.
        recv_src_idx: [N] int32, each received row's token index at its source (-1: padding row).
        is_token_in_rank: [T, R] bool, the sender's layout.
        send_index: [T, R] int64, the send-buffer row of token t for rank j (-1: not sent).
        send_counts: tokens sent to each rank (None in worst-token mode).
        recv_counts: tokens received from each rank (None in worst-token mode).
        num_recv_tokens: rows of recv_x.
        slots_per_rank: worst-token mode's fixed block per rank pair (0 otherwise).
        recv_row_of_slot: worst-token mode, [R * slots_per_rank] int64: recv_x row of each slot (-1 empty).
        num_tokens: T, tokens at this rank before dispatch.
        block_counts_send / block_counts_recv: worst-token mode, [R] int64 device tensors: real rows in
            each rank pair's block, sent / received (what the symmetric-memory transport moves).
    """

    rank_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_index: torch.Tensor
    send_counts: tuple[int, ...] | None
    recv_counts: tuple[int, ...] | None
    num_recv_tokens: int
    slots_per_rank: int
    recv_row_of_slot: torch.Tensor | None
    num_tokens: int
    block_counts_send: torch.Tensor | None = None
    block_counts_recv: torch.Tensor | None = None


class DispatchOutputs:
    """Filled by ``dispatch_issue`` before its collectives complete (values valid after finish)."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None = None
    recv_topk_idx: torch.Tensor | None = None
    recv_topk_weights: torch.Tensor | None = None
    num_recv_tokens_per_expert_list: list[int] | None = None
    handle: DispatchHandle


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _send_rows(coll: Collectives, src: torch.Tensor, handle: DispatchHandle) -> tuple[torch.Tensor, Callable[[], None]]:
    """Permute ``src`` [T, C] by the handle, start the all-to-all; returns (recv rows, finish step)."""
    src = _bytes(src)
    width = src.shape[1]
    if handle.slots_per_rank == 0:
        send = torch.empty(sum(handle.send_counts), width, dtype=src.dtype, device=src.device)
        scatter_rows(src, handle.send_index, send)
        recv = torch.empty(handle.num_recv_tokens, width, dtype=src.dtype, device=src.device)
        coll.all_to_all(recv, send, list(handle.recv_counts), list(handle.send_counts))
        return recv, lambda: None
    num_slots = handle.send_index.shape[1] * handle.slots_per_rank
    # empty slots travel uninitialised: the receiver never reads them
    send = torch.empty(num_slots, width, dtype=src.dtype, device=src.device)
    scatter_rows(src, handle.send_index, send)
    landing = torch.empty(num_slots, width, dtype=src.dtype, device=src.device)
    coll.all_to_all_blocks(landing, send, handle.block_counts_send)
    out = torch.zeros(handle.num_recv_tokens, width, dtype=src.dtype, device=src.device)

    def finish() -> None:
        scatter_rows(landing, handle.recv_row_of_slot.unsqueeze(1), out)

    return out, finish


def _return_rows(coll: Collectives, rows: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Send received rows [N, C] back to their origins; returns the origin's rows in send-buffer order."""
    width = rows.shape[1]
    if handle.slots_per_rank == 0:
        back = torch.empty(sum(handle.send_counts), width, dtype=rows.dtype, device=rows.device)
        coll.all_to_all(back, rows.contiguous(), list(handle.send_counts), list(handle.recv_counts))
        return back
    packed = gather_reduce(rows.contiguous(), handle.recv_row_of_slot.unsqueeze(1))
    back = torch.empty_like(packed)
    coll.all_to_all_blocks(back, packed, handle.block_counts_recv)
    return back


def _side_columns(x_scales, topk_idx, topk_weights, num_tokens, device) -> torch.Tensor:
    """int32 side rows: [scales (fp32 bits) | top-k ids | top-k weights (fp32 bits) | source index]."""
    cols = []
    if x_scales is not None:
        cols.append(x_scales.contiguous().view(torch.int32))
    if topk_idx is not None:
        cols.append(topk_idx.to(torch.int32))
    if topk_weights is not None:
        cols.append(topk_weights.contiguous().view(torch.int32))
    cols.append(torch.arange(num_tokens, dtype=torch.int32, device=device).unsqueeze(1))
    return torch.cat(cols, dim=1)


def dispatch_issue(
    rank: int, num_ranks: int, x: torch.Tensor, x_scales: torch.Tensor | None, handle: DispatchHandle | None,
    num_tokens_per_rank: torch.Tensor | None, is_token_in_rank: torch.Tensor | None,
    num_tokens_per_expert: torch.Tensor | None, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
    expert_alignment: int, num_worst_tokens: int, result: DispatchOutputs,
) -> Callable[[Collectives], Finish]:
    """The issue step of a normal dispatch (see the module docstring); fills ``result``."""
    device = x.device
    num_tokens, hidden = x.shape

    given_handle = handle is not None

    def issue(coll: Collectives) -> Finish:
        nonlocal handle
        steps: list[Callable[[], None]] = []
        fill_layout = None
        if handle is None:
            handle, fill_layout = _new_layout(coll, rank, num_ranks, num_tokens_per_rank, is_token_in_rank,
                                              num_tokens_per_expert, topk_idx, expert_alignment, num_worst_tokens, result)
        result.handle = handle
        recv_x, step = _send_rows(coll, x, handle)
        steps.append(step)
        result.recv_x = recv_x.view(x.dtype) if x.dtype != recv_x.dtype else recv_x
        side_src = _side_columns(x_scales, topk_idx, topk_weights, num_tokens, device)
        side, step = _send_rows(coll, side_src, handle)
        steps.append(step)
        n = handle.num_recv_tokens
        groups = x_scales.shape[1] if x_scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        if x_scales is not None:
            result.recv_scales = torch.empty(n, groups, dtype=torch.float32, device=device)
        if topk_idx is not None:
            result.recv_topk_idx = torch.empty(n, k, dtype=topk_idx.dtype, device=device)
        if topk_weights is not None:
            result.recv_topk_weights = torch.empty(n, k, dtype=torch.float32, device=device)
        experts_per_rank = (num_tokens_per_expert.numel() // num_ranks) if num_tokens_per_expert is not None else 0

        def finish() -> list[torch.Tensor]:
            if fill_layout is not None:
                fill_layout()
            for s in steps:
                s()
            col = 0
            if result.recv_scales is not None:
                result.recv_scales.copy_(side[:, col : col + groups].view(torch.float32))
                col += groups
            recv_idx = side[:, col : col + k].to(result.recv_topk_idx.dtype) if k else None
            col += k
            recv_w = side[:, col : col + k].contiguous().view(torch.float32) if topk_weights is not None else None
            col += k if topk_weights is not None else 0
            if not given_handle:
                src_idx = side[:, col]
                if handle.slots_per_rank:
                    # rows no slot landed in are padding: source index -1
                    rows = handle.recv_row_of_slot
                    filled = torch.zeros(n + 1, dtype=torch.bool, device=device)
                    filled.scatter_(0, torch.where(rows >= 0, rows, torch.full_like(rows, n)), True)
                    src_idx = torch.where(filled[:n], src_idx, torch.full_like(src_idx, -1))
                handle.recv_src_idx.copy_(src_idx)
            if recv_idx is not None:
                if handle.slots_per_rank:
                    # padding rows arrive as zeros; mark them "no expert"
                    pad = handle.recv_src_idx < 0
                    recv_idx = recv_idx.masked_fill(pad.unsqueeze(1), -1)
                local_idx, local_w = localize_topk(recv_idx, recv_w, rank, experts_per_rank)
                result.recv_topk_idx.copy_(local_idx)
                if local_w is not None:
                    result.recv_topk_weights.copy_(local_w)
            outs = [result.recv_x, result.recv_scales, result.recv_topk_idx, result.recv_topk_weights,
                    handle.rank_prefix_matrix, handle.recv_src_idx]
            return [t for t in outs if t is not None]

        return finish

    return issue


def _check_gathered(table: torch.Tensor, num_ranks: int, num_experts: int) -> None:
    """Raise on every rank if any rank's layout arguments are inconsistent (see ``_new_layout``)."""
    for r in range(num_ranks):
        row = table[r]
        counts, sums = row[:num_ranks], row[num_ranks + num_experts: 2 * num_ranks + num_experts]
        lo, hi = int(row[-2]), int(row[-1])
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx on rank {r} holds expert ids in [{lo}, {hi}]; they must be -1 (no expert) "
                             f"or in [0, {num_experts})")
        if not torch.equal(counts, sums):
            raise ValueError(f"num_tokens_per_rank on rank {r} ({counts.tolist()}) disagrees with its is_token_in_rank "
                             f"column sums ({sums.tolist()})")


def _new_layout(coll, rank, num_ranks, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                expert_alignment, num_worst_tokens, result):
    """Exchange counts and build the handle; returns (handle, step that completes it or None)."""
    device = is_token_in_rank.device
    num_tokens = is_token_in_rank.shape[0]
    num_experts = num_tokens_per_expert.numel()
    experts_per_rank = num_experts // num_ranks
    if num_worst_tokens == 0:
        # Every rank's counts, its mask's column sums and its expert-id range travel together, so a
        # bad argument on any rank is seen, and raised, by all ranks at once (a one-sided raise
        # would leave the others waiting in the next collective).
        if topk_idx is not None and topk_idx.numel():
            id_range = torch.stack(torch.aminmax(topk_idx)).to(torch.int32)
        else:
            id_range = torch.tensor([-1, -1], dtype=torch.int32, device=device)
        local = torch.cat([num_tokens_per_rank.to(torch.int32), num_tokens_per_expert.to(torch.int32),
                           is_token_in_rank.sum(0, dtype=torch.int32), id_range])
        gathered = torch.empty(num_ranks * local.numel(), dtype=torch.int32, device=device)
        coll.all_gather(gathered, local)
        coll.wait()
        table = gathered.view(num_ranks, -1).cpu()  # the host sync of normal mode
        _check_gathered(table, num_ranks, num_experts)
        mine = table[rank]
        send_counts = tuple(mine[:num_ranks].tolist())
        recv_counts = tuple(table[:, rank].tolist())
        per_expert = table[:, num_ranks + rank * experts_per_rank: num_ranks + (rank + 1) * experts_per_rank].sum(0)
        aligned = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment
        result.num_recv_tokens_per_expert_list = aligned.tolist()
        offsets = torch.tensor([0, *send_counts[:-1]], dtype=torch.int64).cumsum(0).to(device)
        num_recv = sum(recv_counts)
        handle = DispatchHandle(
            rank_prefix_matrix=table[:, :num_ranks].cumsum(0).to(torch.int32).to(device),
            recv_src_idx=torch.empty(num_recv, dtype=torch.int32, device=device),
            is_token_in_rank=is_token_in_rank,
            send_index=send_index_from_mask(is_token_in_rank, offsets),
            send_counts=send_counts, recv_counts=recv_counts, num_recv_tokens=num_recv,
            slots_per_rank=0, recv_row_of_slot=None, num_tokens=num_tokens,
        )
        return handle, None
    slots = num_worst_tokens // num_ranks
    gathered = torch.empty(num_ranks * num_ranks, dtype=torch.int32, device=device)
    coll.all_gather(gathered, num_tokens_per_rank.to(torch.int32))
    result.num_recv_tokens_per_expert_list = []
    offsets = torch.arange(num_ranks, dtype=torch.int64, device=device) * slots
    handle = DispatchHandle(
        rank_prefix_matrix=torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=device),
        recv_src_idx=torch.empty(num_worst_tokens, dtype=torch.int32, device=device),
        is_token_in_rank=is_token_in_rank,
        send_index=send_index_from_mask(is_token_in_rank, offsets),
        send_counts=None, recv_counts=None, num_recv_tokens=num_worst_tokens,
        slots_per_rank=slots, recv_row_of_slot=torch.empty(num_ranks * slots, dtype=torch.int64, device=device),
        num_tokens=num_tokens,
        block_counts_send=num_tokens_per_rank.to(torch.int64),
        block_counts_recv=torch.empty(num_ranks, dtype=torch.int64, device=device),
    )

    def fill() -> None:
        # Runs after the collectives: counts are on the device, nothing goes to the host.
        matrix = gathered.view(num_ranks, num_ranks)
        handle.rank_prefix_matrix.copy_(matrix.cumsum(0))
        counts = matrix[:, rank].to(torch.int64)
        handle.block_counts_recv.copy_(counts)
        starts = torch.cumsum(counts, 0) - counts
        i = torch.arange(slots, device=device, dtype=torch.int64).unsqueeze(0)
        row = starts.unsqueeze(1) + i
        ok = (i < counts.unsqueeze(1)) & (row < num_worst_tokens)
        handle.recv_row_of_slot.copy_(torch.where(ok, row, torch.full_like(row, -1)).view(-1))

    return handle, fill


def combine_issue(
    x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None,
    bias: tuple[torch.Tensor, ...], out: list,
) -> Callable[[Collectives], Finish]:
    """The issue step of a normal combine: rows back to their origins, summed there (+ bias)."""

    def issue(coll: Collectives) -> Finish:
        back = _return_rows(coll, x, handle)
        back_w = _return_rows(coll, topk_weights, handle) if topk_weights is not None else None
        combined = torch.empty(handle.num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
        combined_w = (torch.empty(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32, device=x.device)
                      if topk_weights is not None else None)
        out[:] = [combined, combined_w]

        def finish() -> list[torch.Tensor]:
            gather_reduce(back, handle.send_index, bias=bias if bias else None, out=combined)
            if back_w is not None:
                gather_reduce(back_w, handle.send_index, out=combined_w)
            return [t for t in (combined, combined_w) if t is not None]

        return finish

    return issue
