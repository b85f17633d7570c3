"""The eight phases of DualPipe/DualPipeV and how many iterations each runs on a rank.

Phase names follow the paper's figure: nF0, nF0F1, nB1W1F1, nF0B1F1B0 (the main, fully
overlapped phase), nB1F1B0, nB1B0, nWB0, nW. ``F0`` is a forward chunk of phase 0, ``B1`` a
backward chunk of phase 1, ``W`` a deferred weight-gradient chunk (zero bubble).

For DualPipe with PP ranks and C chunks, rank r uses its distance from the nearer end,
h = min(r, PP-1-r), with PP/2 "half ranks" and C/2 chunks per direction; DualPipeV is the same
schedule folded into a V, with r itself, PP and C in those roles.
"""

from __future__ import annotations

__all__ = ["PHASES", "phase_counts", "compute_counts", "bubble_formula"]

PHASES = ("nF0", "nF0F1", "nB1W1F1", "nF0B1F1B0", "nB1F1B0", "nB1B0", "nWB0", "nW")


def _check(schedule: str, num_ranks: int, num_chunks: int, rank: int) -> None:
    if schedule not in ("dualpipe", "dualpipev"):
        raise ValueError(f"schedule must be 'dualpipe' or 'dualpipev', got {schedule!r}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be in [0, {num_ranks}), got {rank}")
    if schedule == "dualpipe":
        if num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline ranks, got {num_ranks} (use DualPipeV for odd counts)")
        if num_chunks % 2 or num_chunks < 2 * num_ranks:
            raise ValueError(
                f"DualPipe needs num_chunks even and >= 2 * PP = {2 * num_ranks}, got num_chunks={num_chunks}")
    elif num_chunks < 2 * num_ranks:
        raise ValueError(f"DualPipeV needs num_chunks >= 2 * PP = {2 * num_ranks}, got num_chunks={num_chunks}")


def phase_counts(schedule: str, num_ranks: int, num_chunks: int, rank: int) -> dict[str, int]:
    """Loop counts of the eight phases on ``rank`` (ordered as ``PHASES``)."""
    _check(schedule, num_ranks, num_chunks, rank)
    if schedule == "dualpipe":
        n, r, c = num_ranks // 2, min(rank, num_ranks - 1 - rank), num_chunks // 2
    else:
        n, r, c = num_ranks, rank, num_chunks
    # Each rank starts its second direction after warming up (n - r - 1) chunks of the first;
    # the steady phase shrinks by the same amount so every rank runs c chunks per direction.
    counts = [(n - r - 1) * 2, r + 1, n - r - 1, c - 2 * n + r + 1, n - r - 1, r + 1, n - r - 1, r + 1]
    return dict(zip(PHASES, counts))


def compute_counts(schedule: str, num_ranks: int, num_chunks: int, rank: int, overlapped: bool = True) -> dict[str, int]:
    """How many F, B, W and F&B steps ``rank`` records in a training step.

    With ``overlapped=False`` every F&B pair is recorded as one F and one B. W counts the
    zero-bubble B steps (each is later popped by one W).
    """
    p = phase_counts(schedule, num_ranks, num_chunks, rank)
    per_direction = num_chunks // 2 if schedule == "dualpipe" else num_chunks
    is_tip = schedule == "dualpipev" and rank == num_ranks - 1
    is_middle = schedule == "dualpipe" and rank in (num_ranks // 2 - 1, num_ranks // 2)
    fb = 2 * p["nF0B1F1B0"] + p["nB1F1B0"]
    if is_tip or is_middle:
        fb -= 1  # the first main-phase pair is split on purpose to shorten the bubble
    w = p["nB1W1F1"] + p["nWB0"] + p["nW"]
    total = 2 * per_direction
    if overlapped:
        return {"F": total - fb, "B": total - fb, "W": w, "F&B": fb}
    return {"F": total, "B": total, "W": w, "F&B": 0}


def bubble_formula(schedule: str, num_ranks: int, f: float, b: float, w: float, fb: float | None = None) -> float:
    """Per-rank bubble time of a schedule (the DualPipe README's table), same unit as the inputs.

    ``f``/``b``/``w``: time of one forward, full backward (input + weight) and weight-only chunk;
    ``fb``: time of an overlapped forward+backward pair (default ``f + b``, no overlap).
    Schedules: "1f1b", "zb1p", "dualpipe", "dualpipev".
    """
    fb = f + b if fb is None else fb
    pp = num_ranks
    if schedule == "1f1b":
        return (pp - 1) * (f + b)
    if schedule == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if schedule in ("dualpipe", "dualpipev"):
        # DualPipeV on PP devices is DualPipe on 2*PP stage pairs folded: same formula in terms
        # of the unfolded pipeline (2*PP stages -> (2PP/2 - 1)).
        half = pp / 2 - 1 if schedule == "dualpipe" else pp - 1
        return half * (fb + b - 3 * w)
    raise ValueError(f"unknown schedule {schedule!r}; expected 1f1b, zb1p, dualpipe or dualpipev")
