"""``Buffer``: DeepEP's expert-parallel communication API on torch.distributed.

A ``Buffer`` wraps one process group (NCCL on GPUs, gloo on CPU; gloo with CUDA tensors works too,
for correctness) and offers DeepEP's first-generation calls with their semantics:

- ``get_dispatch_layout``: tokens per rank / expert and the token-in-rank mask from ``topk_idx``;
- ``dispatch`` / ``combine``: normal (throughput) mode, see ``normal.py``; autograd-aware;
- ``low_latency_dispatch`` / ``low_latency_combine``: decode mode, see ``low_latency.py``.

Unlike DeepEP there is no pre-registered NVLink/RDMA buffer to size: ``num_nvl_bytes`` and
``num_rdma_bytes`` are accepted (and reported) for drop-in compatibility, and memory comes from
PyTorch's caching allocator per call.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from openinfra.comm.deep_ep.autograd import CombineFunction, DispatchFunction
from openinfra.comm.deep_ep.checks import (
    check_expert_ids, check_fp8_pair, check_hidden, check_tensor, check_topk_idx, check_topk_weights,
)
from openinfra.comm.deep_ep.config import Config
from openinfra.comm.deep_ep.event import EventHandle, EventOverlap
from openinfra.comm.deep_ep.launch import issue_only, run_op
from openinfra.comm.deep_ep.layout import compute_layout
from openinfra.comm.deep_ep.low_latency import LowLatencyHandle, LowLatencyOutputs, ll_combine_issue, ll_dispatch_issue
from openinfra.comm.deep_ep.normal import DispatchHandle, DispatchOutputs, combine_issue, dispatch_issue

__all__ = ["Buffer"]

Tensor = torch.Tensor
#: recv_x: a tensor, or the (e4m3 values, scales) pair of an FP8 dispatch
RecvX = Union[Tensor, tuple[Tensor, Tensor]]
DispatchResult = tuple[RecvX, Optional[Tensor], Optional[Tensor], Optional[list], Optional[DispatchHandle], EventOverlap]
LayoutResult = tuple[Tensor, None, Tensor, Tensor, EventOverlap]

_INT_DTYPES = (torch.int32, torch.int64)

# DeepEP's recommended configs by rank count (dispatch, combine): kept so tuned call sites port as-is.
_DISPATCH_CHUNKS = {2: (24, 256), 4: (6, 256), 8: (6, 256), 16: (36, 288), 24: (8, 288), 32: (32, 288),
                    64: (20, 288), 128: (20, 560), 144: (32, 720), 160: (28, 720)}
_COMBINE_CHUNKS = {2: (10, 256), 4: (9, 256), 8: (4, 256), 16: (4, 288), 24: (1, 288), 32: (1, 288),
                   64: (1, 288), 128: (1, 560), 144: (2, 720), 160: (2, 720)}


def _int_arg(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Buffer:
    """Expert-parallel dispatch / combine over ``group`` (DeepEP's ``deep_ep.Buffer``).

    Attributes:
        rank: this process's rank in ``group``.
        group_size: ranks in ``group`` (R).
        group: the process group.
        num_nvl_bytes / num_rdma_bytes: as passed (informational, see the module docstring).
        low_latency_mode: as passed; low-latency calls work either way.
        transport: "all_to_all_vdev" (symmetric memory) or "all_to_all_single"; transport_reason says why.

    ``use_symmetric_memory``: True requires symmetric memory (CUDA, NCCL, one host, NVSHMEM in the
    build, and a self-test exchange that agrees with ``all_to_all_single``; ValueError naming the
    missing piece otherwise); None and False do not use it. It serves the host-sync-free padded
    exchanges (low-latency and worst-token modes); split-size exchanges always use
    ``all_to_all_single``. It is opt-in because on 2 H200s (NVLink, NVSHMEM in torch 2.11) the
    self-test and the intranode suite pass over it but the low-latency suite hung on one rank
    (docs/deep_ep.md, "Symmetric memory"); automatic selection waits for that to be understood.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        use_symmetric_memory: bool | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs an initialised torch.distributed process group (dist.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = _int_arg("num_nvl_bytes", num_nvl_bytes, 0)
        self.num_rdma_bytes = _int_arg("num_rdma_bytes", num_rdma_bytes, 0)
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = _int_arg("num_qps_per_rank", num_qps_per_rank, 1)
        self.explicitly_destroy = explicitly_destroy
        self.backend = dist.get_backend(self.group)
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._ll_combine_buffers: dict[tuple, list[torch.Tensor]] = {}
        self._ll_buffer_idx = 0
        self._destroyed = False
        self._symm = None
        self.transport, self.transport_reason = "all_to_all_single", "symmetric memory not requested"
        if use_symmetric_memory:
            self._setup_symmetric_memory(True)

    def _setup_symmetric_memory(self, required: bool) -> None:
        # Collective (all ranks construct the Buffer together): capability check, then a self-test
        # exchange compared with all_to_all_single; any failure falls back, with the reason kept.
        from openinfra.comm.deep_ep.symm_mem import SymmetricTransport, symmetric_memory_status

        device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" and torch.cuda.is_available()
                  else torch.device("cpu"))
        ok, why = symmetric_memory_status(self.group, device)
        if ok:
            try:
                transport = SymmetricTransport(self.group, device)
                error = transport.self_test()
            except Exception as e:  # noqa: BLE001 - any failure of the optional path means "fall back"
                error = f"{type(e).__name__}: {e}"
            if error is None:
                self._symm, self.transport = transport, "all_to_all_vdev"
            else:
                ok, why = False, error
        self.transport_reason = why
        if required and not ok:
            raise ValueError(f"use_symmetric_memory=True but symmetric memory is unavailable: {why}")

    # --- DeepEP's static helpers -------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count reported in default configs (even)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"new_num_sms must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current CUDA stream (a completed event on CPU)."""
        return EventOverlap(EventHandle.capture())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: FP8 dispatch is available (PyTorch's float8 dtypes; no SM90-only build here)."""
        return True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch config for ``num_ranks``."""
        if num_ranks not in _DISPATCH_CHUNKS:
            raise ValueError(f"no recommended dispatch config for {num_ranks} ranks; known: {sorted(_DISPATCH_CHUNKS)}")
        send, recv = _DISPATCH_CHUNKS[num_ranks]
        return Config(Buffer.num_sms, send, recv, 6 if num_ranks <= 8 else 16, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine config for ``num_ranks``."""
        if num_ranks not in _COMBINE_CHUNKS:
            raise ValueError(f"no recommended combine config for {num_ranks} ranks; known: {sorted(_COMBINE_CHUNKS)}")
        send, recv = _COMBINE_CHUNKS[num_ranks]
        return Config(Buffer.num_sms, send, recv, 6 if num_ranks <= 8 else 16, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes the padded low-latency exchange allocates per rank here (bf16 payload and side rows, send and
        receive buffers, dispatch and combine), for top-k up to 9; DeepEP's own RDMA hint sizes its buffer."""
        for name, v in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden),
                        ("num_ranks", num_ranks), ("num_experts", num_experts)):
            _int_arg(name, v, 1)
        per_msg = hidden * 2 + 8 + (hidden // 128) * 4
        slots = num_ranks * num_max_dispatch_tokens_per_rank * max(1, min(num_experts, 9))
        return 2 * 2 * slots * per_msg

    # --- plumbing ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")

    def _comm_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The communication stream of the current CUDA device."""
        return self._comm_stream(torch.device("cuda", torch.cuda.current_device()))

    def _run(self, device, issue, previous_event, async_finish, inputs=()) -> EventOverlap:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
        return run_op(self.group, device, self._comm_stream(device), issue, previous_event, async_finish, inputs,
                      self._symm)

    def destroy(self) -> None:
        """Release cached buffers and streams; later calls raise."""
        self._ll_combine_buffers.clear()
        self._streams.clear()
        self._symm = None
        self._destroyed = True

    # --- layout -----------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> LayoutResult:
        """Per-rank and per-expert token counts from the routing.

        Args:
            topk_idx: [T, K] int64/int32 expert ids, -1 = no selection.
            num_experts: E, a multiple of the group size.

        Returns:
            ``(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool, event)``; the ``None`` is DeepEP's RDMA-rank count
            (intranode only here).
        """
        self._check_alive()
        check_topk_idx(topk_idx)
        _int_arg("num_experts", num_experts, 1)
        if num_experts % self.group_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({self.group_size})")
        check_expert_ids(topk_idx, num_experts)
        result = []

        def issue(coll):
            result.extend(compute_layout(topk_idx, num_experts, self.group_size))
            return lambda: list(result)

        event = self._run(topk_idx.device, issue, previous_event, async_finish, (topk_idx,))
        per_rank, per_expert, in_rank = result
        return per_rank, None, per_expert, in_rank, event

    # --- normal mode ------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> DispatchResult:
        """Send each token once to every rank that owns one of its experts.

        Args:
            x: [T, H] bf16 (fp16 / fp32 also move), or ``(x_fp8 [T, H] e4m3, scales [T, H/128] fp32)``.
            handle: a previous dispatch's handle: re-dispatch with its layout (no count exchange, no
                host sync; top-k arguments must then be None).
            num_tokens_per_rank / is_token_in_rank / num_tokens_per_expert: ``get_dispatch_layout``'s outputs.
            num_tokens_per_rdma_rank: must be None (intranode only).
            topk_idx: [T, K] expert ids (-1 = none); topk_weights: [T, K] float32.
            expert_alignment: round each local expert's received count up to a multiple of this.
            num_worst_tokens: if > 0, receive into exactly this many rows with no host sync (each rank
                may then hold at most ``num_worst_tokens // R`` tokens); the per-expert list is empty.
            config: accepted for compatibility (see ``Config``).
            previous_event: wait for this event before starting.
            async_finish: return at once; wait on the returned event before using the outputs.
            allocate_on_comm_stream: accepted for compatibility (outputs are always safe to use
                on the current stream after the event).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            recv_x [N, H] (or the fp8 pair), rows source-rank-major; recv_topk_idx [N, K] local expert
            ids in [0, E/R) or -1; recv_topk_weights [N, K] (0 where -1). A cached dispatch returns
            ``(recv_x, None, None, None, None, event)``.

        Differentiable in ``x`` (bf16/fp16/fp32) and ``topk_weights``: the backward is a combine.
        """
        self._check_alive()
        kwargs = dict(handle=handle, num_tokens_per_rank=num_tokens_per_rank,
                      num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                      num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, expert_alignment=expert_alignment,
                      num_worst_tokens=num_worst_tokens, config=config, previous_event=previous_event,
                      async_finish=async_finish)
        wants_grad = torch.is_grad_enabled() and (
            (isinstance(x, torch.Tensor) and x.requires_grad)
            or (isinstance(topk_weights, torch.Tensor) and topk_weights.requires_grad))
        if wants_grad and isinstance(x, tuple):
            raise ValueError("autograd through an FP8 dispatch is not supported: dispatch bf16, or detach topk_weights")
        if not wants_grad:
            return self._dispatch_impl(x=x, topk_weights=topk_weights, **kwargs)
        holder: dict = {}
        recv_x, recv_w = DispatchFunction.apply(self, kwargs, holder, x, topk_weights)
        _, recv_idx, _, counts, new_handle, event = holder["outs"]
        return recv_x, recv_idx, recv_w, counts, new_handle, event

    def _dispatch_impl(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                       is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                       expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False):
        fp8 = isinstance(x, tuple)
        if fp8:
            x_values, x_scales = check_fp8_pair(x)
        else:
            x_values, x_scales = check_hidden("x", x), None
        num_tokens = x_values.shape[0]
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be a Config or None, got {type(config).__name__}")
        if num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank must be None: this implementation is intranode (one group)")
        _int_arg("expert_alignment", expert_alignment, 1)
        _int_arg("num_worst_tokens", num_worst_tokens, 0)
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle must be a normal-mode dispatch handle, got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle given) takes no topk_idx / topk_weights")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
        else:
            R = self.group_size
            for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
                if t is None:
                    raise ValueError(f"{name} is required without a handle (get it from get_dispatch_layout)")
            check_tensor("num_tokens_per_rank", num_tokens_per_rank, 1, _INT_DTYPES)
            check_tensor("is_token_in_rank", is_token_in_rank, 2, (torch.bool,))
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, 1, _INT_DTYPES)
            if num_tokens_per_rank.numel() != R:
                raise ValueError(f"num_tokens_per_rank must have {R} entries (one per rank), got {num_tokens_per_rank.numel()}")
            if tuple(is_token_in_rank.shape) != (num_tokens, R):
                raise ValueError(f"is_token_in_rank must be [{num_tokens}, {R}], got {tuple(is_token_in_rank.shape)}")
            num_experts = num_tokens_per_expert.numel()
            if num_experts % R:
                raise ValueError(f"num_tokens_per_expert has {num_experts} experts, not a multiple of the group size {R}")
            if topk_weights is not None and topk_idx is None:
                raise ValueError("topk_weights needs topk_idx")
            if topk_idx is not None:
                check_topk_idx(topk_idx, num_tokens)
                if topk_weights is not None:
                    check_topk_weights(topk_weights, topk_idx)
                if num_worst_tokens and not topk_idx.is_cuda:
                    # (without num_worst_tokens the ids are checked on all ranks with the count exchange)
                    check_expert_ids(topk_idx, num_experts)
            if num_worst_tokens and num_tokens > num_worst_tokens // R:
                raise ValueError(
                    f"num_worst_tokens={num_worst_tokens} gives each rank pair {num_worst_tokens // R} slots, fewer than "
                    f"the {num_tokens} tokens here; pass num_worst_tokens >= num_tokens * num_ranks"
                )
        for name, t in (("x", x_values), ("topk_idx", topk_idx), ("is_token_in_rank", is_token_in_rank)):
            if t is not None and t.device != x_values.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x_values.device}")
        result = DispatchOutputs()
        issue = dispatch_issue(self.rank, self.group_size, x_values.contiguous(), x_scales, handle,
                               num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                               expert_alignment, num_worst_tokens, result)
        event = self._run(x_values.device, issue, previous_event, async_finish, (x_values, x_scales, topk_idx, topk_weights))
        recv_x = (result.recv_x, result.recv_scales) if fp8 else result.recv_x
        if handle is not None:
            return recv_x, None, None, None, None, event
        return (recv_x, result.recv_topk_idx, result.recv_topk_weights, result.num_recv_tokens_per_expert_list,
                result.handle, event)

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], EventOverlap]:
        """Send each received row back to its origin and sum the copies there (no weights).

        Args:
            x: [N, H] rows in ``recv_x``'s order (bf16; fp16 / fp32 also work).
            handle: the dispatch's handle.
            topk_weights: optional [N, K] float32, summed back the same way.
            bias: None, a [T, H] tensor, or a pair, added to the combined rows at the origin.

        Returns:
            ``(combined_x [T, H], combined_topk_weights [T, K] or None, event)``. Tokens sent nowhere
            come back as ``bias`` (or zeros). Differentiable: the backward is a cached dispatch.
        """
        self._check_alive()
        biases = tuple(b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None)
        kwargs = dict(handle=handle, config=config, previous_event=previous_event, async_finish=async_finish)
        wants_grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (x, topk_weights, *biases))
        if not wants_grad:
            return self._combine_impl(x=x, topk_weights=topk_weights, bias=biases, **kwargs)
        if len(biases) > 2:
            raise ValueError(f"bias takes at most two tensors, got {len(biases)}")
        holder: dict = {}
        b0 = biases[0] if biases else None
        b1 = biases[1] if len(biases) > 1 else None
        combined, combined_w = CombineFunction.apply(self, kwargs, holder, x, topk_weights, b0, b1)
        return combined, combined_w, holder["event"]

    def _combine_impl(self, x, handle, topk_weights=None, bias=(), config=None, previous_event=None, async_finish=False):
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be the handle a normal dispatch returned, got {type(handle).__name__}")
        check_hidden("x", x)
        if x.shape[0] != handle.num_recv_tokens:
            raise ValueError(f"x must have {handle.num_recv_tokens} rows (the dispatch's recv_x), got {x.shape[0]}")
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be a Config or None, got {type(config).__name__}")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, 2, (torch.float32,))
            if topk_weights.shape[0] != x.shape[0]:
                raise ValueError(f"topk_weights must have {x.shape[0]} rows like x, got {tuple(topk_weights.shape)}")
            topk_weights = topk_weights.contiguous()
        if len(bias) > 2:
            raise ValueError(f"bias takes at most two tensors, got {len(bias)}")
        for i, b in enumerate(bias):
            check_hidden(f"bias[{i}]", b)
            if tuple(b.shape) != (handle.num_tokens, x.shape[1]):
                raise ValueError(f"bias[{i}] must be [{handle.num_tokens}, {x.shape[1]}], got {tuple(b.shape)}")
        out: list = []
        issue = combine_issue(x.contiguous(), handle, topk_weights, tuple(b.contiguous() for b in bias), out)
        event = self._run(x.device, issue, previous_event, async_finish, (x, topk_weights, *bias))
        return out[0], out[1], event

    # --- low-latency mode -------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes its RDMA signal area here; nothing is shared between calls in this implementation."""
        self._check_alive()
        _int_arg("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        _int_arg("hidden", hidden, 1)
        _int_arg("num_experts", num_experts, 1)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[RecvX, Tensor, LowLatencyHandle, EventOverlap, Callable[[], None]]:
        """Send one message per (token, expert), received expert-major for a masked grouped GEMM.

        Args:
            x: [T, H] bf16, T <= num_max_dispatch_tokens_per_rank (the same value on every rank).
            topk_idx: [T, K] int64 expert ids, -1 = none.
            num_experts: E, a multiple of the group size; L = E / R local experts.
            cumulative_local_expert_recv_stats: optional [L] int32, += tokens received per local
                expert (the EPLB load tracker's input).
            dispatch_wait_recv_cost_stats: must be None (no per-rank wait timing here).
            use_fp8: send e4m3 + one fp32 scale per 128 channels (H % 128 == 0).
            round_scale: power-of-two scales; use_ue8m0: and pack them as UE8M0 bytes (the exponent),
                four per int32 (needs round_scale).
            async_finish: return at once; wait on the event before using the outputs.
            return_recv_hook: only issue the sends; call the returned hook to receive.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: recv_x [L, R*Tmax, H] bf16, or
            ``(e4m3 [L, R*Tmax, H], scales [L, R*Tmax, H/128] fp32)`` with the scales' last two dims
            column-major (int32 [L, R*Tmax, ceil(H/512)] with UE8M0, zero bytes padding the last int); only the first ``recv_count[e]`` rows
            of expert e are valid, source-rank-major. ``hook`` is a no-op without return_recv_hook.
        """
        self._check_alive()
        check_hidden("x", x, (torch.bfloat16,))
        check_topk_idx(topk_idx, x.shape[0])
        _int_arg("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        _int_arg("num_experts", num_experts, 1)
        R = self.group_size
        if num_experts % R:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({R})")
        if x.shape[0] > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"x has {x.shape[0]} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        if use_fp8 and x.shape[1] % 128:
            raise ValueError(f"use_fp8 needs a hidden size that is a multiple of 128, got {x.shape[1]}")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0 needs use_fp8=True and round_scale=True")
        if dispatch_wait_recv_cost_stats is not None:
            raise ValueError("dispatch_wait_recv_cost_stats is not supported (no per-rank receive timing here)")
        if topk_idx.device != x.device:
            raise ValueError(f"topk_idx is on {topk_idx.device} but x is on {x.device}")
        if cumulative_local_expert_recv_stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, 1, _INT_DTYPES)
            if cumulative_local_expert_recv_stats.numel() != num_experts // R:
                raise ValueError(f"cumulative_local_expert_recv_stats must have {num_experts // R} entries (local experts), "
                                 f"got {cumulative_local_expert_recv_stats.numel()}")
        if not topk_idx.is_cuda:
            check_expert_ids(topk_idx, num_experts)
        result = LowLatencyOutputs()
        issue = ll_dispatch_issue(self.rank, R, x.contiguous(), topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                  use_fp8, round_scale, use_ue8m0, cumulative_local_expert_recv_stats, result)
        hook, event = self._launch_ll(x.device, issue, async_finish, return_recv_hook, (x, topk_idx))
        recv_x = (result.recv_x, result.recv_scales) if use_fp8 else result.recv_x
        self._ll_buffer_idx ^= 1
        return recv_x, result.recv_count, result.handle, event, hook

    def _launch_ll(self, device, issue, async_finish, return_recv_hook, inputs) -> tuple[Callable[[], None], EventOverlap]:
        if return_recv_hook:
            if async_finish:
                raise ValueError("return_recv_hook and async_finish exclude each other: the hook is the receive")
            return issue_only(self.group, issue, self._symm), EventOverlap(None)
        return (lambda: None), self._run(device, issue, None, async_finish, inputs)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The [L, R*Tmax, H] bf16 tensor that ``low_latency_combine(..., zero_copy=True)`` reads next."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be a low-latency handle, got {type(handle).__name__}")
        shape = tuple(handle.recv_src_info.shape) + (handle.hidden,)
        key = (shape, handle.recv_src_info.device)
        if key not in self._ll_combine_buffers:
            self._ll_combine_buffers[key] = [torch.empty(shape, dtype=torch.bfloat16, device=key[1]) for _ in range(2)]
        return self._ll_combine_buffers[key][self._ll_buffer_idx]

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[Tensor, EventOverlap, Callable[[], None]]:
        """Send each expert's rows back and reduce them at the origin, weighted by ``topk_weights``.

        Args:
            x: [L, R*Tmax, H] bf16 expert outputs, rows as ``low_latency_dispatch`` laid them out.
            topk_idx / topk_weights: [T, K] as dispatched (int64 / float32); -1 slots are skipped.
            handle: the dispatch's handle.
            zero_copy: read the rows from ``get_next_low_latency_combine_buffer(handle)`` instead of x.
            out: optional [T, H] bf16 output.

        Returns:
            ``(combined_x [T, H] bf16, event, hook)``.
        """
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be the handle low_latency_dispatch returned, got {type(handle).__name__}")
        if use_logfmt:
            raise ValueError("use_logfmt is not supported: combine sends bf16")
        if combine_wait_recv_cost_stats is not None:
            raise ValueError("combine_wait_recv_cost_stats is not supported (no per-rank receive timing here)")
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        shape = tuple(handle.recv_src_info.shape) + (handle.hidden,)
        check_tensor("x", x, 3, (torch.bfloat16,))
        if tuple(x.shape) != shape:
            raise ValueError(f"x must be {list(shape)} (local experts, R*Tmax, hidden), got {list(x.shape)}")
        check_topk_idx(topk_idx, handle.num_tokens)
        check_topk_weights(topk_weights, topk_idx)
        if tuple(topk_idx.shape) != tuple(handle.send_slot.shape):
            raise ValueError(f"topk_idx must be {list(handle.send_slot.shape)} as dispatched, got {list(topk_idx.shape)}")
        if out is None:
            out = torch.empty(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=x.device)
        else:
            check_tensor("out", out, 2, (torch.bfloat16,))
            if tuple(out.shape) != (handle.num_tokens, handle.hidden):
                raise ValueError(f"out must be [{handle.num_tokens}, {handle.hidden}], got {list(out.shape)}")
        issue = ll_combine_issue(x, topk_idx, topk_weights, handle, out)
        hook, event = self._launch_ll(x.device, issue, async_finish, return_recv_hook, (x, topk_idx, topk_weights))
        return out, event, hook
