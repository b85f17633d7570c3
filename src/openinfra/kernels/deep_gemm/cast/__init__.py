"""FP8 cast helpers (Triton kernels with PyTorch references)."""

from openinfra.kernels.deep_gemm.cast.api import per_token_cast_to_fp8

__all__ = ["per_token_cast_to_fp8"]
