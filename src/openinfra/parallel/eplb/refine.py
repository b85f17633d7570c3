"""Local search on a placement: swaps and replica moves that lower the hottest GPU.

State per row (a layer, or a (layer, node) pair): ``slot2exp [X, P]`` GPU-major (GPU g owns
slots ``[g*S, (g+1)*S)``), expert loads ``weight [X, n]``; a replica carries its expert's load
divided by the expert's replica count. Each iteration looks at every row's hottest GPU and
applies, in all rows at once, the best move that lowers that GPU's load without making any GPU
it touches as hot:

* swap: exchange a replica on the hottest GPU with a lighter replica on another GPU
  (the counts per GPU stay equal);
* replica move (tried where no swap helps): one replica of an expert that has two or more
  becomes an extra replica of another expert, either an expert on the hottest GPU gaining a
  copy, or a surplus copy on the hottest GPU going to a hot expert elsewhere. Replica counts are
  thus chosen jointly with the placement; every touched GPU's new load is computed exactly.

Every accepted move strictly lowers the row's (max load, number of GPUs at the max) pair, so the
search never makes a row worse and stops; it is also capped at ``max_iters`` iterations.
With ``target`` / ``active`` it doubles as the migration-aware search (see ``migration.py``).
"""

from __future__ import annotations

import torch

__all__ = ["refine_placement", "placement_loads"]

_REL_TOL = 1e-9  # a move must gain more than this fraction of the max load (float noise)


def placement_loads(weight: torch.Tensor, slot2exp: torch.Tensor, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count [X, n], slot load [X, P], GPU load [X, G]) in float64 for a GPU-major placement."""
    count = torch.zeros(weight.shape, dtype=torch.int64).scatter_add_(1, slot2exp, torch.ones_like(slot2exp))
    slot_w = (weight / count.clamp(min=1)).gather(1, slot2exp)
    return count, slot_w, slot_w.view(slot2exp.shape[0], num_gpus, -1).sum(-1)


def _best_swap(slot_w: torch.Tensor, load: torch.Tensor, peak: torch.Tensor, hot: torch.Tensor, per_gpu: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best swap per row: (new max of the two GPUs involved [X], flat index i*P + j [X]).

    Handing load d from the hottest GPU (load ``peak``) to a GPU of load L gives the pair the
    new max ``max(peak - d, L + d) = (peak + L) / 2 + |d - (peak - L) / 2|``. Swaps that do not
    help (d <= 0, or the partner on the hottest GPU itself, where L = peak) score >= peak and
    are rejected by the caller's ``< peak`` test, so no masks are needed.
    """
    rows, slots = slot_w.shape
    mine = slot_w.view(rows, -1, per_gpu)[torch.arange(rows), hot]  # [X, S] replicas on the hottest GPU
    other = load.repeat_interleave(per_gpu, dim=1)  # [X, P] load of each slot's GPU
    centre = (peak.unsqueeze(1) + other).mul_(0.5)  # [X, P]
    half_gap = (peak.unsqueeze(1) - other).mul_(0.5)
    score = mine.unsqueeze(2) - slot_w.unsqueeze(1)  # [X, S, P]: d
    score.sub_(half_gap.unsqueeze(1)).abs_().add_(centre.unsqueeze(1))
    return score.view(rows, -1).min(1)


