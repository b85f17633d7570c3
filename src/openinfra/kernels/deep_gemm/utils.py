"""Small shared helpers of DeepGEMM's public surface."""

from __future__ import annotations

__all__ = ["ceil_div", "FP8_E4M3_MAX", "GROUP_SIZE"]

#: Largest finite float8_e4m3fn value; scales map each group's amax onto it.
FP8_E4M3_MAX = 448.0
#: Channels per scale group (1x128 for activations, 128x128 for weights).
GROUP_SIZE = 128


def ceil_div(x: int, y: int) -> int:
    """``ceil(x / y)`` for non-negative ints."""
    return (x + y - 1) // y
