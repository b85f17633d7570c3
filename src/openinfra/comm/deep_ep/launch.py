"""Where a buffer operation runs, and how its completion is handed back.

Every dispatch / combine is split in two: ``issue`` (checks, layout, packing, launching the
collectives) and ``finish`` (unpacking what arrived). ``run_op`` places them:

- CUDA tensors: on the buffer's communication stream, after ``previous_event`` (or after the
  current stream's work so far). The collectives are waited stream-wise (no host block with NCCL),
  ``finish`` runs there too, an event is recorded, and either the current stream waits for it
  (``async_finish=False``) or the event is returned for the caller to wait on.
- CPU tensors: collectives are issued with ``async_op=True``; without ``async_finish`` the host
  waits and finishes at once, with it the returned ``EventHandle`` does both when waited.

``issue_only`` is the low-latency ``return_recv_hook`` form: issue now on the current stream, and
return a hook that waits and finishes (the receive half).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from openinfra.comm.deep_ep.event import EventHandle, EventOverlap

__all__ = ["Collectives", "run_op", "issue_only"]

Finish = Callable[[], list[torch.Tensor]]


class Collectives:
    """Issues the collectives of one operation on ``group``; keeps their work handles."""

    def __init__(self, group: dist.ProcessGroup, symm: Any = None) -> None:
        self.group = group
        self.symm = symm  # a SymmetricTransport, or None
        self.works: list[Any] = []
        # gloo moves CUDA tensors only for some collectives; stage those through host memory
        # (gloo + CUDA is a correctness set-up, one GPU shared by several ranks, not a fast path)
        self.stage_cuda = dist.get_backend(group) == "gloo"
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _stage(self, out: torch.Tensor, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.stage_cuda and (out.is_cuda or inp.is_cuda)):
            return out, inp
        host_out = torch.empty(out.shape, dtype=out.dtype)
        self.copies.append((out, host_out))
        return host_out, inp.cpu()

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None) -> None:
        """Rows of ``inp`` to ranks by ``in_splits`` (None: equal), into ``out`` by ``out_splits``."""
        # fp8 and bool travel as bytes: neither gloo nor NCCL reduces them, but not every backend
        # knows their dtypes (measured: gloo rejects float8).
        out, inp = self._stage(_wire(out), _wire(inp))
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        self.works.append(work)

    def all_to_all_blocks(self, out: torch.Tensor, inp: torch.Tensor, counts: torch.Tensor, fill: int = 0) -> None:
        """Padded-block all-to-all: ``inp`` [R * M, C] is R blocks of M rows, only ``counts[d]`` (device
        tensor) rows of block d are real; ``out`` gets source s's block at rows [s * M, (s + 1) * M).

        Over symmetric memory only the real rows move and empty slots hold ``fill``; over
        ``all_to_all_single`` whole blocks move (empty slots hold whatever the sender had there).
        """
        if self.symm is not None and out.is_cuda:
            self.symm.all_to_all_blocks(_wire(out), _wire(inp), counts, fill)
            return
        self.all_to_all(out, inp)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (flat, R x inp.numel()) = every rank's ``inp``."""
        # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the GPU image has 2.11)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        out, inp = self._stage(out.view(-1), inp.contiguous().view(-1))
        work = gather(out, inp, group=self.group, async_op=True)
        self.works.append(work)

    def wait(self) -> None:
        works, self.works = self.works, []
        for w in works:
            w.wait()
        copies, self.copies = self.copies, []
        for dst, src in copies:
            dst.copy_(src, non_blocking=False)


def _wire(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bool):
        return t.view(torch.uint8)
    return t


def run_op(
    group: dist.ProcessGroup,
    device: torch.device,
    comm_stream: torch.cuda.Stream | None,
    issue: Callable[[Collectives], Finish],
    previous_event: EventOverlap | None,
    async_finish: bool,
    inputs: tuple[torch.Tensor | None, ...] = (),
    symm: Any = None,
) -> EventOverlap:
    """Run ``issue`` then ``finish`` as the module docstring says; returns the operation's event."""
    coll = Collectives(group, symm)
    if device.type == "cuda":
        compute = torch.cuda.current_stream(device)
        if previous_event is not None and previous_event.event is not None:
            previous_event.event.stream_wait(comm_stream)
        else:
            comm_stream.wait_stream(compute)
        with torch.cuda.stream(comm_stream):
            finish = issue(coll)
            coll.wait()
            outputs = finish()
            event = torch.cuda.Event()
            event.record(comm_stream)
        # Tensors made on the comm stream but used on the compute stream (and inputs read on the comm
        # stream) must not be recycled before both streams are done with them.
        for t in outputs:
            if t is not None and t.is_cuda:
                t.record_stream(compute)
        for t in inputs:
            if t is not None and t.is_cuda:
                t.record_stream(comm_stream)
        if async_finish:
            return EventOverlap(EventHandle(cuda_event=event), tuple(t for t in inputs if t is not None))
        compute.wait_event(event)
        return EventOverlap(None)
    if previous_event is not None and previous_event.event is not None:
        previous_event.event.current_stream_wait()
    finish = issue(coll)
    if async_finish:
        works = coll.works
        coll.works = []
        return EventOverlap(EventHandle(works=works, finish=finish))
    coll.wait()
    finish()
    return EventOverlap(None)


def issue_only(group: dist.ProcessGroup, issue: Callable[[Collectives], Finish], symm: Any = None) -> Callable[[], None]:
    """Issue now (current stream); the returned hook waits for the data and finishes."""
    coll = Collectives(group, symm)
    finish = issue(coll)
    done = False

    def hook() -> None:
        nonlocal done
        if done:
            return
        coll.wait()
        finish()
        done = True

    return hook
