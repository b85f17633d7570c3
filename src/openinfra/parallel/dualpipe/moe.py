"""A MoE transformer block whose ``overlapped_forward_backward`` hides expert all-to-all.

``MoEStage`` = ``num_layers`` x (causal self-attention + mixture-of-experts FFN), experts sharded
over an expert-parallel (EP) group that is orthogonal to the pipeline group (the ranks of one
EP group sit at the same pipeline rank, so they run the same schedule in lock step).

Each layer is cut into segments at its two all-to-alls:

    A (attention, norm, gate, top-k, permute)  ->  dispatch a2a  ->  E (experts)
      ->  combine a2a  ->  P (un-permute, weighted sum, residual)

and every segment is its own small autograd graph (inputs are detached leaves). A normal call
runs the segments in order with blocking collectives and joins them to the stage input with
one autograd node, so the pipeline's plain backward works. ``overlapped_forward_backward``
runs chunk 0's forward segments and chunk 1's backward segments interleaved, so every
all-to-all of one chunk is in flight while the other chunk computes::

    B: P'  -> launch combine-grad a2a   | F: A  -> launch dispatch a2a
    B: E'  -> launch dispatch-grad a2a  | F: E  -> launch combine a2a
    B: A'                               | F: P

On CPU the collectives are gloo ``async_op=True`` works (gloo's own threads move the bytes); on
GPU they are NCCL works on ProcessGroupNCCL's communication stream while compute stays on the
current stream. The split sizes of each dispatch are exchanged first (a small blocking
all-to-all: the host must know how many rows it receives). Both paths run the same kernels on
the same data in the same order, so they are bitwise identical.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .recorder import ScheduleRecorder
from .utils import run_backward
from .weight_grad import ZeroBubbleLinear

__all__ = ["MoEConfig", "MoEStage"]

# torch.profiler range names in openinfra.profiling's vocabulary (compute: attn/mlp/compute).
_PROFILER_NAMES = {
    "attn": "openinfra:attn", "experts": "openinfra:mlp", "combine": "openinfra:compute",
    "combine_bwd": "openinfra:compute", "experts_bwd": "openinfra:mlp", "attn_bwd": "openinfra:attn",
}


@dataclass(frozen=True)
class MoEConfig:
    """Sizes of a ``MoEStage``. ``num_experts`` is the global count (divisible by the EP size)."""

    hidden: int = 64
    num_heads: int = 4
    num_experts: int = 8
    topk: int = 2
    expert_hidden: int = 128
    num_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden", "num_heads", "num_experts", "topk", "expert_hidden", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {v!r}")
        if self.hidden % self.num_heads:
            raise ValueError(f"MoEConfig.hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")
        if self.topk > self.num_experts:
            raise ValueError(f"MoEConfig.topk ({self.topk}) must be <= num_experts ({self.num_experts})")


class _Layer(nn.Module):
    def __init__(self, cfg: MoEConfig, num_local: int, zero_bubble: bool) -> None:
        super().__init__()
        h = cfg.hidden
        # ZeroBubbleLinear defers its weight gradient to the schedule's W steps; torch's own
        # zero-bubble schedules split the backward themselves and need stock nn.Linear.
        linear = ZeroBubbleLinear if zero_bubble else nn.Linear
        self.norm1 = nn.RMSNorm(h)
        self.qkv = linear(h, 3 * h, bias=False)
        self.proj = linear(h, h, bias=False)
        self.norm2 = nn.RMSNorm(h)
        self.gate = linear(h, cfg.num_experts, bias=False)
        scale = 1 / math.sqrt(h)
        self.w1 = nn.Parameter(torch.randn(num_local, h, cfg.expert_hidden) * scale)
        self.w2 = nn.Parameter(torch.randn(num_local, cfg.expert_hidden, h) / math.sqrt(cfg.expert_hidden))


@dataclass
class _LayerState:
    """Segment leaves/roots of one layer of one chunk, kept from forward to backward."""

    h: torch.Tensor | None = None           # A's input leaf [B, S, H]
    a_out: list = field(default_factory=list)  # A's roots: residual, send rows, top-k weights
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    recv_x: torch.Tensor | None = None      # E's input leaf [R, H]
    y_exp: torch.Tensor | None = None       # E's root [R, H]
    p_in: list = field(default_factory=list)   # P's leaves: residual, combined rows, weights
    out: torch.Tensor | None = None         # P's root [B, S, H]
    order: torch.Tensor | None = None       # sort of (token, k) pairs by expert
    local_perm: torch.Tensor | None = None  # sort of received rows by local expert
    local_counts: list[int] = field(default_factory=list)
    train: bool = True                      # build segment graphs (False in forward-only mode)


@dataclass
class _ChunkRecord:
    x: torch.Tensor
    layers: list[_LayerState]


class _Join(torch.autograd.Function):
    """Connects the stage input to the last segment's output; its backward runs all segments.

    ``anchor`` is an empty tensor that requires grad: the output must be part of the autograd
    graph even when ``x`` (a first stage's data) does not require grad, since the stage's
    parameters are reached only through the segments this node runs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, stage: "MoEStage", record: _ChunkRecord) -> torch.Tensor:
        ctx.stage, ctx.record = stage, record
        root = record.layers[-1].out
        out = root.detach()
        # The root stays only as the start of backward (the raw engine call needs its grad_fn, not
        # its values): hand its storage to the returned tensor, so that a pipeline freeing the
        # sent activation really frees it, as DeepSeek's DualPipe does with stage outputs.
        root.data = torch.empty(0, dtype=root.dtype, device=root.device)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stage, record = ctx.stage, ctx.record
        if stage._capture is not None:
            # Called from overlapped_forward_backward via loss.backward(): hand over, run later.
            stage._capture.append((record, grad))
            return None, None, None, None
        g = grad
        for li in reversed(range(len(record.layers))):
            g = stage._backward_layer(record.layers[li], g)
        record.layers = []
        return g, None, None, None


