"""PyTorch references of every GEMM entry point: the CPU path and the oracle of the kernels.

Each reference dequantizes its FP8 operands (``x.float() * scale`` group-wise) and multiplies in
fp32, which is the function the kernels compute. The kernels get there by DeepGEMM's two-level
accumulation: the tensor cores sum one 128-deep K slice into a fresh accumulator, then the slice is
scaled by ``sfa[m, k/128] * sfb[n/gran, k/128]`` and added into an fp32 accumulator. Scales factor
out of each slice, so the two differ only by fp32 rounding order (and, on Hopper, by the tensor
cores' reduced-precision sum inside a slice, which is what the 128-deep promotion bounds).

All functions take *logical* operands: ``a`` [M, K], ``b`` [N, K] (the "NT" form) in any strides;
the API maps the nn / tn / tt layouts onto these by transposed views.
"""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.utils import GROUP_SIZE

__all__ = [
    "dequantize", "fp8_gemm_nt_reference", "bf16_gemm_nt_reference",
    "m_grouped_fp8_gemm_nt_contiguous_reference", "m_grouped_fp8_gemm_nt_masked_reference",
    "m_grouped_bf16_gemm_nt_contiguous_reference", "m_grouped_bf16_gemm_nt_masked_reference",
    "k_grouped_fp8_gemm_reference",
]


def dequantize(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """fp32 value of an FP8 operand ``x`` [rows, K] with scales ``sf`` [rows | ceil(rows/128), K/128].

    The row granularity of ``sf`` (1 per row, or 1 per 128 rows) is read off its first dimension.
    """
    rows, k = x.shape
    row_gran = 1 if sf.shape[0] == rows else GROUP_SIZE
    scale = sf.float().repeat_interleave(row_gran, dim=0)[:rows].repeat_interleave(GROUP_SIZE, dim=1)[:, :k]
    return x.float() * scale


def _finish(acc: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if c is not None:
        acc = acc + c.float()
    d.copy_(acc.to(d.dtype))
    return d


def fp8_gemm_nt_reference(a, sfa, b, sfb, d, c=None) -> torch.Tensor:
    """``d = dequant(a) @ dequant(b).T (+ c)``: a [M, K] e4m3, sfa [M, K/128], b [N, K] e4m3,
    sfb [ceil(N/128) | N, K/128]; d [M, N] bf16 / fp32 is written and returned."""
    return _finish(dequantize(a, sfa) @ dequantize(b, sfb).T, d, c)


def bf16_gemm_nt_reference(a, b, d, c=None) -> torch.Tensor:
    """``d = a @ b.T (+ c)`` in fp32: a [M, K], b [N, K] bf16."""
    return _finish(a.float() @ b.float().T, d, c)


def m_grouped_fp8_gemm_nt_contiguous_reference(a, sfa, b, sfb, d, m_indices) -> torch.Tensor:
    """Row ``i`` of ``d`` is ``dequant(a)[i] @ dequant(b[m_indices[i]]).T``; rows with -1 are not
    written. a [M, K], b [G, N, K], sfb [G, ceil(N/128), K/128], d [M, N], m_indices [M] int."""
    a_deq = dequantize(a, sfa)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            d[rows] = (a_deq[rows] @ dequantize(b[g], sfb[g]).T).to(d.dtype)
    return d


def m_grouped_bf16_gemm_nt_contiguous_reference(a, b, d, m_indices) -> torch.Tensor:
    """bf16 form of :func:`m_grouped_fp8_gemm_nt_contiguous_reference`."""
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            d[rows] = (a[rows].float() @ b[g].float().T).to(d.dtype)
    return d


def m_grouped_fp8_gemm_nt_masked_reference(a, sfa, b, sfb, d, masked_m) -> torch.Tensor:
    """``d[g, :masked_m[g]] = dequant(a[g, :masked_m[g]]) @ dequant(b[g]).T``; other rows untouched.
    a [G, max_m, K], sfa [G, max_m, K/128], b [G, N, K], sfb [G, ceil(N/128), K/128], d [G, max_m, N]."""
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            d[g, :rows] = (dequantize(a[g, :rows], sfa[g, :rows]) @ dequantize(b[g], sfb[g]).T).to(d.dtype)
    return d


def m_grouped_bf16_gemm_nt_masked_reference(a, b, d, masked_m) -> torch.Tensor:
    """bf16 form of :func:`m_grouped_fp8_gemm_nt_masked_reference`."""
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            d[g, :rows] = (a[g, :rows].float() @ b[g].float().T).to(d.dtype)
    return d


def k_grouped_fp8_gemm_reference(a_groups, b_groups, d, c=None) -> torch.Tensor:
    """``d[g] = dequant(a_g) @ dequant(b_g).T (+ c[g])`` for each group.

    ``a_groups`` / ``b_groups``: lists of ``(x [M|N, k_g], sf [M|N, k_g/128])`` logical K-major
    views, one per group (the API slices them out of the contiguous buffers); an empty group
    (k_g = 0) gives ``d[g] = c[g]`` or zeros.
    """
    for g, ((a, sfa), (b, sfb)) in enumerate(zip(a_groups, b_groups)):
        if a.shape[1]:
            acc = dequantize(a, sfa) @ dequantize(b, sfb).T
        else:
            acc = torch.zeros(d.shape[1:], dtype=torch.float32, device=d.device)
        _finish(acc, d[g], None if c is None else c[g])
    return d
