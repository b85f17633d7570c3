"""DualPipeV on CUDA tensors: gloo with two ranks on one GPU (gpu tier) and NCCL over 2 GPUs (multigpu).

Same protocol as the CPU tests: losses bitwise equal to a single-process reference on the same
device, gradients within calc_diff < 1e-13; the MoE stage's overlapped path bitwise equal to
its plain path.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from openinfra.parallel.dualpipe import DualPipeV, calc_diff
from openinfra.parallel.dualpipe.moe import MoEConfig, MoEStage
from openinfra.parallel.dualpipe.toy import MLPStage, mse_criterion, reference_step

MB, SEQ, HIDDEN, CHUNKS = 2, 16, 64, 8


def _mlp_rank(rank: int, world: int, per_rank_gpu: bool):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    dev = torch.device("cuda", rank if per_rank_gpu else 0)
    torch.cuda.set_device(dev)
    torch.manual_seed(233)
    full = nn.Sequential(*[MLPStage(HIDDEN, device=dev) for _ in range(2 * world)])
    x = torch.randn(CHUNKS * MB, SEQ, HIDDEN, device=dev)
    y = torch.randn(CHUNKS * MB, SEQ, HIDDEN, device=dev)
    loss_ref, out_ref = reference_step(x, y, full, CHUNKS)
    idx = (rank, 2 * world - 1 - rank)
    local = [MLPStage(HIDDEN, device=dev) for _ in idx]
    for m, i in zip(local, idx):
        m.load_state_dict(full[i].state_dict())
    pipe = DualPipeV(tuple(local), p2p_shapes=[(MB, SEQ, HIDDEN)])
    assert pipe.device.type == "cuda"
    loss, _ = pipe.step(x if rank == 0 else None, num_chunks=CHUNKS, criterion=mse_criterion,
                        labels=(y if rank == 0 else None,))
    if rank == 0:
        assert torch.equal(loss, loss_ref)
    diffs = [calc_diff(p.grad, r.grad) for m, i in zip(local, idx) for p, r in zip(m.parameters(), full[i].parameters())]
    assert max(diffs) < 1e-13, diffs
    with torch.no_grad():
        loss, out = pipe.step(x if rank == 0 else None, num_chunks=CHUNKS, criterion=mse_criterion,
                              labels=(y if rank == 0 else None,), return_outputs=True)
    if rank == 0:
        assert torch.equal(loss, loss_ref) and torch.equal(out, out_ref)
    return max(diffs)


def _moe_rank(rank: int, world: int):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    cfg = MoEConfig(hidden=64, num_heads=4, num_experts=4, topk=2, expert_hidden=96, num_layers=2)
    idx = (rank, 2 * world - 1 - rank)
    full = [MoEStage(cfg, device=dev) for _ in range(2 * world)]
    local = [MoEStage(cfg, device=dev) for _ in idx]
    for m, i in zip(local, idx):
        m.load_state_dict(full[i].state_dict())
    pipe = DualPipeV(tuple(local), p2p_shapes=[(MB, SEQ, 64)])
    x = torch.randn(CHUNKS * MB, SEQ, 64, device=dev)
    y = torch.randn(CHUNKS * MB, SEQ, 64, device=dev)
    res = []
    for overlap in (True, False):
        pipe.overlapped_forward_backward = overlap
        for m in local:
            m.zero_grad()
        loss, _ = pipe.step(x if rank == 0 else None, num_chunks=CHUNKS, criterion=mse_criterion,
                            labels=(y if rank == 0 else None,))
        res.append((loss, [p.grad.clone() for m in local for p in m.parameters()]))
    if rank == 0:
        assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))
    return True


@pytest.mark.gpu
def test_dualpipev_cuda_tensors_over_gloo(distributed):
    assert max(distributed(_mlp_rank, 2, False, timeout=300)) < 1e-13


@pytest.mark.gpu
def test_moe_overlap_cuda_bitwise(distributed):
    assert all(distributed(_moe_rank, 2, timeout=300))


@pytest.mark.multigpu
def test_dualpipev_nccl_two_gpus():
    from openinfra.testing.distributed import run_on_ranks

    assert max(run_on_ranks(_mlp_rank, 2, True, backend="nccl", timeout=300)) < 1e-13
