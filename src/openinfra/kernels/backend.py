"""Choosing between a Triton kernel and its PyTorch reference, once, with the reason recorded.

Every kernel entry point asks :func:`use_triton` with the tensor it is about to work on:

- on a CUDA tensor of a Hopper-class GPU (compute capability >= 9.0) with Triton installed,
  the Triton kernel runs;
- everywhere else the PyTorch reference runs (it is the CPU path and the test oracle).

``OPENINFRA_KERNELS`` overrides the choice: ``reference`` forces the reference everywhere (for
A/B checks on a GPU); ``triton`` forces the kernels, which on CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["use_triton", "describe_backend", "triton_installed", "interpreter_enabled"]

_ENV = "OPENINFRA_KERNELS"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _hopper(device_index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 9


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel should run on ``t`` (see the module docstring for the rule)."""
    mode = os.environ.get(_ENV, "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_installed():
            raise RuntimeError(f"{_ENV}=triton but Triton is not installed")
        if not t.is_cuda and not interpreter_enabled():
            raise RuntimeError(f"{_ENV}=triton on a CPU tensor needs TRITON_INTERPRET=1")
        return True
    if mode != "auto":
        raise ValueError(f"{_ENV} must be auto, triton or reference, got {mode!r}")
    return t.is_cuda and triton_installed() and _hopper(t.device.index or 0)


def describe_backend() -> str:
    """One line saying which path kernels take on this machine, and why."""
    mode = os.environ.get(_ENV, "auto")
    if mode != "auto":
        return f"{_ENV}={mode} (forced)"
    if not torch.cuda.is_available():
        return "reference (no CUDA device)"
    if not triton_installed():
        return "reference (Triton not installed)"
    name = torch.cuda.get_device_name()
    if not _hopper(torch.cuda.current_device()):
        return f"reference ({name} is not Hopper-class, compute capability < 9.0)"
    return f"triton on {name}"
