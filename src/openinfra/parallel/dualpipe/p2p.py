"""Point-to-point shapes and dtypes of a pipeline: given per instance or per call, never global."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["P2PSpec"]


@dataclass(frozen=True)
class P2PSpec:
    """The tensors one stage sends to the next, per micro-batch: their shapes and dtypes.

    ``shapes``: one shape per tensor (e.g. ``[(micro_batch, seq, hidden)]``);
    ``dtypes``: one dtype for all, or one per tensor. Gradients flowing back use the same spec.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def make(cls, shapes, dtypes) -> "P2PSpec":
        if shapes is None:
            raise ValueError(
                "p2p_shapes is required: pass p2p_shapes=[(micro_batch, ...), ...] to the constructor or to step()"
            )
        if isinstance(shapes, torch.Size) or (isinstance(shapes, (tuple, list)) and shapes and all(isinstance(d, int) for d in shapes)):
            shapes = [shapes]
        if not isinstance(shapes, (tuple, list)) or not shapes:
            raise ValueError(f"p2p_shapes must be a non-empty list of shapes, got {shapes!r}")
        norm = []
        for i, s in enumerate(shapes):
            if not isinstance(s, (tuple, list, torch.Size)) or not all(isinstance(d, int) and d >= 0 for d in s):
                raise ValueError(f"p2p_shapes[{i}] must be a tuple of non-negative ints, got {s!r}")
            norm.append(tuple(int(d) for d in s))
        if dtypes is None:
            dtypes = torch.float32
        if isinstance(dtypes, torch.dtype):
            dtypes = [dtypes] * len(norm)
        dtypes = list(dtypes)
        if len(dtypes) != len(norm) or not all(isinstance(d, torch.dtype) for d in dtypes):
            raise ValueError(f"p2p_dtypes must be one torch.dtype or one per shape ({len(norm)}), got {dtypes!r}")
        return cls(tuple(norm), tuple(dtypes))

    def empty(self, device: torch.device, requires_grad: bool) -> list[torch.Tensor]:
        """Receive buffers for one micro-batch (leaves that collect the input gradient)."""
        out = []
        for s, d in zip(self.shapes, self.dtypes):
            t = torch.empty(s, dtype=d, device=device)
            out.append(t.requires_grad_() if requires_grad and d.is_floating_point else t)
        return out

    def check(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Raise ``ValueError`` if ``tensors`` do not match the spec (before they hang a peer)."""
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"{what}: stage produced {len(tensors)} tensor(s) but p2p_shapes declares {len(self.shapes)}"
            )
        for i, (t, s, d) in enumerate(zip(tensors, self.shapes, self.dtypes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}: tensor {i} is {type(t).__name__}, expected a tensor")
            if tuple(t.shape) != s or t.dtype != d:
                raise ValueError(
                    f"{what}: tensor {i} has shape {tuple(t.shape)} dtype {t.dtype}, but p2p_shapes/p2p_dtypes "
                    f"declare {s} {d}"
                )

    def append_irecv(self, ops: list, peer: int, group, device: torch.device, requires_grad: bool,
                     staging: list | None = None) -> list[torch.Tensor]:
        """Queue receives for one micro-batch; returns the buffers (filled once the ops complete).

        With ``staging`` (a list), the wire buffers are host tensors and ``(host, device)`` pairs
        are appended for the caller to copy after the wait: gloo reads and writes raw host memory.
        """
        tensors = self.empty(device, requires_grad)
        src = dist.distributed_c10d.get_global_rank(group, peer)
        for t in tensors:
            wire = t
            if staging is not None:
                wire = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                staging.append((wire, t))
            ops.append(dist.P2POp(dist.irecv, wire, src, group))
        return tensors

    @staticmethod
    def append_isend(ops: list, tensors: Sequence[torch.Tensor], peer: int, group, stage_on_host: bool = False) -> None:
        dst = dist.distributed_c10d.get_global_rank(group, peer)
        # Send the data, not the autograd node: a leaf may require grad.
        ops.extend(dist.P2POp(dist.isend, t.detach().cpu() if stage_on_host else t.detach().contiguous(), dst, group)
                   for t in tensors)

    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in zip(self.shapes, self.dtypes))
