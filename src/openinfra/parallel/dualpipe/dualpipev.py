"""DualPipeV: DualPipe folded into a "V" (the "cut-in-half" variant), for any PP >= 1.

The model has 2*PP stages. Rank r holds stage r (``module[0]``, the descending arm) and stage
2*PP-1-r (``module[1]``, the ascending arm), so micro-batches go down ranks 0..PP-1 through
``module[0]``, turn around on the last rank without communication and come back up through
``module[1]``; inputs, labels, loss and outputs all live on rank 0. Same eight phases as
DualPipe with half the parameters per device.
"""

from __future__ import annotations

from .base import DualPipeBase
from .schedule import _check, phase_counts

__all__ = ["DualPipeV"]


class DualPipeV(DualPipeBase):
    """DualPipeV over ``process_group`` (PP = its size, any >= 1).

    ``DualPipeV(modules=(stage_r, stage_{2PP-1-r}), batch_dim=0, process_group=None,
    rank_mapping=None, *, p2p_shapes=None, p2p_dtypes=None, recorder=None)``. ``step`` takes
    inputs, labels and the criterion on rank 0 and returns (loss [chunks], outputs) there.
    """

    schedule_name = "DualPipeV"

    def _is_first_stage(self, m: int) -> bool:
        return self.is_first_rank and m == 0

    def _is_last_stage(self, m: int) -> bool:
        return self.is_first_rank and m == 1

    def _turns_out(self, m: int) -> bool:
        return self.is_last_rank and m == 0

    def _turns_in(self, m: int) -> bool:
        return self.is_last_rank and m == 1

    def _validate_chunks(self, num_chunks: int) -> None:
        _check("dualpipev", self.num_ranks, num_chunks, self.rank)

    def _place_inputs(self, micro_inputs: list, micro_labels: list) -> None:
        if self.is_first_rank:
            self.input_chunks[0].extend(micro_inputs)
            self.labels[1].extend(micro_labels)

    def _output_module(self) -> int | None:
        return 1 if self.is_first_rank else None

    def _run_schedule(self, num_chunks: int) -> None:
        n = phase_counts("dualpipev", self.num_ranks, num_chunks, self.rank)
        tip = self.is_last_rank

        # Phase 1: nF0 — fill the descending arm.
        self._set_phase(1)
        for _ in range(n["nF0"]):
            self._forward_chunk(0)

        # Phase 2: nF0F1 — alternate both arms (the tip feeds its own ascending arm).
        self._set_phase(2)
        self._recv_forward(0)
        for i in range(n["nF0F1"]):
            self._forward_chunk(0, recv=False, send=False)
            self._recv_forward(0)
            self._forward_chunk(1, send=(not tip) or (i < n["nF0F1"] - 1))
            self._send_forward(0)

        # Phase 3: nB1W1F1 — first backwards, weight gradients deferred (zero bubble).
        self._set_phase(3)
        for _ in range(n["nB1W1F1"]):
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)

        # Phase 4: nF0B1F1B0 — the steady state, forward of one arm overlapped with backward of the other.
        self._set_phase(4)
        for i in range(n["nF0B1F1B0"]):
            if i == 0:
                if tip:
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

        # Phase 5: nB1F1B0.
        self._set_phase(5)
        for _ in range(n["nB1F1B0"]):
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)

        # Phase 6: nB1B0 — drain; the second half of these backwards defers W.
        self._set_phase(6)
        enable_zb = False
        steps = n["nB1B0"]
        for i in range(steps):
            if i == steps // 2 and self.rank % 2 == 1:
                enable_zb = True
            self._backward_chunk(1, enable_zb=enable_zb)
            if i == steps // 2 and self.rank % 2 == 0:
                enable_zb = True
            self._backward_chunk(0, enable_zb=enable_zb)

        # Phase 7: nWB0.
        self._set_phase(7)
        for _ in range(n["nWB0"]):
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)

        # Phase 8: nW.
        self._set_phase(8)
        for _ in range(n["nW"]):
            self._weight_chunk()
