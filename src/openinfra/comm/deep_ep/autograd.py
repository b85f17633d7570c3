"""Autograd for normal-mode dispatch / combine: each one's backward is the other.

- dispatch: ``recv_x = D(x)``, ``recv_w = mask * D(w)``. Its adjoint sums each received row's
  gradient back at the token's origin: ``grad_x = C(grad_recv_x)``, ``grad_w = C(mask * grad_recv_w)``.
- combine: ``y = C(x) + bias``, ``y_w = C(w)``. Its adjoint sends the origin's gradient to every rank
  the token went to: ``grad_x = D_cached(grad_y)``, ``grad_w = D_cached(grad_y_w)``, ``grad_bias = grad_y``.

Both backward passes are collectives, so every rank must run backward through the same calls, with
the same inputs requiring grad (a rank that skips one leaves the others waiting).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DispatchFunction", "CombineFunction"]


class DispatchFunction(torch.autograd.Function):
    """``apply(buffer, kwargs, holder, x, topk_weights) -> (recv_x, recv_topk_weights)``; the rest goes to ``holder``."""

    @staticmethod
    def forward(ctx, buffer, kwargs: dict, holder: dict, x: torch.Tensor, topk_weights: torch.Tensor | None):
        outs = buffer._dispatch_impl(x=x, topk_weights=topk_weights, **kwargs)
        holder["outs"] = outs
        recv_x, recv_idx, recv_w, _, handle, _ = outs
        ctx.buffer, ctx.handle = buffer, handle
        if recv_idx is not None:
            ctx.save_for_backward(recv_idx)
        ctx.has_w = topk_weights is not None
        ctx.hidden, ctx.x_dtype, ctx.device = x.shape[1], x.dtype, x.device
        ctx.mark_non_differentiable(*(t for t in (recv_idx,) if t is not None))
        return recv_x, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x: torch.Tensor | None, grad_recv_w: torch.Tensor | None) -> Any:
        (recv_idx,) = ctx.saved_tensors if ctx.has_w else (None,)
        handle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_tokens, ctx.hidden, dtype=ctx.x_dtype, device=ctx.device)
        w = None
        # needs_input_grad is the same on every rank when every rank runs the same program, so the
        # collectives below stay matched
        if ctx.has_w and ctx.needs_input_grad[4]:
            if grad_recv_w is None:
                grad_recv_w = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
            w = grad_recv_w.masked_fill(recv_idx < 0, 0.0).contiguous()
        grad_x, grad_w, _ = ctx.buffer._combine_impl(x=grad_recv_x.contiguous(), handle=handle, topk_weights=w)
        return None, None, None, grad_x, (grad_w if w is not None else None)


class CombineFunction(torch.autograd.Function):
    """``apply(buffer, kwargs, holder, x, topk_weights, bias0, bias1) -> (combined_x, combined_topk_weights)``."""

    @staticmethod
    def forward(ctx, buffer, kwargs: dict, holder: dict, x, topk_weights, bias0, bias1):
        bias = tuple(b for b in (bias0, bias1) if b is not None)
        combined, combined_w, event = buffer._combine_impl(x=x, topk_weights=topk_weights, bias=bias, **kwargs)
        holder["event"] = event
        ctx.buffer, ctx.handle = buffer, kwargs["handle"]
        ctx.has = (topk_weights is not None, bias0 is not None, bias1 is not None)
        ctx.x_dtype = x.dtype
        return combined, combined_w

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, grad_yw: torch.Tensor | None) -> Any:
        has_w, has_b0, has_b1 = ctx.has
        handle = ctx.handle
        grad_x = grad_w = None
        if grad_y is not None:
            grad_x = ctx.buffer._dispatch_impl(x=grad_y.to(ctx.x_dtype).contiguous(), handle=handle)[0]
        if has_w and grad_yw is not None and ctx.needs_input_grad[4]:
            grad_w = ctx.buffer._dispatch_impl(x=grad_yw.contiguous(), handle=handle)[0]
        return (None, None, None, grad_x, grad_w,
                grad_y if has_b0 else None, grad_y if has_b1 else None)
