"""Balanced packing with an equal number of items per pack: the original's greedy and ours.

Both take ``weight [X, n]`` (X independent rows: layers, or layers x nodes) and ``num_packs`` M
with ``n % M == 0``, and return ``(pack_index [X, n], rank_in_pack [X, n])`` int64: item i of
row x goes to pack ``pack_index[x, i]`` as its ``rank_in_pack[x, i]``-th item.
"""

from __future__ import annotations

import torch

__all__ = ["greedy_pack", "round_pack"]


def _trivial(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = weight.shape
    return torch.arange(n, dtype=torch.int64).expand(rows, n).clone(), torch.zeros(rows, n, dtype=torch.int64)


def greedy_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original EPLB's packing, bit for bit: longest-processing-time with a count cap.

    Items are visited heaviest first (``torch.sort`` descending, the original's order); each goes
    to the lightest pack that still has room, the lowest index on a tie. Pack loads accumulate in
    float32 in visiting order, as the original's do, so near-ties resolve the same way.

    The loop runs over the n items and is vectorised over the X rows: one Python step per item
    instead of the original's X * n * M.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return _trivial(weight)
    weight = weight.float()
    order = weight.sort(-1, descending=True).indices
    sorted_w = weight.gather(1, order)
    pack_index = torch.empty(rows, n, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, n, dtype=torch.int64)
    load = torch.zeros(rows, num_packs, dtype=torch.float32)
    count = torch.zeros(rows, num_packs, dtype=torch.int64)
    full = torch.full((rows, num_packs), float("inf"), dtype=torch.float32)
    ar = torch.arange(rows)
    for k in range(n):
        # argmin returns the first minimum, the original's `min(..., key=...)` tie rule.
        pack = torch.where(count < per_pack, load, full).argmin(1)
        item = order[:, k]
        pack_index[ar, item] = pack
        rank_in_pack[ar, item] = count[ar, pack]
        load[ar, pack] += sorted_w[:, k]
        count[ar, pack] += 1
    return pack_index, rank_in_pack


def round_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised greedy packing: n / M rounds of M items instead of n single steps.

    Round r takes the next M heaviest items and gives the heaviest to the currently lightest
    pack, the second heaviest to the second lightest, and so on; every pack receives exactly one
    item per round, so the count constraint holds by construction. With two items per pack this
    is the optimal "heaviest with lightest" pairing; in general it is close to the item-by-item
    greedy, and :func:`openinfra.parallel.eplb.refine.refine_placement` polishes it.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return _trivial(weight)
    weight = weight.to(torch.float64)
    order = weight.sort(dim=-1, descending=True, stable=True).indices.view(rows, per_pack, num_packs)
    sorted_w = weight.gather(1, order.view(rows, n)).view(rows, per_pack, num_packs)
    pack_index = torch.empty(rows, n, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, n, dtype=torch.int64)
    load = torch.zeros(rows, num_packs, dtype=torch.float64)
    for r in range(per_pack):
        lightest = load.argsort(dim=1, stable=True)  # [rows, M]: k-th lightest pack gets the k-th heaviest item
        pack_index.scatter_(1, order[:, r], lightest)
        rank_in_pack.scatter_(1, order[:, r], torch.full_like(lightest, r))
        load.scatter_add_(1, lightest, sorted_w[:, r])
    return pack_index, rank_in_pack