class _AllToAll(torch.autograd.Function):
    """Differentiable blocking all-to-all of rows (the connected-graph mode's dispatch/combine)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


class MoEStage(nn.Module):
    """``[B, S, hidden] -> [B, S, hidden]``: ``cfg.num_layers`` attention + MoE layers.

    ``ep_group``: the expert-parallel group (None: all experts here). Expert ``e`` lives on EP
    rank ``e // (num_experts / ep_size)``. ``recorder``: optional ``ScheduleRecorder`` that gets
    "moe:*" compute spans and "a2a:*" in-flight spans, to show the overlap in the trace.
    ``segmented=False`` builds one connected autograd graph with differentiable blocking
    all-to-alls instead (same maths, no overlap): what schedules that split the backward
    themselves (torch.distributed.pipelining's zero-bubble ones) need.
    """

    def __init__(self, cfg: MoEConfig, ep_group: dist.ProcessGroup | None = None,
                 recorder: ScheduleRecorder | None = None, device=None, segmented: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        if cfg.num_experts % self.ep_size:
            raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by the EP group size ({self.ep_size})")
        self.num_local = cfg.num_experts // self.ep_size
        self.layers = nn.ModuleList(_Layer(cfg, self.num_local, segmented) for _ in range(cfg.num_layers))
        if device is not None:
            self.to(device)
        self.recorder = recorder
        self.segmented = segmented
        self._capture: list | None = None

    # --- communication --------------------------------------------------------------------------

    def _a2a(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], name: str) -> Callable[[], torch.Tensor]:
        """Launch an all-to-all of rows; returns ``wait() -> received rows``."""
        if not self.segmented and torch.is_grad_enabled() and x.requires_grad:
            if self.ep_size == 1:
                return lambda: x.clone()
            out = _AllToAll.apply(x, out_splits, in_splits, self.ep_group)
            return lambda: out
        if self.ep_size == 1:
            return lambda: x.clone()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        rec = self.recorder if self.recorder is not None and self.recorder.enabled else None
        start = rec.now_us() if rec else 0.0
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.ep_group, async_op=True)

        def wait() -> torch.Tensor:
            with torch.profiler.record_function("openinfra:" + ("dispatch" if name.startswith("dispatch") else "combine")):
                work.wait()
            if rec:
                rec.add(f"a2a:{name}", start, rec.now_us(), nbytes=out.nbytes)
            return out

        return wait

    def _span(self, name: str):
        """A torch.profiler label, plus a recorder span when recording."""
        stack = ExitStack()
        stack.enter_context(torch.profiler.record_function(_PROFILER_NAMES[name]))
        if self.recorder is not None and self.recorder.enabled:
            stack.enter_context(self.recorder.span(f"moe:{name}"))
        return stack

    # --- forward segments -----------------------------------------------------------------------

    def _segment_a(self, layer: _Layer, st: _LayerState, h_in: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Attention + routing + permutation; launches the dispatch a2a."""
        cfg = self.cfg
        with self._span("attn"), torch.set_grad_enabled(st.train):
            h = h_in if not self.segmented else h_in.detach().requires_grad_(h_in.is_floating_point())
            b, s, d = h.shape
            q, k, v = layer.qkv(layer.norm1(h)).view(b, s, 3, cfg.num_heads, d // cfg.num_heads).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
            a = h + layer.proj(att)
            n2 = layer.norm2(a).reshape(b * s, d)
            scores = layer.gate(n2).softmax(-1)
            w, idx = scores.topk(cfg.topk, dim=-1)  # [T, K]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            send_x = n2[order // cfg.topk]           # [T*K, H] rows sorted by expert
            counts = torch.bincount(flat, minlength=cfg.num_experts)
        st.h, st.a_out, st.order = h, [a, send_x, w], order
        if self.ep_size > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.ep_group)  # tiny; the one host sync
            per_src = recv_counts.view(self.ep_size, self.num_local)
        else:
            per_src = counts.view(1, self.num_local)
        st.send_splits = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        st.recv_splits = per_src.sum(1).tolist()
        # Received rows are source-major, expert-sorted within a source: regroup by local expert.
        local_ids = torch.repeat_interleave(
            torch.arange(self.num_local, device=counts.device).repeat(self.ep_size), per_src.reshape(-1))
        st.local_perm = torch.argsort(local_ids, stable=True)
        st.local_counts = per_src.sum(0).tolist()
        return self._a2a(send_x if not self.segmented else send_x.detach(), st.recv_splits, st.send_splits, "dispatch")

    def _segment_e(self, layer: _Layer, st: _LayerState, recv_x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Local experts on the received rows; launches the combine a2a."""
        with self._span("experts"), torch.set_grad_enabled(st.train):
            x = recv_x if not self.segmented else recv_x.requires_grad_()
            xs = x[st.local_perm].split(st.local_counts)
            # unbind, not w1[e] per expert: each index's backward would zero-fill a whole-tensor gradient
            ys = [F.gelu(xe @ w1) @ w2 for xe, w1, w2 in zip(xs, layer.w1.unbind(0), layer.w2.unbind(0))]
            y_sorted = torch.cat(ys) if ys else x[:0]
            y = torch.empty_like(y_sorted).index_copy(0, st.local_perm, y_sorted)
        st.recv_x, st.y_exp = x, y
        return self._a2a(y if not self.segmented else y.detach(), st.send_splits, st.recv_splits, "combine")

    def _segment_p(self, layer: _Layer, st: _LayerState, comb: torch.Tensor) -> torch.Tensor:
        """Un-permute, weight by the gate, add the residual."""
        cfg = self.cfg
        with self._span("combine"), torch.set_grad_enabled(st.train):
            if self.segmented:
                a = st.a_out[0].detach().requires_grad_()
                w = st.a_out[2].detach().requires_grad_()
                y_rows = comb.requires_grad_()
            else:
                a, w, y_rows = st.a_out[0], st.a_out[2], comb
            y_pairs = torch.empty_like(y_rows).index_copy(0, st.order, y_rows)
            b, s, d = a.shape
            out = a + (w.unsqueeze(-1) * y_pairs.view(b * s, cfg.topk, d)).sum(1).view(b, s, d)
        st.p_in, st.out = [a, y_rows, w], out
        return out

    def _forward_layer(self, li: int, st: _LayerState, h: torch.Tensor, interleave) -> torch.Tensor:
        """One layer's forward; ``interleave(i)`` runs the other chunk's i-th backward piece."""
        layer = self.layers[li]
        step = interleave or (lambda i: None)
        step(0)                                   # B: P'  -> combine-grad a2a in flight
        wait_d = self._segment_a(layer, st, h)    # F: A   -> dispatch a2a in flight
        step(1)                                   # B: E'  -> dispatch-grad a2a in flight
        wait_c = self._segment_e(layer, st, wait_d())  # F: E -> combine a2a in flight
        step(2)                                   # B: A'
        return self._segment_p(layer, st, wait_c())    # F: P

    # --- backward segments ----------------------------------------------------------------------

    def _backward_layer(self, st: _LayerState, g: torch.Tensor) -> torch.Tensor:
        """One layer's backward from ``g`` = d(loss)/d(layer output); returns d/d(layer input)."""
        pieces = self._backward_pieces(st, g)
        wait = next(pieces)
        wait = pieces.send(wait)
        return pieces.send(wait)

    def _backward_pieces(self, st: _LayerState, g: torch.Tensor):
        """The layer's backward as a generator of three pieces (P', E', A'), each but the last
        ending with a launched all-to-all whose ``wait`` it yields and gets sent back; the last
        yields d(loss)/d(layer input). ``overlapped_forward_backward`` runs the other chunk's
        forward segments in between the pieces."""
        with self._span("combine_bwd"):
            run_backward([st.out], [g])
            a, y_rows, w = st.p_in
        wait = yield self._a2a(y_rows.grad, st.recv_splits, st.send_splits, "combine_bwd")
        with self._span("experts_bwd"):
            run_backward([st.y_exp], [wait()])
        wait = yield self._a2a(st.recv_x.grad, st.send_splits, st.recv_splits, "dispatch_bwd")
        with self._span("attn_bwd"):
            roots, grads = [st.a_out[0], st.a_out[1], st.a_out[2]], [a.grad, wait(), w.grad]
            run_backward(roots, grads)
            h_grad = st.h.grad
        yield h_grad

    # --- module API -----------------------------------------------------------------------------

    def _forward_record(self, x: torch.Tensor) -> _ChunkRecord:
        """All layers' forward segments in order, blocking on each all-to-all."""
        record = _ChunkRecord(x, [])
        h = x
        for li in range(len(self.layers)):
            st = _LayerState(train=torch.is_grad_enabled())
            record.layers.append(st)
            h = self._forward_layer(li, st, h, None)
        return record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden:
            raise ValueError(f"x must be [batch, seq, {self.cfg.hidden}], got {tuple(x.shape)}")
        if not torch.is_grad_enabled():
            return self._forward_no_grad(x)
        record = self._forward_record(x)
        if not self.segmented:
            return record.layers[-1].out
        return _Join.apply(x, self._anchor(x), self, record)

    @staticmethod
    def _anchor(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, device=x.device, requires_grad=True)

    def _forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        record = self._forward_record(x)
        return record.layers[-1].out.detach()

    @classmethod
    def overlapped_forward_backward(
        cls, module0: "MoEStage", inputs0: list[torch.Tensor], criterion0: Callable | None, labels0: list,
        module1: "MoEStage", loss1: torch.Tensor | None, outputs1: list[torch.Tensor], output_grads1: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Forward chunk 0 through ``module0`` while back-propagating chunk 1 through ``module1``."""
        if not (module0.segmented and module1.segmented):
            outputs0 = [module0(*inputs0)]
            loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
            if loss1 is not None:
                loss1.backward()
                loss1.detach_()
            elif outputs1:
                run_backward(outputs1, output_grads1)
            return outputs0, loss0
        # 1. Find chunk 1's segment record and the gradient at its output.
        record1, g1 = None, None
        if loss1 is not None:
            module1._capture = []
            try:
                loss1.backward()
            finally:
                captured, module1._capture = module1._capture, None
            loss1.detach_()
            if captured:
                record1, g1 = captured[0]
        elif outputs1:
            node = outputs1[0].grad_fn
            record1, g1 = getattr(node, "record", None), output_grads1[0]
            if record1 is None:
                run_backward(outputs1, output_grads1)  # not produced by a MoEStage: plain backward
        # 2. Interleave: forward layer i of chunk 0 with backward layer L-1-i of chunk 1.
        grads = {"g": g1}
        n = len(module1.layers) if record1 is not None else 0

        def interleave_for(li: int):
            if record1 is None or li >= n:
                return None
            bl = n - 1 - li
            pieces = module1._backward_pieces(record1.layers[bl], grads["g"])
            state = {"wait": None}

            def step(i: int) -> None:
                if i == 0:
                    state["wait"] = next(pieces)
                elif i == 1:
                    state["wait"] = pieces.send(state["wait"])
                else:
                    grads["g"] = pieces.send(state["wait"])

            return step

        x0 = inputs0[0]
        if x0.dim() != 3 or x0.shape[-1] != module0.cfg.hidden:
            raise ValueError(f"inputs0[0] must be [batch, seq, {module0.cfg.hidden}], got {tuple(x0.shape)}")
        record0 = _ChunkRecord(x0, [])
        h = x0
        for li in range(len(module0.layers)):
            st = _LayerState(train=True)
            record0.layers.append(st)
            step = interleave_for(li)
            h = module0._forward_layer(li, st, h, step)
        # Chunk 1 may be deeper than chunk 0 (different modules): finish its remaining layers.
        for li in range(len(module0.layers), n):
            bl = n - 1 - li
            grads["g"] = module1._backward_layer(record1.layers[bl], grads["g"])
        if record1 is not None:
            record1.layers = []
            x1, g = record1.x, grads["g"]
            if x1.grad_fn is not None:
                run_backward([x1], [g])
            elif x1.requires_grad:
                x1.grad = g if x1.grad is None else x1.grad + g
        out0 = _Join.apply(x0, module0._anchor(x0), module0, record0)
        loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
        return [out0], loss0
