"""DeepGEMM's API in Triton: FP8 block-scaled GEMMs (dense and grouped for MoE), bf16 GEMMs, the
FP8 cast helpers, and an autograd ``FP8Linear``.

Scaling recipe (DeepSeek-V3): activations per token per 128 channels, weights per 128x128 block,
scale = amax / 448 (the e4m3 maximum), amax clamped at 1e-4, optionally rounded up to a power of
two ("ue8m0"). Every entry point runs the Triton kernel on a Hopper GPU and the PyTorch reference
elsewhere (``openinfra.kernels.backend``).

Example::

    from openinfra.kernels import deep_gemm as dg
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2112, 7168, device="cuda", dtype=torch.bfloat16)
    d = torch.empty(4096, 2112, device="cuda", dtype=torch.bfloat16)
    dg.fp8_gemm_nt(dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w), d)
    assert dg.calc_diff(d, x.float() @ w.float().T) < 1e-3
"""

from openinfra.kernels.deep_gemm.block_cast import per_block_cast_to_fp8, per_channel_cast_to_fp8
from openinfra.kernels.deep_gemm.cast import per_token_cast_to_fp8
from openinfra.kernels.deep_gemm.gemm import (
    bf16_gemm_nn, bf16_gemm_nt, bf16_gemm_tn, bf16_gemm_tt,
    fp8_gemm_nn, fp8_gemm_nt, fp8_gemm_tn, fp8_gemm_tt,
    k_grouped_fp8_gemm_nt_contiguous, k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked,
    m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked,
)
from openinfra.kernels.deep_gemm.gemm.config import get_num_sms, set_num_sms
from openinfra.kernels.deep_gemm.layout import (
    get_col_major_tma_aligned_tensor, get_mn_major_tma_aligned_tensor, get_tma_aligned_size,
)
from openinfra.kernels.deep_gemm.linear import FP8Linear, fp8_linear
from openinfra.kernels.deep_gemm.utils import (
    align, calc_diff, ceil_div, get_m_alignment_for_contiguous_layout, get_mk_alignment_for_contiguous_layout,
)

__all__ = [
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous",
    "per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8",
    "get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor", "get_tma_aligned_size",
    "set_num_sms", "get_num_sms",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "calc_diff", "ceil_div", "align", "FP8Linear", "fp8_linear",
]
