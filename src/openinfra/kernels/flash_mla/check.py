"""FlashMLA's acceptance test for a kernel output against the fp32 reference.

Per element: pass when the absolute error is under ``abs_tol`` or the relative error under
``rel_tol``; over the whole tensor: cosine difference ``1 - 2<x,y>/(|x|^2+|y|^2)`` (float64) under
``cos_diff_tol``; and +inf, -inf and NaN must sit at exactly the same positions. The defaults are
the anchor's for the decode output (abs 8e-4, rel 2.01/128, cosine 5e-6).
"""

from __future__ import annotations

import torch

__all__ = ["compare_outputs", "cosine_diff"]


def cosine_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64; 0 for two all-zero tensors."""
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum().item()
    return 0.0 if den == 0 else 1.0 - 2.0 * (x * y).sum().item() / den


def compare_outputs(
    name: str, ans: torch.Tensor, ref: torch.Tensor, abs_tol: float = 8e-4, rel_tol: float = 2.01 / 128,
    cos_diff_tol: float = 5e-6,
) -> str | None:
    """None when ``ans`` matches ``ref``; otherwise a one-paragraph description of the mismatch."""
    if ans.shape != ref.shape:
        return f"{name}: shape {tuple(ans.shape)} != {tuple(ref.shape)}"
    a, r = ans.detach().float().cpu().clone(), ref.detach().float().cpu().clone()
    for label, fa, fr in (("+inf", torch.isposinf(a), torch.isposinf(r)), ("-inf", torch.isneginf(a), torch.isneginf(r)),
                          ("nan", torch.isnan(a), torch.isnan(r))):
        if not torch.equal(fa, fr):
            return f"{name}: {label} at {int(fa.sum())} positions in the answer, {int(fr.sum())} in the reference"
        a[fa], r[fr] = 0.0, 0.0
    err = (a - r).abs()
    rel = err / (r.abs() + 1e-6)
    bad = (err >= abs_tol) & (rel >= rel_tol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return (f"{name}: {int(bad.sum())} of {bad.numel()} elements off (max abs err {err.max().item():.3g}); first at "
                f"flat index {i}: {a.flatten()[i].item():.6g} vs {r.flatten()[i].item():.6g}")
    cd = cosine_diff(a, r)
    if cd > cos_diff_tol:
        return f"{name}: cosine diff {cd:.3g} > {cos_diff_tol:.3g}"
    return None
