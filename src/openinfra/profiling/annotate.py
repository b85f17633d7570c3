"""Phase annotations: named ranges that land in torch.profiler's Chrome traces.

``with phase("attn"): ...`` opens a ``torch.profiler.record_function`` range named
``openinfra:attn``. The summary reads these names back and classifies them:

- compute phases: ``attn``, ``mlp`` and DualPipe's ``F`` (forward), ``B`` (backward for inputs),
  ``W`` (backward for weights), plus ``compute``;
- communication phases: ``dispatch``, ``combine`` (MoE all-to-all), ``send``, ``recv`` (pipeline
  p2p), ``comm``.

Any other name is allowed (it shows on the timeline and in the per-phase table) but counts as
neither. Outside a profiler the range costs one C++ call, so the annotations stay on in production.

PyTorch is imported on the first ``phase(...)``, not with this module: reading and summarizing
traces (``openinfra profile ...``) needs no torch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["phase", "PHASE_PREFIX", "COMPUTE_PHASES", "COMM_PHASES", "PIPELINE_PHASES", "phase_name", "parse_phase"]

PHASE_PREFIX = "openinfra:"
COMPUTE_PHASES = frozenset({"attn", "mlp", "F", "B", "W", "compute"})
COMM_PHASES = frozenset({"dispatch", "combine", "send", "recv", "comm"})
#: Phases that make up a pipeline stage's work; the bubble is the time a rank spends outside them.
PIPELINE_PHASES = frozenset({"F", "B", "W"})


def phase_name(name: str) -> str:
    """The trace event name for phase ``name`` (``openinfra:<name>``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"phase name must be a non-empty string without ':', got {name!r}")
    return PHASE_PREFIX + name


def parse_phase(event_name: str) -> str | None:
    """The phase of a trace event name, or None when it is not one of ours.

    ``openinfra:F`` -> ``F``; an optional suffix after a second colon (``openinfra:F:chunk3``) is
    ignored, so callers may tag instances (micro-batch ids) without creating new phases.
    """
    if not event_name.startswith(PHASE_PREFIX):
        return None
    rest = event_name[len(PHASE_PREFIX):]
    return rest.split(":", 1)[0] or None


@contextlib.contextmanager
def phase(name: str, tag: str | int | None = None) -> Iterator[None]:
    """Annotate the enclosed code as phase ``name`` (optionally tagged, e.g. with a micro-batch id)."""
    import torch.profiler  # lazily: see the module docstring

    full = phase_name(name) if tag is None else f"{phase_name(name)}:{tag}"
    with torch.profiler.record_function(full):
        yield
