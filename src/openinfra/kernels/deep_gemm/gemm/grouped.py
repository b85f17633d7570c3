"""Grouped GEMM entry points for MoE, with DeepGEMM's names.

- M-grouped contiguous (prefill / training forward): experts' tokens stacked along M, each
  expert's segment padded to ``get_m_alignment_for_contiguous_layout()`` rows; ``m_indices`` names
  the expert of every row, -1 for padding rows, which are skipped (never written).
- M-grouped masked (decode, fed by the low-latency dispatch, under CUDA graphs): a [G, max_m, K];
  only the first ``masked_m[g]`` rows of group g are computed and written. ``masked_m`` lives on
  the device and the grid does not depend on it, so a captured graph replays for any mask.
- K-grouped contiguous (MoE weight gradients): groups' K ranges lie end to end; d [G, M, N].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openinfra.kernels.backend import use_triton
from openinfra.kernels.deep_gemm.gemm import reference as ref
from openinfra.kernels.deep_gemm.gemm.config import choose_config
from openinfra.kernels.deep_gemm.gemm.validate import (
    OUT_DTYPES, capturing, check_k, check_out, check_same_device, check_sf, check_tensor, sfb_granularity, split_pair,
)
from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div, get_m_alignment_for_contiguous_layout

__all__ = [
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous",
]

Pair = tuple[torch.Tensor, torch.Tensor]
_INT32 = (torch.int32,)


def _check_m_indices(m_indices: object, m: int, groups: int) -> torch.Tensor:
    check_tensor("m_indices", m_indices, _INT32, dim=1)
    if m_indices.shape[0] != m:
        raise ValueError(f"m_indices must have one entry per row of a ({m}), got {m_indices.shape[0]}")
    align = get_m_alignment_for_contiguous_layout()
    if m % align:
        raise ValueError(f"a must have a multiple of {align} rows in the contiguous layout "
                         f"(pad each expert to get_m_alignment_for_contiguous_layout()), got {m}")
    if m == 0 or capturing(m_indices):
        return m_indices
    # One host sync covers both checks: indices in [-1, G), and every 128-row block holding one
    # expert (plus padding), which is what lets a tile take one B slice.
    blocks = m_indices.view(-1, align)
    top = blocks.amax(dim=1)
    low = torch.where(blocks < 0, top[:, None], blocks).amin(dim=1)
    lo, hi, mixed = torch.stack([m_indices.amin(), m_indices.amax(), (low != top).sum()]).tolist()
    if lo < -1 or hi >= groups:
        raise ValueError(f"m_indices must be in [-1, {groups}) (-1 = padding row, else an expert of b), got values in [{lo}, {hi}]")
    if mixed:
        raise ValueError(f"m_indices: {mixed} block(s) of {align} rows mix experts; each expert's rows must start on a "
                         f"multiple of get_m_alignment_for_contiguous_layout() ({align})")
    return m_indices


def m_grouped_fp8_gemm_nt_contiguous(a: Pair, b: Pair, d: torch.Tensor, m_indices: torch.Tensor,
                                     recipe: tuple[int, int, int] | None = None,
                                     disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d[i] = a[i] @ b[m_indices[i]].T`` for every row i with ``m_indices[i] >= 0``.

    Args:
        a: ``(a [M, K] e4m3, sfa [M, K/128] fp32)``, M a multiple of 128.
        b: ``(b [G, N, K] e4m3, sfb [G, ceil(N/128), K/128] fp32)``.
        d: [M, N] bf16 / fp32; padding rows are left as they were.
        m_indices: [M] int32, the expert of each row or -1.

    Raises ValueError for K % 128 != 0, indices outside [-1, G), and experts not aligned to 128
    rows (the last two cost one host sync; skipped while a CUDA graph is being captured).
    """
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    check_tensor("a", a_x, (a_x.dtype,), dim=2)
    check_tensor("b", b_x, (b_x.dtype,), dim=3)
    m, k = a_x.shape
    groups, n, kb = b_x.shape
    if k != kb:
        raise ValueError(f"a and b must share K, got K={k} for a and K={kb} for b")
    check_k(k)
    check_sf("a", a_sf, (m, k // GROUP_SIZE))
    gran = sfb_granularity("b", b_sf, n, k, recipe, lead=(groups,))
    check_out("d", d, (m, n))
    check_same_device(a=a_x, sfa=a_sf, b=b_x, sfb=b_sf, d=d, m_indices=m_indices)
    _check_m_indices(m_indices, m, groups)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import CONTIGUOUS, launch_gemm

        # from 256 rows an expert: the warp-specialized Gluon kernel's contiguous mode (1.27-1.37x
        # the Triton kernel on the H200 bench shapes since its K slices go in pairs: notes run 9)
        config = choose_config(ceil_div(m, groups), n, k, d.device, groups=groups, max_block_m=GROUP_SIZE)
        return launch_gemm(CONTIGUOUS, a_x, b_x, d, config, sfa=a_sf, sfb=b_sf, layout=m_indices, sfb_gran_n=gran)
    return ref.m_grouped_fp8_gemm_nt_contiguous_reference(a_x, a_sf, b_x, b_sf, d, m_indices)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      m_indices: torch.Tensor) -> torch.Tensor:
    """bf16 form: a [M, K], b [G, N, K] bfloat16; d [M, N]; rows with ``m_indices == -1`` skipped."""
    check_tensor("a", a, (torch.bfloat16,), dim=2)
    check_tensor("b", b, (torch.bfloat16,), dim=3)
    m, k = a.shape
    groups, n, kb = b.shape
    if k != kb:
        raise ValueError(f"a and b must share K, got K={k} for a and K={kb} for b")
    check_out("d", d, (m, n))
    check_same_device(a=a, b=b, d=d, m_indices=m_indices)
    _check_m_indices(m_indices, m, groups)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import CONTIGUOUS, launch_gemm

        config = choose_config(ceil_div(m, groups), n, k, d.device, groups=groups, max_block_m=GROUP_SIZE, element_size=2)
        return launch_gemm(CONTIGUOUS, a, b, d, config, layout=m_indices)
    return ref.m_grouped_bf16_gemm_nt_contiguous_reference(a, b, d, m_indices)


def _check_masked(masked_m: object, expected_m: object, groups: int, max_m: int) -> None:
    check_tensor("masked_m", masked_m, _INT32, dim=1)
    if masked_m.shape[0] != groups:
        raise ValueError(f"masked_m must have one entry per group ({groups}), got {masked_m.shape[0]}")
    if not isinstance(expected_m, int) or isinstance(expected_m, bool) or expected_m <= 0:
        raise ValueError(f"expected_m must be a positive int (the typical rows per group), got {expected_m!r}")
    if capturing(masked_m):
        return  # the kernel clamps rows to max_m, so a bad mask cannot write out of bounds
    lo, hi = torch.stack([masked_m.amin(), masked_m.amax()]).tolist() if groups else (0, 0)
    if lo < 0 or hi > max_m:
        raise ValueError(f"masked_m must be in [0, max_m={max_m}], got values in [{lo}, {hi}]")


def m_grouped_fp8_gemm_nt_masked(a: Pair, b: Pair, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                 recipe: tuple[int, int, int] | None = None,
                                 disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """``d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``; the other rows of d are left alone.

    Args:
        a: ``(a [G, max_m, K] e4m3, sfa [G, max_m, K/128] fp32)``.
        b: ``(b [G, N, K] e4m3, sfb [G, ceil(N/128), K/128] fp32)``.
        d: [G, max_m, N] bf16 / fp32.
        masked_m: [G] int32 on the device: rows to compute per group.
        expected_m: typical ``masked_m`` (a host int): only steers the tile choice.

    Usable under CUDA graph capture (no host sync then; ``masked_m > max_m`` is then clamped
    instead of raising).
    """
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    check_tensor("a", a_x, (a_x.dtype,), dim=3)
    check_tensor("b", b_x, (b_x.dtype,), dim=3)
    groups, max_m, k = a_x.shape
    gb, n, kb = b_x.shape
    if gb != groups:
        raise ValueError(f"a and b must have the same number of groups, got {groups} and {gb}")
    if k != kb:
        raise ValueError(f"a and b must share K, got K={k} for a and K={kb} for b")
    check_k(k)
    check_sf("a", a_sf, (groups, max_m, k // GROUP_SIZE))
    gran = sfb_granularity("b", b_sf, n, k, recipe, lead=(groups,))
    check_out("d", d, (groups, max_m, n))
    check_same_device(a=a_x, sfa=a_sf, b=b_x, sfb=b_sf, d=d, masked_m=masked_m)
    _check_masked(masked_m, expected_m, groups, max_m)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import MASKED, launch_gemm

        config = choose_config(min(expected_m, max_m), n, k, d.device, groups=groups)
        return launch_gemm(MASKED, a_x, b_x, d, config, sfa=a_sf, sfb=b_sf, layout=masked_m, sfb_gran_n=gran)
    return ref.m_grouped_fp8_gemm_nt_masked_reference(a_x, a_sf, b_x, b_sf, d, masked_m)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> torch.Tensor:
    """bf16 form: a [G, max_m, K], b [G, N, K] bfloat16; d [G, max_m, N]."""
    check_tensor("a", a, (torch.bfloat16,), dim=3)
    check_tensor("b", b, (torch.bfloat16,), dim=3)
    groups, max_m, k = a.shape
    gb, n, kb = b.shape
    if gb != groups or k != kb:
        raise ValueError(f"b must be [G={groups}, N, K={k}], got {tuple(b.shape)}")
    check_out("d", d, (groups, max_m, n))
    check_same_device(a=a, b=b, d=d, masked_m=masked_m)
    _check_masked(masked_m, expected_m, groups, max_m)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel import MASKED, launch_gemm

        config = choose_config(min(expected_m, max_m), n, k, d.device, groups=groups, element_size=2)
        return launch_gemm(MASKED, a, b, d, config, layout=masked_m)
    return ref.m_grouped_bf16_gemm_nt_masked_reference(a, b, d, masked_m)


# --- K-grouped ----------------------------------------------------------------------------------

def _check_ks(ks: object, ks_tensor: object, groups: int) -> list[int]:
    if not isinstance(ks, Sequence) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ks):
        raise TypeError(f"ks must be a list of ints (K of each group), got {ks!r}")
    ks = list(ks)
    if len(ks) != groups:
        raise ValueError(f"ks must have one entry per group of d ({groups}), got {len(ks)}")
    for g, kg in enumerate(ks):
        if kg < 0 or kg % GROUP_SIZE:
            raise ValueError(f"ks[{g}] must be a non-negative multiple of {GROUP_SIZE}, got {kg}")
    check_tensor("ks_tensor", ks_tensor, _INT32, dim=1)
    if ks_tensor.shape[0] != groups:
        raise ValueError(f"ks_tensor must have {groups} entries, got {ks_tensor.shape[0]}")
    if not capturing(ks_tensor) and ks_tensor.tolist() != ks:
        raise ValueError(f"ks_tensor must hold the same values as ks, got {ks_tensor.tolist()} and {ks}")
    return ks


def _k_grouped(a, b, d, ks, ks_tensor, c, recipe, k_major: bool) -> torch.Tensor:
    a_x, a_sf = split_pair("a", a)
    b_x, b_sf = split_pair("b", b)
    check_tensor("d", d, OUT_DTYPES, dim=3)
    groups, m, n = d.shape
    ks = _check_ks(ks, ks_tensor, groups)
    if recipe is not None and tuple(recipe) != (1, 1, 128):
        raise ValueError(f"recipe of the K-grouped GEMMs must be (1, 1, 128), got {tuple(recipe)}")
    total = sum(ks)
    kg = total // GROUP_SIZE
    if k_major:
        for name, x, sf, rows in (("a", a_x, a_sf, m), ("b", b_x, b_sf, n)):
            if x.dim() != 1 or x.numel() != total * rows:
                raise ValueError(f"{name} must be flat with sum(ks) * {rows} = {total * rows} elements (K-major groups), got shape {tuple(x.shape)}")
            if not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous in the K-major layout")
            check_sf(name, sf, (rows, kg))
    else:
        for name, x, sf, rows in (("a", a_x, a_sf, m), ("b", b_x, b_sf, n)):
            if tuple(x.shape) != (total, rows):
                raise ValueError(f"{name} must have shape (sum(ks)={total}, {rows}), got {tuple(x.shape)}")
            check_sf(name, sf, (kg, rows))
    if c is not None:
        check_out("c", c, (groups, m, n))
    check_same_device(a=a_x, sfa=a_sf, b=b_x, sfb=b_sf, d=d, c=c, ks_tensor=ks_tensor)
    if use_triton(d):
        from openinfra.kernels.deep_gemm.gemm.kernel_k_grouped import launch_k_grouped_gemm

        config = choose_config(m, n, max(ks) if ks else 0, d.device, groups=groups, allow_split_k=False)
        return launch_k_grouped_gemm(a_x, a_sf, b_x, b_sf, d, ks_tensor, config, k_major=k_major, c=c)
    a_groups, b_groups, start = [], [], 0
    for kg_len in ks:
        s0, s1 = start // GROUP_SIZE, (start + kg_len) // GROUP_SIZE
        if k_major:
            a_groups.append((a_x[start * m:(start + kg_len) * m].view(m, kg_len), a_sf[:, s0:s1]))
            b_groups.append((b_x[start * n:(start + kg_len) * n].view(n, kg_len), b_sf[:, s0:s1]))
        else:
            a_groups.append((a_x[start:start + kg_len].T, a_sf[s0:s1].T))
            b_groups.append((b_x[start:start + kg_len].T, b_sf[s0:s1].T))
        start += kg_len
    return ref.k_grouped_fp8_gemm_reference(a_groups, b_groups, d, c)


def k_grouped_fp8_gemm_tn_contiguous(a: Pair, b: Pair, d: torch.Tensor, ks: list[int], ks_tensor: torch.Tensor,
                                     c: torch.Tensor | None = None,
                                     recipe: tuple[int, int, int] | None = (1, 1, 128)) -> torch.Tensor:
    """``d[g] = a_g.T @ b_g (+ c[g])`` with the groups stacked along K, MN-major (weight gradients).

    Args:
        a: ``(a [sum(ks), M] e4m3, sfa [sum(ks)/128, M] fp32)``: group g is rows
            ``[sum(ks[:g]), sum(ks[:g+1]))``, scaled per column per 128 rows
            (:func:`per_channel_cast_to_fp8` of each group).
        b: ``(b [sum(ks), N] e4m3, sfb [sum(ks)/128, N] fp32)``.
        d: [G, M, N] fp32 (or bf16).
        ks: K of each group (host ints, multiples of 128, 0 allowed); ks_tensor: the same as an
            int32 device tensor (the kernel reads it, so a graph can replay with new ks).
        c: optional [G, M, N] added (``c = d`` accumulates, as the weight-gradient update does).
    """
    return _k_grouped(a, b, d, ks, ks_tensor, c, recipe, k_major=False)


def k_grouped_fp8_gemm_nt_contiguous(a: Pair, b: Pair, d: torch.Tensor, ks: list[int], ks_tensor: torch.Tensor,
                                     c: torch.Tensor | None = None,
                                     recipe: tuple[int, int, int] | None = (1, 1, 128)) -> torch.Tensor:
    """K-major form of :func:`k_grouped_fp8_gemm_tn_contiguous`: ``d[g] = a_g @ b_g.T (+ c[g])``.

    Args:
        a: ``(a flat [sum(ks) * M] e4m3, sfa [M, sum(ks)/128] fp32)``: group g is an [M, ks[g]]
            row-major block starting at element ``sum(ks[:g]) * M``.
        b: ``(b flat [sum(ks) * N] e4m3, sfb [N, sum(ks)/128] fp32)``, likewise.
        d, ks, ks_tensor, c: as in the MN-major form.
    """
    return _k_grouped(a, b, d, ks, ks_tensor, c, recipe, k_major=True)
