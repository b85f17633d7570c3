"""argparse ``type=`` helpers for command options (the bench routines', ``openinfra fs``'s): a bad
value is an argparse error naming the flag (``argument --tokens: expected an integer >= 1, got
'0'``, exit status 2), not a traceback or a run that silently does something else. Each returns what ``int`` / ``float`` / ``str``
would, so valid input behaves as before."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "non_negative_int", "power_of_two", "positive_float", "non_negative_float",
           "fraction", "device", "device_name"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _require(ok: bool, expected: str, text: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive_int(text: str) -> int:
    """A count or size: an integer >= 1."""
    v = _int(text)
    _require(v >= 1, "an integer >= 1", text)
    return v


def non_negative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "none" or "skip")."""
    v = _int(text)
    _require(v >= 0, "an integer >= 0", text)
    return v


def power_of_two(text: str) -> int:
    """A kernel tile size or warp count: 1, 2, 4, 8, ..."""
    v = _int(text)
    _require(v >= 1 and not v & (v - 1), "a power of two (1, 2, 4, 8, ...)", text)
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (a size, a time limit)."""
    v = _float(text)
    _require(v > 0, "a number > 0", text)
    return v


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    v = _float(text)
    _require(v >= 0, "a number >= 0", text)
    return v


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    v = _float(text)
    _require(0 <= v <= 1, "a number from 0 to 1", text)
    return v


def _check_device(text: str, need_visible: bool) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 and need_visible:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible here; use cpu")
        if count and dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return text


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda`` or ``cuda:N`` (N below the visible count)."""
    return _check_device(text, need_visible=True)


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` without requiring a GPU: for options whose default is a
    string (argparse converts it too) on routines that the CLI refuses without a GPU anyway."""
    return _check_device(text, need_visible=False)
