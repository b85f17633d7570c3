"""FP8 block-scaled and bf16 GEMMs: dense (nt/nn/tn/tt), M-grouped (contiguous, masked), K-grouped."""

from openinfra.kernels.deep_gemm.gemm.api import (
    bf16_gemm_nn, bf16_gemm_nt, bf16_gemm_tn, bf16_gemm_tt,
    fp8_gemm_nn, fp8_gemm_nt, fp8_gemm_tn, fp8_gemm_tt,
)
from openinfra.kernels.deep_gemm.gemm.grouped import (
    k_grouped_fp8_gemm_nt_contiguous, k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked,
    m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked,
)

__all__ = [
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous",
]
