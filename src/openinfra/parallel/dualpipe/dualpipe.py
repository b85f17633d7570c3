"""DualPipe: bidirectional pipeline parallelism (DeepSeek-V3 technical report, section 3.2.1).

PP ranks (even) each hold two stages: stage r of the forward direction (``module[0]``) and
stage PP-1-r of the reverse direction (``module[1]``). Half of the micro-batches enter at rank 0
and flow up, the other half enter at rank PP-1 and flow down, so both ends of the pipeline are
busy from the start and the middle runs forward and backward chunks of the two directions
side by side — which is where ``overlapped_forward_backward`` hides one chunk's communication
behind the other's compute.
"""

from __future__ import annotations

from .base import DualPipeBase
from .schedule import _check, phase_counts

__all__ = ["DualPipe"]


class DualPipe(DualPipeBase):
    """DualPipe over ``process_group`` (PP = its size, even).

    ``DualPipe(modules=(stage_r, stage_{PP-1-r}), batch_dim=0, process_group=None,
    rank_mapping=None, *, p2p_shapes=None, p2p_dtypes=None, recorder=None)``.
    On rank 0 ``step`` takes the inputs of the forward direction and the labels of the reverse
    direction; on rank PP-1 the other way round; so the loss on rank 0 belongs to the inputs
    given on rank PP-1 and vice versa. Each of those ranks splits its batch into num_chunks/2
    micro-batches.
    """

    schedule_name = "DualPipe"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline ranks, got {self.num_ranks} (use DualPipeV)")
        # In the second half of the ranks, phase 0 is the reverse direction (module 1).
        self.is_in_second_half = self.rank >= self.num_ranks // 2
        self.is_middle_rank = self.rank in (self.num_ranks // 2 - 1, self.num_ranks // 2)

    def _mod(self, phase: int) -> int:
        return phase ^ int(self.is_in_second_half)

    def _is_first_stage(self, m: int) -> bool:
        return (self.is_first_rank and m == 0) or (self.is_last_rank and m == 1)

    def _is_last_stage(self, m: int) -> bool:
        return (self.is_first_rank and m == 1) or (self.is_last_rank and m == 0)

    def _validate_chunks(self, num_chunks: int) -> None:
        _check("dualpipe", self.num_ranks, num_chunks, self.rank)

    def _input_split(self, num_chunks: int) -> int:
        return num_chunks // 2

    def _place_inputs(self, micro_inputs: list, micro_labels: list) -> None:
        if self.is_first_rank:
            self.input_chunks[0].extend(micro_inputs)
            self.labels[1].extend(micro_labels)
        if self.is_last_rank:
            self.input_chunks[1].extend(micro_inputs)
            self.labels[0].extend(micro_labels)

    def _output_module(self) -> int | None:
        if self.is_first_rank:
            return 1
        if self.is_last_rank:
            return 0
        return None

    def _run_schedule(self, num_chunks: int) -> None:
        n = phase_counts("dualpipe", self.num_ranks, num_chunks, self.rank)
        middle = self.is_middle_rank

        # Phase 1: nF0 — warm up the own direction.
        self._set_phase(1)
        for _ in range(n["nF0"]):
            self._forward_chunk(0)

        # Phase 2: nF0F1 — start the other direction, alternating.
        self._set_phase(2)
        self._recv_forward(0)
        for i in range(n["nF0F1"]):
            self._forward_chunk(0, recv=False, send=middle)
            self._recv_forward(0)
            self._forward_chunk(1, send=(not middle) or (i < n["nF0F1"] - 1))
            if not middle:
                self._send_forward(0)

        # Phase 3: nB1W1F1 — first backwards, weight gradients deferred (zero bubble).
        self._set_phase(3)
        for _ in range(n["nB1W1F1"]):
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)

        # Phase 4: nF0B1F1B0 — the steady state: every step a forward of one direction
        # overlapped with a backward of the other.
        self._set_phase(4)
        for i in range(n["nF0B1F1B0"]):
            if i == 0:
                if middle:
                    # Not overlapped on purpose: sending F0 and B1 early shortens the bubble.
                    self._forward_chunk(0, recv=False, send=False)
                    self._send_forward(1)
                    self._backward_chunk(1, send=False)
                    self._send_forward(0)
                    self._send_backward(1)
                else:
                    self._forward_backward_chunk(0, 1, recv0=False)
            else:
                self._forward_backward_chunk(0, 1)
            self._forward_backward_chunk(1, 0)

        # Phase 5: nB1F1B0 — the own direction has no forwards left.
        self._set_phase(5)
        for _ in range(n["nB1F1B0"]):
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)

        # Phase 6: nB1B0 — drain; the second half of these backwards defers W.
        self._set_phase(6)
        half_rank = min(self.rank, self.num_ranks - 1 - self.rank)
        enable_zb = False
        steps = n["nB1B0"]
        for i in range(steps):
            if i == steps // 2 and half_rank % 2 == 1:
                enable_zb = True
            self._backward_chunk(1, enable_zb=enable_zb)
            if i == steps // 2 and half_rank % 2 == 0:
                enable_zb = True
            self._backward_chunk(0, enable_zb=enable_zb)

        # Phase 7: nWB0 — a deferred W fills each wait for the next gradient.
        self._set_phase(7)
        for _ in range(n["nWB0"]):
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)

        # Phase 8: nW — the remaining weight gradients.
        self._set_phase(8)
        for _ in range(n["nW"]):
            self._weight_chunk()
