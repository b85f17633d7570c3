"""Expert parallelism for the training job: each rank holds ``E / R`` routed experts, and every
MoE layer moves its tokens to the experts' ranks and back with ``openinfra.comm.deep_ep``.

An EP rank is also a data-parallel rank: it runs its own slice of the batch through a full copy of
everything that is not a routed expert (attention, dense layers, gates, shared experts, embedding,
head), whose gradients :func:`all_reduce_replicated_grads` sums over the ranks after backward. A
routed expert's gradient needs no reduction: DeepEP's combine and dispatch are each other's
backward, so the gradient of every rank's tokens comes back through the same exchange to the one
rank that holds the expert. With each micro-batch's loss divided by the number of micro-batches of
the whole step (every rank's), the summed gradients are those of the whole batch's mean loss, as in
the single-process run.

Per MoE layer (:class:`ExpertParallelMoE`, a drop-in for :class:`~openinfra.model.MoE`):

1. the replicated gate routes the rank's tokens to global expert ids (``weights, indices`` [T, k]);
2. ``Buffer.dispatch`` sends each token once to every rank holding one of its experts
   (``recv_x`` [R_in, dim]; ``recv_idx`` [R_in, k] local expert ids, -1 for experts elsewhere;
   ``recv_w`` [R_in, k] float32 with the weights of the local ones);
3. the local experts run on those rows in the contiguous grouped-GEMM layout, and each received row's
   expert outputs are summed with its weights;
4. ``Buffer.combine`` sums each token's rows back at its origin; the shared experts are added there.

Selection-bias updates must see the whole batch's expert loads (the bias is replicated): the job
all-reduces the gates' tracked loads before :meth:`~openinfra.model.Gate.update_bias`.

Placement (EPLB): physical slot s lives on rank ``s // (E / R)``; ``log2phy`` [E] (a buffer, saved
with the layer) says where each logical expert is. :func:`apply_placement` moves the experts to a
new placement -- their weights and their AdamW moments, exactly (each logical expert has one slot:
no redundant replicas here) -- so a run that re-places its experts every few steps computes what a
run that never does computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from openinfra.model.grouped import ContiguousLayout, contiguous_layout
from openinfra.model.moe import GroupedExperts, MoE
from openinfra.profiling.annotate import phase

__all__ = ["ExpertParallelMoE", "shard_experts", "apply_placement", "all_reduce_replicated_grads",
           "expert_parameter_names"]


class ExpertParallelMoE(MoE):
    """An MoE layer whose routed experts are spread over the ranks of ``buffer``'s group.

    Build it with :meth:`from_moe`: it keeps the layer's gate and shared experts (replicated) and
    only rank ``rank``'s experts ``[rank * E / R, (rank + 1) * E / R)``. Every rank of the group must
    call :meth:`forward` (and backward) the same number of times: each call is a collective.
    """

    buffer: object
    rank: int
    world: int

    @classmethod
    def from_moe(cls, moe: MoE, buffer, rank: int, world: int) -> "ExpertParallelMoE":
        e = moe.cfg.n_routed_experts
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        if e % world:
            raise ValueError(f"n_routed_experts={e} must be divisible by the expert-parallel size {world}")
        n_local = e // world
        ep = cls.__new__(cls)
        nn.Module.__init__(ep)
        ep.cfg, ep.gate, ep.shared_experts, ep.alignment = moe.cfg, moe.gate, moe.shared_experts, moe.alignment
        src = moe.experts
        local = GroupedExperts.__new__(GroupedExperts)
        nn.Module.__init__(local)
        local.n_experts, local.dim, local.inter_dim, local.fp8 = n_local, src.dim, src.inter_dim, src.fp8
        lo, hi = rank * n_local, (rank + 1) * n_local
        for name in ("w1", "w2", "w3"):  # copies: the full stack is dropped with the original layer
            setattr(local, name, nn.Parameter(getattr(src, name).detach()[lo:hi].clone()))
        ep.experts = local
        ep.buffer, ep.rank, ep.world = buffer, rank, world
        ep.register_buffer("log2phy", torch.arange(e))  # logical expert -> physical slot
        return ep

    def forward(self, x: torch.Tensor, layout: str = "contiguous", token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] -> [..., dim]. Training/prefill only: the contiguous layout, every token routed."""
        if token_mask is not None or layout not in ("auto", "contiguous"):
            raise ValueError("expert-parallel MoE runs the contiguous layout on every token (training); "
                             f"got layout={layout!r}, token_mask={'set' if token_mask is not None else None}")
        shape = x.shape
        x = x.reshape(-1, self.cfg.dim)
        weights, indices = self.gate(x)
        e = self.cfg.n_routed_experts
        slots = self.log2phy[indices]  # the physical slots of the chosen experts (the gate counts logical ones)
        with phase("dispatch"):
            per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(slots, e)
            recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=slots, topk_weights=weights.float())
        with phase("mlp"):
            y = self._local_experts(recv_x, recv_idx, recv_w)
        with phase("combine"):
            out, _, _ = self.buffer.combine(y, handle)
        if self.shared_experts is not None:
            with phase("mlp"):
                out = out + self.shared_experts(x)
        return out.view(shape)

    def _local_experts(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
        """Each received row's weighted sum over its local experts: [R_in, dim] -> [R_in, dim]."""
        n_local = self.experts.n_experts
        # Slots of experts on other ranks (-1) go to a dummy expert n_local: it sorts last in the
        # layout, so cutting the layout at its first row leaves exactly the local experts' rows.
        idx = torch.where(recv_idx >= 0, recv_idx, torch.full_like(recv_idx, n_local))
        full = contiguous_layout(idx, n_local + 1, self._alignment(recv_x))
        end = full.offsets[n_local]
        lay = ContiguousLayout(row_token=full.row_token[:end], row_slot=full.row_slot[:end],
                               m_indices=full.m_indices[:end], counts=full.counts[:n_local],
                               offsets=full.offsets[:n_local + 1], alignment=full.alignment)
        rows = self.experts.forward_contiguous(self.gather_rows(recv_x, lay), lay)
        return self.combine_contiguous(rows, recv_w.to(rows.dtype), lay, recv_x.shape[0])


@torch.no_grad()
def apply_placement(moe: ExpertParallelMoE, phy2log: list[int], opt: torch.optim.Optimizer | None, group) -> int:
    """Move ``moe``'s experts so that physical slot s holds logical expert ``phy2log[s]`` (a
    permutation of the E experts); a collective over the layer's EP ``group``. Each local expert's
    weights and optimizer moments travel with it (one all-reduce per tensor, each row written by
    exactly one rank, so the copy is exact). Returns how many of this rank's slots changed expert."""
    e, n_local = moe.cfg.n_routed_experts, moe.experts.n_experts
    if sorted(phy2log) != list(range(e)):
        raise ValueError(f"phy2log must be a permutation of the {e} experts (no replicas), got {phy2log}")
    now = torch.argsort(moe.log2phy)  # physical slot -> logical expert
    lo, hi = moe.rank * n_local, (moe.rank + 1) * n_local
    mine_now, mine_next = now[lo:hi], torch.tensor(phy2log[lo:hi])
    for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        state = opt.state.get(p, {}) if opt is not None else {}
        for t in [p.data] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]:
            by_expert = t.new_zeros(e, *t.shape[1:])
            by_expert[mine_now] = t
            dist.all_reduce(by_expert, group=group)
            t.copy_(by_expert[mine_next])
    moe.log2phy.copy_(torch.argsort(torch.tensor(phy2log)))
    return int((mine_now != mine_next).sum())


def shard_experts(module: nn.Module, buffer, rank: int, world: int) -> list[ExpertParallelMoE]:
    """Replace every MoE layer under ``module`` (blocks' ``ffn``) by its expert-parallel form, in
    place; returns the new layers."""
    out = []
    for block in [m for m in module.modules() if isinstance(getattr(m, "ffn", None), MoE)]:
        if not isinstance(block.ffn, ExpertParallelMoE):
            block.ffn = ExpertParallelMoE.from_moe(block.ffn, buffer, rank, world)
        out.append(block.ffn)
    return out


def expert_parameter_names(module: nn.Module) -> set[str]:
    """Qualified names of the routed experts' parameters (rank-local: not reduced, gathered on export)."""
    return {f"{name}.experts.{w}" for name, m in module.named_modules() if isinstance(m, ExpertParallelMoE)
            for w in ("w1", "w2", "w3")}


def all_reduce_replicated_grads(modules: list[nn.Module], group) -> None:
    """Sum the gradients of every parameter that is not a routed expert over ``group`` (one
    flattened all-reduce)."""
    grads = []
    for m in modules:
        local = expert_parameter_names(m)
        grads += [p.grad for n, p in m.named_parameters() if n not in local and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
