"""Dense GEMM entry points with DeepGEMM's names: FP8 (nt / nn / tn / tt) and bf16.

Layout letters follow the math: ``D = op(A) @ op(B)``, first letter for A, second for B, ``n`` =
as stored, ``t`` = transposed. So ``nt`` takes a [M, K] and b [N, K] (both K-major, the fast
form); ``nn`` takes b as [K, N]; ``tn`` takes a as [K, M] and b as [K, N]; ``tt`` a [K, M] and
b [N, K]. Scale factors follow their tensor (a [K, M] comes with sfa [K/128, M]). Every form runs
the same kernel through transposed views; only ``nt`` is on the tensor cores' fastest path.

All functions write ``d`` (and return it): ``d = op(A) @ op(B) (+ c)``.
"""

from __future__ import annotations

import torch

from openinfra.kernels.backend import use_triton
from openinfra.kernels.deep_gemm.gemm import reference as ref
from openinfra.kernels.deep_gemm.gemm.config import choose_config
from openinfra.kernels.deep_gemm.gemm.validate import (
    OUT_DTYPES, check_k, check_out, check_same_device, check_sf, check_tensor, sfb_granularity, split_pair,
)
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE

__all__ = [
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt",
]

Pair = tuple[torch.Tensor, torch.Tensor]


def _fp8_gemm(a, sfa, b, sfb, d, c, recipe) -> torch.Tensor:
    """a [M, K], sfa [M, K/128], b [N, K], sfb logical views; checks, then kernel or reference."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n, kb = b.shape
    if k != kb:
        raise ValueError(f"a and b must share K, got K={k} for a and K={kb} for b")
    check_k(k)
    check_sf("a", sfa, (m, k // GROUP_SIZE))
    gran = sfb_granularity("b", sfb, n, k, recipe)
    check_out("d", d, (m, n))
    if c is not None:
        check_out("c", c, (m, n))
    check_same_device(a=a, sfa=sfa, b=b, sfb=sfb, d=d, c=c)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import DENSE, launch_gemm

        config = choose_config(m, n, k, d.device)
        return launch_gemm(DENSE, a, b, d, config, sfa=sfa, sfb=sfb, c=c, sfb_gran_n=gran)
    return ref.fp8_gemm_nt_reference(a, sfa, b, sfb, d, c)


def fp8_gemm_nt(a: Pair, b: Pair, d: torch.Tensor, c: torch.Tensor | None = None,
                recipe: tuple[int, int, int] | None = None, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d = a @ b.T (+ c)`` with block-scaled FP8 operands.

    Args:
        a: ``(a [M, K] float8_e4m3fn, sfa [M, K/128] float32)``: one scale per row per 128 channels.
        b: ``(b [N, K] float8_e4m3fn, sfb [ceil(N/128), K/128] float32)``: one scale per 128x128
            block; or sfb [N, K/128] (1x128 per row, recipe (1, 1, 128), the weight-gradient form).
        d: [M, N] bfloat16 or float32 output, written in place.
        c: optional [M, N] bf16 / fp32 added to the product (accumulation, e.g. ``c = d``).
        recipe: scaling granularity ``(1, gran_n_b, 128)``; inferred from sfb's shape when None.
        disable_ue8m0_cast: accepted for DeepGEMM compatibility; scales are read as fp32 here, so
            power-of-two ("ue8m0") scales from the casts are used exactly as they are either way.

    K must be a multiple of 128. Any strides are accepted; the scales may be in the MN-major form of
    :func:`get_mn_major_tma_aligned_tensor`.
    """
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    return _fp8_gemm(a_x, a_sf, b_x, b_sf, d, c, recipe)


def fp8_gemm_nn(a: Pair, b: Pair, d: torch.Tensor, c: torch.Tensor | None = None,
                recipe: tuple[int, int, int] | None = None, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d = a @ b (+ c)``: a ``(a [M, K], sfa [M, K/128])``, b ``(b [K, N], sfb [K/128, ceil(N/128)])``."""
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    _need_2d(b_x, b_sf)
    return _fp8_gemm(a_x, a_sf, b_x.T, b_sf.T, d, c, recipe)


def fp8_gemm_tn(a: Pair, b: Pair, d: torch.Tensor, c: torch.Tensor | None = None,
                recipe: tuple[int, int, int] | None = None, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d = a.T @ b (+ c)``: a ``(a [K, M], sfa [K/128, M])``, b ``(b [K, N], sfb [K/128, ceil(N/128)])``."""
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    _need_2d(a_x, a_sf, b_x, b_sf)
    return _fp8_gemm(a_x.T, a_sf.T, b_x.T, b_sf.T, d, c, recipe)


def fp8_gemm_tt(a: Pair, b: Pair, d: torch.Tensor, c: torch.Tensor | None = None,
                recipe: tuple[int, int, int] | None = None, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d = a.T @ b.T (+ c)``: a ``(a [K, M], sfa [K/128, M])``, b ``(b [N, K], sfb [ceil(N/128), K/128])``."""
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    _need_2d(a_x, a_sf)
    return _fp8_gemm(a_x.T, a_sf.T, b_x, b_sf, d, c, recipe)


def _need_2d(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2:
            raise ValueError(f"operands and scale factors must be 2-D, got shape {tuple(t.shape)}")


_BF16_IN = (torch.bfloat16,)


def _bf16_gemm(a, b, d, c) -> torch.Tensor:
    check_tensor("a", a, _BF16_IN, dim=2)
    check_tensor("b", b, _BF16_IN, dim=2)
    m, k = a.shape
    n, kb = b.shape
    if k != kb:
        raise ValueError(f"a and b must share K, got K={k} for a and K={kb} for b")
    check_out("d", d, (m, n), OUT_DTYPES)
    if c is not None:
        check_out("c", c, (m, n), OUT_DTYPES)
    check_same_device(a=a, b=b, d=d, c=c)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import DENSE, launch_gemm

        config = choose_config(m, n, k, d.device, allow_split_k=False, element_size=2)
        return launch_gemm(DENSE, a, b, d, config, c=c)
    return ref.bf16_gemm_nt_reference(a, b, d, c)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``d = a @ b.T (+ c)``: a [M, K], b [N, K] bfloat16 (any K); d [M, N] bf16 / fp32; fp32 accumulation."""
    return _bf16_gemm(a, b, d, c)


def bf16_gemm_nn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``d = a @ b (+ c)``: a [M, K], b [K, N]."""
    _need_2d(b)
    return _bf16_gemm(a, b.T, d, c)


def bf16_gemm_tn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``d = a.T @ b (+ c)``: a [K, M], b [K, N]."""
    _need_2d(a, b)
    return _bf16_gemm(a.T, b.T, d, c)


def bf16_gemm_tt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``d = a.T @ b.T (+ c)``: a [K, M], b [N, K]."""
    _need_2d(a)
    return _bf16_gemm(a.T, b, d, c)


