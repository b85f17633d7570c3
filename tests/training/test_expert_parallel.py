"""ExpertParallelMoE on 2 gloo ranks against the single-process MoE: outputs and gradients, with and
without padded expert blocks (alignment 4, the GPU kernels' kind of layout); float32, the widest
activation dtype DeepEP moves (the sums run in another order: equal to float32 rounding)."""

import pytest
import torch

from openinfra.model import MoE, get_config
from openinfra.testing.distributed import run_on_ranks

pytestmark = pytest.mark.distributed


def _layer():
    torch.manual_seed(0)
    cfg = get_config("tiny", dim=128, n_routed_experts=8, n_activated_experts=3, n_expert_groups=2, n_limited_groups=2)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.randn(8) * 0.1)
    return moe, cfg


def _on_rank(rank: int, world: int, alignment):
    import torch.distributed as dist

    from openinfra.comm.deep_ep import Buffer
    from openinfra.training.expert_parallel import ExpertParallelMoE

    moe, cfg = _layer()
    x = torch.randn(2 * 11, cfg.dim, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    mine = x[rank * 11:(rank + 1) * 11].clone().requires_grad_()
    ep = ExpertParallelMoE.from_moe(moe, Buffer(dist.group.WORLD), rank, world)
    ep.alignment = alignment
    y = ep(mine)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
    # numpy arrays travel by value (torch tensors would be shared by file descriptor with a process
    # that is about to exit)
    return [t.detach().numpy() for t in (y, mine.grad, ep.experts.w1.grad, ep.gate.weight.grad)]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Normwise: float32 sums of ~100 terms in another order differ by ~1e-6 of the tensor's scale."""
    assert got.shape == want.shape
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert scale > 0 and err <= 1e-5 * scale, f"max difference {err:.3g} against a scale of {scale:.3g}"


@pytest.mark.parametrize("alignment", [None, 4])
def test_expert_parallel_moe_equals_the_whole_layer(alignment):
    ranks = [[torch.from_numpy(a) for a in r] for r in run_on_ranks(_on_rank, 2, alignment, timeout=300)]
    moe, cfg = _layer()
    moe.alignment = alignment
    x = torch.randn(2 * 11, cfg.dim, dtype=torch.float32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    parts = [moe(x[r * 11:(r + 1) * 11]) for r in range(2)]  # per-rank token sets, as in the EP run
    loss = sum((y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum() for y in parts)
    loss.backward()
    for r, (y, gx, gw1, ggate) in enumerate(ranks):
        _close(y, parts[r].detach())
        _close(gx, x.grad[r * 11:(r + 1) * 11])
        # rank r holds experts [4r, 4r + 4): their gradient comes from both ranks' tokens
        _close(gw1, moe.experts.w1.grad[4 * r:4 * r + 4])
    # the replicated gate: each rank has its own tokens' share; the sum is the whole batch's
    _close(ranks[0][3] + ranks[1][3], moe.gate.weight.grad)


def test_from_moe_checks_the_split():
    from openinfra.training.expert_parallel import ExpertParallelMoE

    moe, _ = _layer()
    with pytest.raises(ValueError, match="divisible"):
        ExpertParallelMoE.from_moe(moe, None, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        ExpertParallelMoE.from_moe(moe, None, 2, 2)
