"""DeepGEMM's API in Triton: FP8 block-scaled GEMMs and the FP8 cast helpers.

Scaling recipe (DeepSeek-V3): activations per token per 128 channels, weights per 128x128 block,
scale = amax / 448 (the e4m3 maximum), amax clamped at 1e-4, optionally rounded up to a power of
two ("ue8m0").
"""

from openinfra.kernels.deep_gemm.cast import per_token_cast_to_fp8
from openinfra.kernels.deep_gemm.utils import ceil_div

__all__ = ["per_token_cast_to_fp8", "ceil_div"]