def _eval_replica_moves(weight: torch.Tensor, slot2exp: torch.Tensor, count: torch.Tensor, load: torch.Tensor,
                        gain_e: torch.Tensor, donor: torch.Tensor, per_gpu: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every (gainer expert, donor slot) pair: the donor slot's replica (of an expert f
    with >= 2 copies) becomes an extra replica of the gainer e.

    gain_e [X, A] expert ids, donor [X, B] slot ids. Returns the best per row: (max load over the
    GPUs the move touches [X] (inf: no valid move), gainer expert [X], donor slot [X]).
    """
    rows, slots = slot2exp.shape
    gpus = slots // per_gpu
    layout = slot2exp.view(rows, gpus, per_gpu)
    c_e = count.gather(1, gain_e).to(weight.dtype)
    w_e = weight.gather(1, gain_e)
    f = slot2exp.gather(1, donor)
    c_f = count.gather(1, f).to(weight.dtype)
    w_f = weight.gather(1, f)
    valid_f = c_f >= 2
    d_e = w_e / (c_e + 1) - w_e / c_e  # [X, A] change of each e-replica's load (< 0)
    f_after = torch.where(valid_f, w_f / (c_f - 1).clamp(min=1), w_f)  # [X, B] f's replicas afterwards
    d_f = f_after - w_f / c_f  # [X, B] (> 0)
    # Copies per GPU of each gainer and each donor expert.
    on_gpu_e = (layout.unsqueeze(1) == gain_e.view(rows, -1, 1, 1)).sum(-1).to(weight.dtype)  # [X, A, G]
    on_gpu_f = (layout.unsqueeze(1) == f.view(rows, -1, 1, 1)).sum(-1).to(weight.dtype)  # [X, B, G]
    donor_gpu = torch.nn.functional.one_hot(donor // per_gpu, gpus).to(weight.dtype)  # [X, B, G]
    # The donor slot ends up holding an e replica (w_e/(c_e+1)) instead of an f replica
    # (which the d_f term already raised to w_f/(c_f-1)).
    swap_in = (w_e / (c_e + 1)).unsqueeze(2) - f_after.unsqueeze(1)  # [X, A, B]
    new = (load.view(rows, 1, 1, gpus)
           + on_gpu_e.unsqueeze(2) * d_e.view(rows, -1, 1, 1)
           + on_gpu_f.unsqueeze(1) * d_f.view(rows, 1, -1, 1)
           + donor_gpu.unsqueeze(1) * swap_in.unsqueeze(3))  # [X, A, B, G]
    # Score only the GPUs the move touches (as for swaps): another GPU tied at the max stays
    # where it was, and the next iteration works on it.
    touched = (on_gpu_e.unsqueeze(2) + on_gpu_f.unsqueeze(1) + donor_gpu.unsqueeze(1)) > 0
    new = new.masked_fill(~touched, float("-inf")).amax(-1)  # [X, A, B]
    bad = ~valid_f.unsqueeze(1) | (gain_e.unsqueeze(2) == f.unsqueeze(1))
    new = new.masked_fill(bad, float("inf"))
    best, flat = new.view(rows, -1).min(1)
    b = donor.shape[1]
    return best, gain_e.gather(1, (flat // b).view(-1, 1)).squeeze(1), donor.gather(1, (flat % b).view(-1, 1)).squeeze(1)


def _best_replica_move(weight: torch.Tensor, slot2exp: torch.Tensor, count: torch.Tensor, load: torch.Tensor,
                       hot: torch.Tensor, per_gpu: int, candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best replica move per row: (new max load of the touched GPUs [X], gainer expert [X], donor slot [X]).

    Two families, both relieving the hottest GPU:
    * an expert on the hottest GPU gains a replica, taken from one of the ``candidates`` donor
      slots whose expert's remaining copies would grow least;
    * a multi-replica expert on the hottest GPU gives that replica up to one of the
      ``candidates`` experts with the highest load per replica (e.g. 9 copies of a hot expert
      on 8 GPUs put two on one GPU; 8 copies do not).
    """
    rows, slots = slot2exp.shape
    hot_slots = hot.unsqueeze(1) * per_gpu + torch.arange(per_gpu)  # [X, S]
    on_hot = slot2exp.gather(1, hot_slots)
    c_all = count.gather(1, slot2exp)
    w_all = weight.gather(1, slot2exp)
    grow = torch.where(c_all >= 2, w_all / (c_all - 1).clamp(min=1), torch.full_like(w_all, float("inf")))
    k = min(candidates, slots)
    donors = grow.topk(k, dim=1, largest=False).indices  # [X, K]
    best_a, gain_a, donor_a = _eval_replica_moves(weight, slot2exp, count, load, on_hot, donors, per_gpu)
    per_replica = weight / count.clamp(min=1)
    gainers = per_replica.masked_fill(count == 0, float("-inf")).topk(min(candidates, weight.shape[1]), dim=1).indices
    best_b, gain_b, donor_b = _eval_replica_moves(weight, slot2exp, count, load, gainers, hot_slots, per_gpu)
    use_b = best_b < best_a
    return torch.where(use_b, best_b, best_a), torch.where(use_b, gain_b, gain_a), torch.where(use_b, donor_b, donor_a)


