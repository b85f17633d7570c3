"""The engine shared by DualPipe and DualPipeV: per-chunk compute, p2p, memory release, recording.

A rank holds two stage modules, ``module[0]`` and ``module[1]``. The schedules (``dualpipe.py``,
``dualpipev.py``) speak in *phases* 0/1; ``_mod(phase)`` maps a phase to the module index, and
the topology predicates below say which module is a first/last stage and where its activations
come from and go to. Everything else — queues of micro-batch inputs/outputs/gradients, the
batched ``isend``/``irecv``, freeing sent activations, zero-bubble W steps and the recorder — is
identical for both schedules and lives here.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .p2p import P2PSpec
from .recorder import ScheduleRecorder
from .utils import gather, run_backward, scatter
from .weight_grad import WeightGradStore

__all__ = ["DualPipeBase"]


def _module_device(modules: Sequence[nn.Module], group) -> torch.device:
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            return t.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DualPipeBase(nn.Module):
    """Common machinery; use ``DualPipe`` or ``DualPipeV``."""

    schedule_name = "base"

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: list[int] | None = None,
        *,
        p2p_shapes: Sequence[Sequence[int]] | None = None,
        p2p_dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
        recorder: ScheduleRecorder | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(modules, (tuple, list, nn.ModuleList, nn.Sequential)) or len(modules) != 2:
            raise TypeError(f"modules must be a pair (stage module, stage module), got {type(modules).__name__}"
                            + (f" of length {len(modules)}" if hasattr(modules, "__len__") else ""))
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool):
            raise TypeError(f"batch_dim must be an int, got {type(batch_dim).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed: call dist.init_process_group first")
        if recorder is not None and not isinstance(recorder, ScheduleRecorder):
            raise TypeError(f"recorder must be a ScheduleRecorder, got {type(recorder).__name__}")

        self.module = nn.ModuleList(modules)
        # The module type opts into overlap by defining the classmethod; both stages must share it.
        self.overlapped_forward_backward = type(modules[0]) is type(modules[1]) and hasattr(
            type(modules[0]), "overlapped_forward_backward")
        self.batch_dim = batch_dim
        self.group = process_group or dist.distributed_c10d._get_default_group()
        self.num_ranks = self.group.size()
        self.device = _module_device(modules, self.group)
        if dist.get_backend(self.group) == "nccl" and self.device.type != "cuda":
            raise ValueError(f"the process group uses NCCL but the stage modules live on {self.device}; move them to the GPU")

        # rank_mapping[group rank] = pipeline rank; the inverse finds a neighbour's group rank.
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of range({self.num_ranks}), got {rank_mapping!r}")
        inverse = [0] * self.num_ranks
        for group_rank, pp_rank in enumerate(rank_mapping):
            inverse[pp_rank] = group_rank
        self.rank_mapping = list(rank_mapping)
        self.rank = rank_mapping[self.group.rank()]
        self.first_rank = inverse[0]
        self.last_rank = inverse[-1]
        self.prev_rank = inverse[self.rank - 1] if self.rank > 0 else None
        self.next_rank = inverse[self.rank + 1] if self.rank + 1 < self.num_ranks else None
        self.is_first_rank = self.rank == 0
        self.is_last_rank = self.rank == self.num_ranks - 1

        self.p2p = P2PSpec.make(p2p_shapes, p2p_dtypes) if p2p_shapes is not None else None
        if p2p_shapes is None and p2p_dtypes is not None:
            raise ValueError("p2p_dtypes given without p2p_shapes")
        self.recorder = recorder
        # gloo moves raw host memory: device tensors travel through host copies.
        self._stage_on_host = dist.get_backend(self.group) == "gloo" and self.device.type != "cpu"
        self._reset_states()

    # --- topology (overridden by the schedules) ---------------------------------------------------

    def _mod(self, phase: int) -> int:
        """Module index that a schedule phase runs on this rank."""
        return phase

    def _is_first_stage(self, m: int) -> bool:
        raise NotImplementedError

    def _is_last_stage(self, m: int) -> bool:
        raise NotImplementedError

    def _turns_out(self, m: int) -> bool:
        """True when module ``m``'s activations go to this rank's other module (the V's tip)."""
        return False

    def _turns_in(self, m: int) -> bool:
        """True when module ``m``'s inputs come from this rank's other module (the V's tip)."""
        return False

    def _fwd_peer(self, m: int, sending: bool) -> int:
        # Module 0 flows towards higher ranks, module 1 towards lower ones.
        forward_to_next = (m == 0) == sending
        return self.next_rank if forward_to_next else self.prev_rank

    def _holds_inputs(self) -> bool:
        return any(self._is_first_stage(m) for m in (0, 1))

    def _holds_loss(self) -> bool:
        return any(self._is_last_stage(m) for m in (0, 1))

    # --- state ----------------------------------------------------------------------------------

    def _reset_states(self) -> None:
        WeightGradStore.clear()
        self.input_chunks: tuple[list, list] = ([], [])
        self.output_chunks: tuple[list, list] = ([], [])
        self.input_grad_chunks: tuple[list, list] = ([], [])
        self.output_grad_chunks: tuple[list, list] = ([], [])
        self.labels: tuple[list, list] = ([], [])
        self.loss_chunks: list[torch.Tensor] = []
        self.criterion: Callable | None = None
        self.current_f_chunk_id = [0, 0]
        self.current_b_chunk_id = [0, 0]
        self.current_send_f_chunk_id = [0, 0]
        self.current_send_b_chunk_id = [0, 0]
        self.current_recv_f_chunk_id = [0, 0]
        self.current_recv_b_chunk_id = [0, 0]
        self.comm_ops: list[dist.P2POp] = []
        self._comm_meta: list[dict[str, Any]] = []
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.to_free: list[torch.Tensor] = []
        self._spec: P2PSpec | None = None
        self.forward_only = False
        self.return_outputs = False

    def _rec(self, kind: str, **fields: Any):
        """A recorder span plus a torch.profiler range ``openinfra:<F|B|W|compute>`` (the naming
        ``openinfra.profiling`` classifies; an overlapped F&B counts as plain compute there)."""
        stack = ExitStack()
        stack.enter_context(torch.profiler.record_function("openinfra:" + ("compute" if kind == "F&B" else kind)))
        rec = self.recorder
        if rec is not None and rec.enabled:
            stack.enter_context(rec.span(kind, **fields))
        return stack

    # --- compute --------------------------------------------------------------------------------

    def _post_forward(self, m: int, cid: int, outputs: list, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.loss_chunks.append(loss)
        if self._turns_out(m):
            # Tip of the V: this chunk's output is the other arm's input, handed over locally.
            self.input_chunks[1].append([o.detach().requires_grad_(o.is_floating_point()) for o in outputs])
        if not self._is_last_stage(m) or self.return_outputs:
            self.output_chunks[m].append(outputs)

    def _run_stage(self, m: int, inputs) -> list[torch.Tensor]:
        outputs = self.module[m](*inputs)
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    def _loss_for(self, m: int, cid: int, outputs) -> torch.Tensor | None:
        if self._is_last_stage(m) and self.criterion is not None:
            return self.criterion(*outputs, *self.labels[m][cid])
        return None

    def _forward_compute_chunk(self, phase: int) -> None:
        m = self._mod(phase)
        cid = self.current_f_chunk_id[m]
        self.current_f_chunk_id[m] += 1
        inputs = self.input_chunks[m][cid]
        if self.forward_only:
            self.input_chunks[m][cid] = None
        with self._rec("F", module=m, chunk=cid):
            outputs = self._run_stage(m, inputs)
            loss = self._loss_for(m, cid, outputs)
        self._post_forward(m, cid, outputs, loss)

    def _pop_backward_args(self, m: int, cid: int):
        """(loss, outputs, output_grads) of chunk ``cid`` of module ``m``; frees the references."""
        if self._is_last_stage(m):
            return self.loss_chunks[cid], [], []
        outputs = self.output_chunks[m][cid]
        if not self.return_outputs:
            self.output_chunks[m][cid] = None
        grads = self.output_grad_chunks[m][cid]
        self.output_grad_chunks[m][cid] = None
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None and t.requires_grad]
        return None, [t for t, _ in pairs], [g for _, g in pairs]

    def _post_backward(self, m: int, cid: int) -> None:
        inputs = self.input_chunks[m][cid]
        self.input_chunks[m][cid] = None
        grads = [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]
        if self._turns_in(m):
            self.output_grad_chunks[0].append(grads)
        else:
            self.input_grad_chunks[m].append(grads)

    def _backward_compute_chunk(self, phase: int, enable_zb: bool = False) -> None:
        if self.forward_only:
            return
        m = self._mod(phase)
        cid = self.current_b_chunk_id[m]
        self.current_b_chunk_id[m] += 1
        with self._rec("B", module=m, chunk=cid, zb=enable_zb):
            loss, outputs, grads = self._pop_backward_args(m, cid)
            WeightGradStore.enabled = enable_zb
            try:
                if loss is not None:
                    loss.backward()
                    loss.detach_()
                elif outputs:
                    run_backward(outputs, grads)
            finally:
                WeightGradStore.enabled = False
            if enable_zb:
                WeightGradStore.flush()
        self._post_backward(m, cid)

    def _forward_backward_compute_chunk(self, phase0: int, phase1: int) -> None:
        if self.forward_only:
            self._forward_compute_chunk(phase0)
            return
        if not self.overlapped_forward_backward:
            self._forward_compute_chunk(phase0)
            self._backward_compute_chunk(phase1)
            return
        m0, m1 = self._mod(phase0), self._mod(phase1)
        cid0 = self.current_f_chunk_id[m0]
        self.current_f_chunk_id[m0] += 1
        cid1 = self.current_b_chunk_id[m1]
        self.current_b_chunk_id[m1] += 1
        inputs0 = self.input_chunks[m0][cid0]
        if self._is_last_stage(m0) and self.criterion is not None:
            criterion0, labels0 = self.criterion, list(self.labels[m0][cid0])
        else:
            criterion0, labels0 = None, []
        with self._rec("F&B", module=m0, chunk=cid0, module_b=m1, chunk_b=cid1):
            loss1, outputs1, grads1 = self._pop_backward_args(m1, cid1)
            module0, module1 = self.module[m0], self.module[m1]
            outputs0, loss0 = type(module0).overlapped_forward_backward(
                module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        self._post_forward(m0, cid0, outputs0, loss0 if criterion0 is not None else None)
        self._post_backward(m1, cid1)

    def _weight_chunk(self) -> None:
        if self.forward_only:
            return
        self._commit_and_wait_comm()
        with self._rec("W"):
            WeightGradStore.pop()  # FIFO: the oldest deferred B's weight gradients

    # --- communication --------------------------------------------------------------------------

    def _recv_forward(self, phase: int) -> None:
        m = self._mod(phase)
        if self._is_first_stage(m) or self._turns_in(m):
            return
        cid = self.current_recv_f_chunk_id[m]
        self.current_recv_f_chunk_id[m] += 1
        peer = self._fwd_peer(m, sending=False)
        tensors = self._spec.append_irecv(self.comm_ops, peer, self.group, self.device, not self.forward_only,
                                          self._staged if self._stage_on_host else None)
        self._comm_meta += [dict(kind="recv", module=m, chunk=cid, peer=self.rank_mapping[peer], nbytes=t.nbytes) for t in tensors]
        self.input_chunks[m].append(tensors)

    def _send_forward(self, phase: int) -> None:
        m = self._mod(phase)
        if self._is_last_stage(m) or self._turns_out(m):
            return
        cid = self.current_send_f_chunk_id[m]
        self.current_send_f_chunk_id[m] += 1
        tensors = self.output_chunks[m][cid]
        self._spec.check(tensors, f"{self.schedule_name} rank {self.rank}: output of module {m}, chunk {cid}")
        peer = self._fwd_peer(m, sending=True)
        P2PSpec.append_isend(self.comm_ops, tensors, peer, self.group, self._stage_on_host)
        self._comm_meta += [dict(kind="send", module=m, chunk=cid, peer=self.rank_mapping[peer], nbytes=t.nbytes) for t in tensors]
        if not self.return_outputs:
            for t in tensors:
                if t._base is not None:
                    raise ValueError(
                        f"{self.schedule_name}: module {m} on pipeline rank {self.rank} returned a view "
                        f"(shape {tuple(t.shape)}); a pipeline stage must return fresh tensors, e.g. add .clone()")
            self.to_free.extend(tensors)

    def _recv_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        m = self._mod(phase)
        if self._is_last_stage(m) or self._turns_out(m):
            return
        cid = self.current_recv_b_chunk_id[m]
        self.current_recv_b_chunk_id[m] += 1
        peer = self._fwd_peer(m, sending=True)
        tensors = self._spec.append_irecv(self.comm_ops, peer, self.group, self.device, False,
                                          self._staged if self._stage_on_host else None)
        self._comm_meta += [dict(kind="recv", module=m, chunk=cid, peer=self.rank_mapping[peer], nbytes=t.nbytes) for t in tensors]
        self.output_grad_chunks[m].append(tensors)

    def _send_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        m = self._mod(phase)
        if self._is_first_stage(m) or self._turns_in(m):
            return
        cid = self.current_send_b_chunk_id[m]
        self.current_send_b_chunk_id[m] += 1
        grads = self.input_grad_chunks[m][cid]
        self.input_grad_chunks[m][cid] = None
        # An input the stage did not use has no gradient; the peer still expects a tensor.
        grads = [torch.zeros(s, dtype=d, device=self.device) if g is None else g
                 for g, s, d in zip(grads, self._spec.shapes, self._spec.dtypes)]
        peer = self._fwd_peer(m, sending=False)
        P2PSpec.append_isend(self.comm_ops, grads, peer, self.group, self._stage_on_host)
        self._comm_meta += [dict(kind="send", module=m, chunk=cid, peer=self.rank_mapping[peer], nbytes=t.nbytes) for t in grads]

    def _free_tensors(self) -> None:
        for t in self.to_free:
            # Keep the autograd node (for backward) but drop the activation's memory.
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.to_free = []

    def _commit_and_wait_comm(self) -> None:
        if not self.comm_ops:
            return
        rec = self.recorder if self.recorder is not None and self.recorder.enabled else None
        start = rec.now_us() if rec else 0.0
        reqs = dist.batch_isend_irecv(self.comm_ops)
        for req in reqs:
            req.wait()
        with torch.no_grad():
            for host, dev in self._staged:
                dev.copy_(host)
        self._staged = []
        if rec:
            end = rec.now_us()
            for meta in self._comm_meta:
                rec.add(start_us=start, end_us=end, **meta)
        self.comm_ops = []
        self._comm_meta = []
        self._free_tensors()

    # --- chunk steps ----------------------------------------------------------------------------

    def _forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_forward(phase)
        self._commit_and_wait_comm()
        self._forward_compute_chunk(phase)
        if send:
            self._send_forward(phase)

    def _backward_chunk(self, phase: int, enable_zb: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_backward(phase)
        self._commit_and_wait_comm()
        self._backward_compute_chunk(phase, enable_zb)
        if send:
            self._send_backward(phase)

    def _forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if recv0:
            self._recv_forward(phase0)
        self._recv_backward(phase1)
        self._commit_and_wait_comm()
        self._forward_backward_compute_chunk(phase0, phase1)
        self._send_forward(phase0)
        self._send_backward(phase1)

    def _set_phase(self, n: int) -> None:
        if self.recorder is not None:
            self.recorder.phase = n

    # --- step -----------------------------------------------------------------------------------

    def _validate_chunks(self, num_chunks: int) -> None:
        raise NotImplementedError

    def _run_schedule(self, num_chunks: int) -> None:
        raise NotImplementedError

    def _place_inputs(self, micro_inputs: list, micro_labels: list) -> None:
        raise NotImplementedError

    def _output_module(self) -> int | None:
        """Module whose last-stage outputs this rank returns (None if it holds no last stage)."""
        raise NotImplementedError

    def step(
        self,
        *inputs: torch.Tensor | None,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor | None] = (),
        return_outputs: bool = False,
        p2p_shapes: Sequence[Sequence[int]] | None = None,
        p2p_dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """Run one training step (or inference when grad mode is off) over ``num_chunks`` micro-batches.

        ``inputs`` (full batches, split along ``batch_dim``) and ``labels`` are needed only on the
        ranks that hold a first/last stage; ``criterion(*outputs, *labels) -> loss`` likewise.
        ``p2p_shapes``/``p2p_dtypes`` (the per-micro-batch tensors between stages) override the
        constructor's for this call. Returns ``(loss [chunks], outputs)`` where this rank holds a
        last stage (outputs only with ``return_outputs=True``), else ``(None, None)``.
        Gradients accumulate into the modules' ``.grad``.
        """
        if p2p_dtypes is not None and p2p_shapes is None:
            raise ValueError("p2p_dtypes given without p2p_shapes")
        spec = P2PSpec.make(p2p_shapes, p2p_dtypes) if p2p_shapes is not None else self.p2p
        if spec is None:
            raise ValueError(
                f"{type(self).__name__}.step: p2p_shapes is required (the per-micro-batch shapes sent between stages): "
                "pass p2p_shapes= to the constructor or to step()")
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool):
            raise TypeError(f"num_chunks must be an int, got {type(num_chunks).__name__}")
        self._validate_chunks(num_chunks)
        if isinstance(labels, torch.Tensor):
            labels = (labels,)
        forward_only = not torch.is_grad_enabled()
        if self._holds_inputs() and (not inputs or all(x is None for x in inputs)):
            raise ValueError(f"{type(self).__name__}.step: pipeline rank {self.rank} holds a first stage and needs inputs")
        if not forward_only and self._holds_loss() and criterion is None:
            raise ValueError(
                f"{type(self).__name__}.step: pipeline rank {self.rank} holds a last stage; training needs a criterion")

        self._reset_states()
        self._spec = spec
        self.forward_only = forward_only
        self.return_outputs = return_outputs
        self.criterion = criterion
        micro_inputs = scatter(inputs, self._input_split(num_chunks), self.batch_dim) if self._holds_inputs() else []
        micro_labels = scatter(labels, self._input_split(num_chunks), self.batch_dim) if self._holds_loss() else []
        self._place_inputs(micro_inputs, micro_labels)
        if self.recorder is not None and self.recorder.enabled:
            self.recorder.begin(self.rank, self.group, self.device, {
                "schedule": self.schedule_name, "num_ranks": self.num_ranks, "num_chunks": num_chunks,
                "forward_only": forward_only, "overlapped": self.overlapped_forward_backward})
        try:
            self._run_schedule(num_chunks)
            if not forward_only and WeightGradStore.pending():
                raise RuntimeError(f"{WeightGradStore.pending()} deferred weight-gradient batches left after the schedule")
            self._commit_and_wait_comm()
            self._set_phase(0)

            loss, outputs = None, None
            m_out = self._output_module()
            if m_out is not None:
                if criterion is not None:
                    loss = torch.stack(self.loss_chunks)
                if return_outputs:
                    outputs = gather(self.output_chunks[m_out], self.batch_dim)
                    if len(outputs) == 1:
                        outputs = outputs[0]
        finally:
            self._reset_states()
        return loss, outputs

    def _input_split(self, num_chunks: int) -> int:
        return num_chunks
