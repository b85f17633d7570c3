"""Our DualPipeV against torch.distributed.pipelining's ScheduleDualPipeV and ScheduleZBVZeroBubble.

Same model (2*PP MLP stages in a V), same ranks, same micro-batches: the three schedules must
produce the same per-micro-batch losses and the same gradients (calc_diff < 1e-13).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from openinfra.parallel.dualpipe import DualPipeV, calc_diff
from openinfra.parallel.dualpipe.toy import MLPStage, mse_criterion

pytestmark = pytest.mark.distributed

MB, SEQ, HIDDEN, CHUNKS = 2, 3, 8, 8


def _torch_stage(ours: MLPStage) -> nn.Module:
    """The same maths with stock nn.Linear layers (torch's schedules split B/W themselves)."""
    m = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN, bias=False), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN, bias=False))
    m[0].weight.data.copy_(ours.linear1.weight.data)
    m[2].weight.data.copy_(ours.linear2.weight.data)
    return m


def _sizes(rank: int, world: int):
    """PP 3 on all ranks, then PP 2 on ranks 0-1 (a subgroup): one spawn for both sizes."""
    pair = dist.new_group([0, 1])
    out = {3: _run(None)}
    if rank < 2:
        out[2] = _run(pair)
    return out


def _run(group):
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV, ScheduleZBVZeroBubble

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(7)
    num_stages = 2 * world
    full = [MLPStage(HIDDEN) for _ in range(num_stages)]
    x = torch.randn(CHUNKS * MB, SEQ, HIDDEN)
    y = torch.randn(CHUNKS * MB, SEQ, HIDDEN)
    idx = (rank, num_stages - 1 - rank)

    ours = nn.ModuleList([full[i] for i in idx])
    # p2p shapes given per call here (the other tests give them to the constructor)
    pipe = DualPipeV(tuple(ours), process_group=group)
    loss, _ = pipe.step(x if rank == 0 else None, num_chunks=CHUNKS, criterion=mse_criterion,
                        labels=(y if rank == 0 else None,), p2p_shapes=[(MB, SEQ, HIDDEN)], p2p_dtypes=torch.float32)
    our_grads = [p.grad.clone() for m in ours for p in m.parameters()]
    result = {"ours_loss": None if loss is None else loss.tolist()}

    for name, cls in (("ScheduleDualPipeV", ScheduleDualPipeV), ("ScheduleZBVZeroBubble", ScheduleZBVZeroBubble)):
        mods = [_torch_stage(full[i]) for i in idx]
        stages = [PipelineStage(m, i, num_stages, torch.device("cpu"), group=group) for m, i in zip(mods, idx)]
        sched = cls(stages, n_microbatches=CHUNKS, loss_fn=mse_criterion, scale_grads=False)
        losses: list[torch.Tensor] = []
        if rank == 0:
            sched.step(x, target=y, losses=losses)
        else:
            sched.step()
        grads = [p.grad for m in mods for p in m.parameters()]
        diffs = [calc_diff(a, b) for a, b in zip(our_grads, grads)]
        assert max(diffs) < 1e-13, (name, diffs)
        if rank == 0:
            theirs = torch.stack([l.detach() for l in losses])
            assert torch.allclose(theirs, loss, rtol=0, atol=1e-7), (name, theirs, loss)
            result[name] = theirs.tolist()
        result[name + "_diff"] = max(diffs)
    return result


def test_same_gradients_as_torch_pipelining(distributed):
    by_rank = distributed(_sizes, 3, timeout=170)
    for world in (3, 2):
        results = [by_rank[r][world] for r in range(world)]
        assert len(results[0]["ours_loss"]) == CHUNKS
        for name in ("ScheduleDualPipeV", "ScheduleZBVZeroBubble"):
            assert all(r[name + "_diff"] < 1e-13 for r in results)
            assert results[0][name] == pytest.approx(results[0]["ours_loss"], abs=1e-7)
