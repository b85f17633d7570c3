"""Per-block (128x128) and per-channel (128x1) FP8 casts: Triton kernels with PyTorch references."""

from openinfra.kernels.deep_gemm.block_cast.api import per_block_cast_to_fp8, per_channel_cast_to_fp8

__all__ = ["per_block_cast_to_fp8", "per_channel_cast_to_fp8"]
