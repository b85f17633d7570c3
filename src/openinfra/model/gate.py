"""The MoE router: sigmoid scores, a selection-only bias, group-limited top-k, route_scale.

Auxiliary-loss-free balancing (DeepSeek-V3 tech report, section 2.1.2): each expert has a bias that
is added to its score *for choosing* the experts only; the combine weights come from the unbiased
scores. After each step the bias of an overloaded expert goes down by ``rate`` and that of an
underloaded one up by ``rate`` (:meth:`Gate.update_bias`). Group-limited routing first keeps the
``n_limited_groups`` best of ``n_expert_groups`` groups (a group scores the sum of its two best
biased scores; with softmax scoring, its best score) and picks the top-k experts inside them.
"""

from __future__ import annotations

import torch
from torch import nn

from openinfra.model.config import ModelConfig

__all__ = ["Gate", "route"]


def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, n_groups: int = 1, topk_groups: int = 1,
          route_scale: float = 1.0, score_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token.

    Args:
        logits: [T, E] router logits (any float dtype; scored in float32).
        bias: [E] float32 selection bias or None.
        topk: experts per token; n_groups / topk_groups: group-limited routing.
        route_scale: multiplies the (renormalized, for sigmoid) weights.
        score_func: ``sigmoid`` or ``softmax``.

    Returns:
        ``(weights [T, topk] float32, indices [T, topk] int64)``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    t, e = logits.shape
    if score_func == "sigmoid":
        scores = logits.float().sigmoid()
    elif score_func == "softmax":
        scores = logits.float().softmax(dim=-1)
    else:
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    choice = scores if bias is None else scores + bias.float()
    if n_groups > 1:
        grouped = choice.view(t, n_groups, e // n_groups)
        if bias is None:
            group_score = grouped.amax(dim=-1)
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_score.topk(topk_groups, dim=-1).indices
        dropped = torch.ones(t, n_groups, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, indices)
    if score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


class Gate(nn.Module):
    """Router of one MoE layer. ``weight`` [E, dim] is learned; ``bias`` [E] (float32 buffer, saved as
    DeepSeek-V3's ``e_score_correction_bias``) is moved by :meth:`update_bias`, not by gradients.

    While ``track_load`` is True, each forward adds the tokens routed to every expert into
    ``load`` [E] int64 (read it for EPLB or the bias update, then :meth:`reset_load`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
        self.route_scale, self.score_func, self.n_experts = cfg.route_scale, cfg.score_func, cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.dim ** -0.5)
        if cfg.score_func == "sigmoid":
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        self.track_load = True

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the bias: its 1e-3 steps would vanish in bf16.
        super()._apply(fn, recurse)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (weights [T, topk] in x's dtype, indices [T, topk] int64)."""
        logits = x @ self.weight.to(x.dtype).t()
        weights, indices = route(logits, self.bias, self.topk, self.n_groups, self.topk_groups,
                                 self.route_scale, self.score_func)
        if self.track_load:
            with torch.no_grad():
                self.load += torch.bincount(indices.flatten(), minlength=self.n_experts)
        return weights.to(x.dtype), indices

    def reset_load(self) -> None:
        self.load.zero_()

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, load: torch.Tensor | None = None) -> torch.Tensor:
        """Nudge the selection bias toward balance: ``bias += rate * sign(mean(load) - load)``.

        Args:
            rate: the bias update speed (the tech report's gamma; 1e-3 for most of V3's training).
            load: [E] tokens per expert; defaults to the tracked ``load`` (which is then reset).

        Returns:
            The load [E] the update used.
        """
        if self.bias is None:
            raise ValueError("update_bias needs a selection bias: score_func='softmax' gates have none")
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        used = self.load.clone() if load is None else load.to(self.load.device)
        if used.shape != (self.n_experts,):
            raise ValueError(f"load must be [{self.n_experts}], got {tuple(used.shape)}")
        used_f = used.float()
        self.bias += rate * torch.sign(used_f.mean() - used_f)
        if load is None:
            self.reset_load()
        return used
