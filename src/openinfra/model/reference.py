"""The same model computed with plain PyTorch ops: the test oracle and the benchmark's peer.

``plain_forward(model, tokens)`` reads a :class:`Transformer`'s parameters and recomputes its
training-path logits the straightforward way DeepSeek-V3's inference reference does: attention
with explicit score matrices and softmax (no fused attention), routing by the textbook steps, and
each expert applied to the tokens that chose it (a Python loop over experts, ``torch.where`` to
find them) instead of the grouped-GEMM layouts. Same math, so outputs agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openinfra.model.gate import route
from openinfra.model.moe import MoE
from openinfra.model.rope import apply_rope
from openinfra.model.transformer import Transformer

__all__ = ["plain_forward", "plain_loss"]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(xf.dtype)).to(x.dtype)


def _mla(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    cfg = attn.cfg
    b, s, _ = x.shape
    h, nope, rope, vd = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank > 0:
        q = _rms(x @ attn.wq_a.weight.t(), attn.q_norm.weight, eps) @ attn.wq_b.weight.t()
    else:
        q = x @ attn.wq.weight.t()
    q = q.view(b, s, h, nope + rope)
    q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
    kv = x @ attn.wkv_a.weight.t()
    latent, k_pe = kv[..., : cfg.kv_lora_rank], apply_rope(kv[..., None, cfg.kv_lora_rank:], cos, sin)
    kv = (_rms(latent, attn.kv_norm.weight, eps) @ attn.wkv_b.weight.t()).view(b, s, h, nope + vd)
    k = torch.cat([kv[..., :nope], k_pe.expand(b, s, h, rope)], dim=-1)
    v = kv[..., nope:]
    qf = torch.cat([q_nope, q_pe], dim=-1)
    scores = torch.einsum("bshd,bthd->bhst", qf, k) * attn.softmax_scale
    mask = torch.full((s, s), float("-inf"), device=x.device).triu_(1)
    probs = (scores.to(torch.promote_types(x.dtype, torch.float32)) + mask).softmax(dim=-1).to(x.dtype)
    o = torch.einsum("bhst,bthd->bshd", probs, v)
    return o.flatten(2) @ attn.wo.weight.t()


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def _moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    g = moe.gate
    weights, indices = route(x @ g.weight.to(x.dtype).t(), g.bias, g.topk, g.n_groups, g.topk_groups,
                             g.route_scale, g.score_func)
    weights = weights.to(x.dtype)
    y = torch.zeros_like(x)
    ex = moe.experts
    for e in range(ex.n_experts):
        rows, slot = torch.where(indices == e)
        if rows.numel() == 0:
            continue
        y = y.index_add(0, rows, _swiglu(x[rows], ex.w1[e], ex.w2[e], ex.w3[e]) * weights[rows, slot, None])
    if moe.shared_experts is not None:
        se = moe.shared_experts
        y = y + _swiglu(x, se.w1.weight, se.w2.weight, se.w3.weight)
    return y.view(shape)


def plain_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Training-path logits [b, s, vocab] of ``model`` for ``tokens`` [b, s], in plain PyTorch ops."""
    cfg = model.cfg
    s = tokens.shape[1]
    cos, sin = model.rope_tables(torch.arange(s, device=tokens.device)[None])
    h = model.embed.weight[tokens]
    for blk in model.layers:
        h = h + _mla(blk.attn, _rms(h, blk.attn_norm.weight, cfg.norm_eps), cos, sin, cfg.norm_eps)
        z = _rms(h, blk.ffn_norm.weight, cfg.norm_eps)
        if isinstance(blk.ffn, MoE):
            h = h + _moe(blk.ffn, z)
        else:
            h = h + _swiglu(z, blk.ffn.w1.weight, blk.ffn.w2.weight, blk.ffn.w3.weight)
    return _rms(h, model.norm.weight, cfg.norm_eps) @ model.head.weight.t()


def plain_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of :func:`plain_forward`."""
    logits = plain_forward(model, tokens)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
