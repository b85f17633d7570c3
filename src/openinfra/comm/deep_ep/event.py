"""Completion handles: ``EventHandle`` (what the original's C++ event is) and ``EventOverlap``.

On a GPU, dispatch / combine run on the buffer's communication stream and an ``EventHandle`` holds
the CUDA event recorded there: waiting makes the *current stream* wait, the host never blocks.
On the CPU there are no streams: collectives are issued with ``async_op=True`` and the handle holds
their work objects plus the host-side steps that must run once the data has arrived (unpacking
received rows into the outputs the call already returned). Waiting blocks until the collectives
finish and then runs those steps, so the returned tensors hold their values only after
``current_stream_wait()`` -- the same contract as DeepEP's ``async_finish``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["EventHandle", "EventOverlap"]


class EventHandle:
    """A point in the work stream: a CUDA event, or pending CPU collectives and their finishing steps."""

    def __init__(
        self,
        cuda_event: torch.cuda.Event | None = None,
        works: list[Any] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self._cuda_event = cuda_event
        self._works = list(works or [])
        self._finish = finish
        self._done = cuda_event is None and not self._works and finish is None

    @staticmethod
    def capture(device: torch.device | None = None) -> "EventHandle":
        """An event at the current point of the current CUDA stream (a completed handle on CPU)."""
        if torch.cuda.is_available() and (device is None or device.type == "cuda"):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            return EventHandle(cuda_event=event)
        return EventHandle()

    @property
    def cuda_event(self) -> torch.cuda.Event | None:
        return self._cuda_event

    def is_done(self) -> bool:
        """Whether waiting would return at once (CUDA: the event has completed)."""
        if self._cuda_event is not None:
            return self._cuda_event.query() and self._finish is None
        return self._done

    def stream_wait(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream`` wait (CUDA), or block until done and finish (CPU)."""
        if self._cuda_event is not None and stream is not None:
            stream.wait_event(self._cuda_event)
        self._complete_host()

    def current_stream_wait(self) -> None:
        """The current stream waits for this point; on CPU, blocks and finishes the pending steps."""
        stream = torch.cuda.current_stream() if self._cuda_event is not None else None
        self.stream_wait(stream)

    def _complete_host(self) -> None:
        if self._done:
            return
        works, self._works = self._works, []
        for w in works:
            w.wait()
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        self._done = self._cuda_event is None


class EventOverlap:
    """DeepEP's overlap helper: an ``EventHandle`` plus tensors to keep alive until it is waited.

    ``with event: ...`` runs the body (e.g. attention of the other micro-batch) and waits for the
    event on exit.

    Attributes:
        event: the ``EventHandle`` (None when the call was synchronous).
        extra_tensors: tensors kept alive until the event is waited (what ``record_stream`` would do,
            compatible with CUDA graphs).
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (on CPU: the host waits and unpacks the results)."""
        if self.event is None:
            raise RuntimeError("this EventOverlap holds no event: the call it came from was not async_finish")
        self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
            self.extra_tensors = None
