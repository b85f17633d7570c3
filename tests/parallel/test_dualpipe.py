"""DualPipe / DualPipeV against a single-process reference (DeepSeek's correctness protocol).

Losses and outputs must be bitwise equal (``torch.equal``), gradients within calc_diff < 1e-13,
for DualPipe PP in {2, 4} and DualPipeV PP in {1, 2, 3, 4} with 20 micro-batches, in training
and forward-only mode, with and without ``overlapped_forward_backward``; the recorded schedule
must have the phase counts the formulas give.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from openinfra.parallel.dualpipe import (
    DualPipe, DualPipeV, ScheduleRecorder, calc_diff, compute_counts, phase_counts,
)
from openinfra.parallel.dualpipe.toy import MLPStage, mse_criterion, reference_step

pytestmark = pytest.mark.distributed

MB, SEQ, HIDDEN, CHUNKS = 2, 3, 8, 20


class PlainStage(nn.Module):
    """Same maths as MLPStage but without overlapped_forward_backward (the F-then-B path)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inner = MLPStage(hidden)

    def forward(self, x):
        return self.inner(x)


def _make_local(full: nn.Sequential, idx: tuple[int, int], overlapped: bool):
    mods = []
    for i in idx:
        if overlapped:
            mods.append(copy.deepcopy(full[i]))
        else:
            m = PlainStage(HIDDEN)
            m.inner.load_state_dict(full[i].state_dict())
            mods.append(m)
    return nn.Sequential(*mods)