def refine_placement(weight: torch.Tensor, slot2exp: torch.Tensor, num_gpus: int, *, replica_moves: bool = True,
                     max_iters: int | None = None, candidates: int = 16, target: torch.Tensor | None = None,
                     active: torch.Tensor | None = None) -> torch.Tensor:
    """Improve a GPU-major placement in place of all rows at once.

    Args:
        weight: [X, n] expert loads (any real dtype; computed in float64).
        slot2exp: [X, P] int64 expert of each slot, GPU-major, P % num_gpus == 0.
        num_gpus: GPUs per row (G); each owns P / G consecutive slots.
        replica_moves: also move replicas between experts (changes replica counts; every
            expert keeps at least one replica).
        max_iters: iteration cap (default 4 * G + 16).
        candidates: donor slots (and gainer experts) examined per row for replica moves.
        target: [X] optional max-load target per row: a row stops once its max GPU load is
            at or below it (the migration-aware mode's "good enough").
        active: [X] bool, rows to work on (default all).

    Returns:
        The refined slot2exp [X, P] (a new tensor); the multiset of experts per row changes only
        through replica moves, every expert keeps >= 1 replica, and each GPU keeps P / G slots.
    """
    weight = weight.to(torch.float64)
    slot2exp = slot2exp.clone()
    rows, slots = slot2exp.shape
    per_gpu = slots // num_gpus
    if per_gpu * num_gpus != slots:
        raise ValueError(f"slot2exp has {slots} slots, not a multiple of num_gpus={num_gpus}")
    if num_gpus == 1:
        return slot2exp  # one GPU: nothing to balance
    if max_iters is None:
        max_iters = 4 * num_gpus + 16
    live = torch.ones(rows, dtype=torch.bool) if active is None else active.clone()
    # Rows where no swap helps wait here for a (costlier) replica-move evaluation, done in
    # batches: when no row is left swapping, or every 4th iteration.
    stuck = torch.zeros(rows, dtype=torch.bool)
    # Replica moves need a redundant slot somewhere (P > n); the donor candidates are bounded
    # by the replicas of multi-replica experts, at most 2 * (P - n).
    replica_moves = replica_moves and slots > weight.shape[1]
    candidates = max(1, min(candidates, slots, 2 * max(slots - weight.shape[1], 0)))
    for it in range(max_iters):
        if replica_moves and bool(stuck.any()) and (not bool(live.any()) or it % 4 == 3):
            q = stuck.nonzero().squeeze(1)
            w, s2e = weight[q], slot2exp[q]
            count, _, load = placement_loads(w, s2e, num_gpus)
            peak, hot = load.max(1)
            move_new, gainer, donor = _best_replica_move(w, s2e, count, load, hot, per_gpu, candidates)
            ok = move_new < peak * (1 - _REL_TOL)
            if bool(ok.any()):
                r = ok.nonzero().squeeze(1)
                s2e[r, donor[r]] = gainer[r]
                slot2exp[q] = s2e
            stuck[q] = False
            live[q[ok]] = True  # moved rows go back to swapping
        idx = live.nonzero().squeeze(1)
        if idx.numel() == 0:
            if not (replica_moves and bool(stuck.any())):
                break
            continue
        # Work on the rows still improving only: most converge in a few iterations.
        w, s2e = weight[idx], slot2exp[idx]
        count, slot_w, load = placement_loads(w, s2e, num_gpus)
        peak, hot = load.max(1)
        keep = torch.ones_like(peak, dtype=torch.bool) if target is None else peak > target[idx]
        swap_new, swap_flat = _best_swap(slot_w, load, peak, hot, per_gpu)
        ok = keep & (swap_new < peak * (1 - _REL_TOL))
        if bool(ok.any()):
            r = ok.nonzero().squeeze(1)
            i = hot[r] * per_gpu + swap_flat[r] // slots
            j = swap_flat[r] % slots
            a, b = s2e[r, i].clone(), s2e[r, j].clone()
            s2e[r, i], s2e[r, j] = b, a
            slot2exp[idx] = s2e
        live[idx] = ok
        stuck[idx] = keep & ~ok  # at a swap-local optimum but not at its target
    return slot2exp
