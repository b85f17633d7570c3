"""DeepEP's row kernels: permute (+ FP8 cast) and weighted unpermute, Triton on Hopper, PyTorch elsewhere."""

from openinfra.comm.deep_ep.kernels.api import gather_reduce, scatter_rows

__all__ = ["scatter_rows", "gather_reduce"]