def _sizes_rank(rank: int, world: int, kind: str):
    """Every pipeline size of one schedule inside one set of 4 ranks (spawning is the cost):
    DualPipe PP 4 and PP 2 (twice, side by side); DualPipeV PP 4, PP 3 (+ PP 1 on the spare rank)
    and PP 2 (twice). Subgroups exercise ``process_group``; the second PP-2 pipeline numbers its
    ranks backwards through ``rank_mapping``."""
    assert world == 4
    g3 = dist.new_group([0, 1, 2])
    g2 = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    g1 = [dist.new_group([r]) for r in range(4)]
    pair = g2[rank // 2]
    mapping = [0, 1] if rank < 2 else [1, 0]
    out = {}
    if kind == "dualpipe":
        out[4] = {ov: _run_one(None, kind, ov) for ov in (True, False)}
        out[2] = {True: _run_one(pair, kind, True, mapping)}
    else:
        out[4] = {True: _run_one(None, kind, True)}
        if rank < 3:
            out[3] = {ov: _run_one(g3, kind, ov) for ov in (True, False)}
        else:
            out[1] = {True: _run_one(g1[3], kind, True)}
        out[2] = {True: _run_one(pair, kind, True, mapping)}
    return out


def _run_one(group, kind: str, overlapped: bool, mapping=None, num_chunks: int = CHUNKS):
    group_rank, world = dist.get_rank(group), dist.get_world_size(group)
    rank = mapping[group_rank] if mapping else group_rank  # pipeline rank
    mirror_group_rank = (mapping or list(range(world))).index(world - 1 - rank)
    torch.manual_seed(233)
    num_stages = world if kind == "dualpipe" else 2 * world
    full = nn.Sequential(*[MLPStage(HIDDEN) for _ in range(num_stages)])
    x = torch.randn(num_chunks * MB, SEQ, HIDDEN)
    y = torch.randn(num_chunks * MB, SEQ, HIDDEN)
    loss_ref, out_ref = reference_step(x, y, full, num_chunks)

    if kind == "dualpipe":
        idx = (rank, world - 1 - rank)
    else:
        idx = (rank, num_stages - 1 - rank)
    local = _make_local(full, idx, overlapped)
    rec = ScheduleRecorder()
    cls = DualPipe if kind == "dualpipe" else DualPipeV
    pipe = cls(local, process_group=group, rank_mapping=mapping, p2p_shapes=[(MB, SEQ, HIDDEN)],
               p2p_dtypes=torch.float32, recorder=rec)

    if kind == "dualpipe":
        if rank == 0:
            inp, lab, want_loss, want_out = x.chunk(2)[0], y.chunk(2)[1], loss_ref.chunk(2)[1], out_ref.chunk(2)[1]
        elif rank == world - 1:
            inp, lab, want_loss, want_out = x.chunk(2)[1], y.chunk(2)[0], loss_ref.chunk(2)[0], out_ref.chunk(2)[0]
        else:
            inp = lab = want_loss = want_out = None
    else:
        if rank == 0:
            inp, lab, want_loss, want_out = x, y, loss_ref, out_ref
        else:
            inp = lab = want_loss = want_out = None

    loss, outputs = pipe.step(inp, num_chunks=num_chunks, criterion=mse_criterion, labels=(lab,))
    if want_loss is not None:
        assert torch.equal(loss, want_loss), (loss, want_loss)
    else:
        assert loss is None
    assert outputs is None
    counts = rec.counts()
    per_phase = {}
    for e in rec.events:
        if e.kind in ("F", "B", "W", "F&B"):
            per_phase.setdefault(e.phase, 0)
            per_phase[e.phase] += 1

    # Gradients: with DualPipe both copies of a stage (here and on the mirror rank) add up.
    params = [p for m in local for p in (m.parameters())]
    if kind == "dualpipe":
        n0 = len(list(local[0].parameters()))
        for p0, p1 in zip(list(local[0].parameters()), list(local[1].parameters())):
            g0 = [torch.empty_like(p0.grad) for _ in range(world)]
            g1 = [torch.empty_like(p1.grad) for _ in range(world)]
            dist.all_gather(g0, p0.grad, group=group)
            dist.all_gather(g1, p1.grad, group=group)
            p0.grad += g1[mirror_group_rank]
            p1.grad += g0[mirror_group_rank]
        assert n0 * 2 == len(params)
    ref_params = [p for i in idx for p in full[i].parameters()]
    diffs = [calc_diff(p.grad, r.grad) for p, r in zip(params, ref_params)]
    assert max(diffs) < 1e-13, diffs
    local.zero_grad()

    # Forward only: outputs and losses bitwise equal too.
    with torch.no_grad():
        loss, outputs = pipe.step(inp, num_chunks=num_chunks, criterion=mse_criterion, labels=(lab,), return_outputs=True)
    if want_loss is not None:
        assert torch.equal(loss, want_loss)
        assert torch.equal(outputs, want_out)
    else:
        assert loss is None and outputs is None
    fwd_counts = rec.counts()
    out = {"counts": counts, "per_phase": per_phase, "fwd_counts": fwd_counts, "max_diff": max(diffs)}
    if overlapped:
        # One more recorded training step, gathered: the whole schedule as every rank ran it.
        rec.enabled = True
        pipe.step(inp, num_chunks=num_chunks, criterion=mse_criterion, labels=(lab,))
        events = rec.gather(group)
        if rank == 0:
            out["trace"] = rec.trace(events)
    return out


def _expected_per_phase(kind: str, world: int, rank: int, overlapped: bool) -> dict[int, int]:
    n = list(phase_counts(kind, world, CHUNKS, rank).values())
    tip = (kind == "dualpipev" and rank == world - 1) or (kind == "dualpipe" and rank in (world // 2 - 1, world // 2))
    pair = 1 if overlapped else 2  # compute events per F&B step
    exp = {
        1: n[0], 2: 2 * n[1], 3: 3 * n[2],
        4: 2 * pair * n[3] + ((2 - pair) if tip else 0) if n[3] else 0,
        5: (1 + pair) * n[4], 6: 2 * n[5], 7: 2 * n[6], 8: n[7],
    }
    return {k: v for k, v in exp.items() if v}


# The plain F-then-B path (no overlapped_forward_backward) is checked at one size per schedule.
SIZES = {"dualpipe": {4: (True, False), 2: (True,)}, "dualpipev": {4: (True,), 3: (True, False), 2: (True,), 1: (True,)}}


@pytest.mark.parametrize("kind", ["dualpipe", "dualpipev"])
def test_matches_single_process_reference(distributed, kind):
    by_rank = distributed(_sizes_rank, 4, kind, timeout=170)
    for world, modes in SIZES[kind].items():
        for overlapped in modes:
            # which global ranks ran this size, in pipeline-rank order
            if world == 4:
                members = [[0, 1, 2, 3]]
            elif world == 3:
                members = [[0, 1, 2]]
            elif world == 2:
                members = [[0, 1], [3, 2]]  # the second pair runs with rank_mapping [1, 0]
            else:
                members = [[3]]
            for ranks in members:
                results = [by_rank[g][world][overlapped] for g in ranks]
                for rank, res in enumerate(results):
                    want = compute_counts(kind, world, CHUNKS, rank, overlapped=overlapped)
                    got = {k: res["counts"].get(k, 0) for k in ("F", "B", "W", "F&B")}
                    assert got == want, (world, overlapped, rank, got, want)
                    assert res["per_phase"] == _expected_per_phase(kind, world, rank, overlapped), (world, rank)
                    assert res["max_diff"] < 1e-13
                    # forward-only: one F per micro-batch per arm, no backward work at all
                    per_dir = CHUNKS // 2 if kind == "dualpipe" else CHUNKS
                    assert res["fwd_counts"].get("F", 0) == 2 * per_dir
                    assert not {"B", "W", "F&B"} & set(res["fwd_counts"])
                if overlapped:
                    _check_trace(results[0]["trace"], kind, world)


def _check_trace(trace, kind: str, world: int) -> None:
    """Every send has its recv on the peer; each rank's compute never overlaps itself; stats work."""
    from collections import Counter

    from openinfra.parallel.dualpipe.timeline import bubble_stats

    ev = trace["events"]
    sends = Counter((e["rank"], e["peer"], e["module"]) for e in ev if e["kind"] == "send")
    recvs = Counter((e["peer"], e["rank"], e["module"]) for e in ev if e["kind"] == "recv")
    assert sends == recvs
    # activations + gradients: each non-terminal stage boundary carries 2 messages per micro-batch
    boundaries = (world - 1) * 2 if kind == "dualpipe" else 2 * (world - 1)
    per_dir = CHUNKS // 2 if kind == "dualpipe" else CHUNKS
    assert sum(sends.values()) == boundaries * per_dir * 2
    for r in range(world):
        spans = sorted((e["start_us"], e["end_us"]) for e in ev if e["rank"] == r and e["kind"] in ("F", "B", "W", "F&B"))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    stats = bubble_stats(trace)
    assert stats["ranks"] == world and 0 <= stats["measured_bubble"] < 1
    assert trace["meta"]["schedule"].lower() == kind
