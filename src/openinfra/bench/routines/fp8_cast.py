"""``openinfra bench fp8_cast``: the per-token FP8 cast kernel against copy bandwidth and PyTorch.

Bytes moved per call: m*n*(input element size) read + m*n written (e4m3) + m*ceil(n/128)*4
written (scales). Peers in the same run: the device copy (the physical limit) and the PyTorch
reference on the same GPU (eager).
"""

from __future__ import annotations

import argparse

import torch

from openinfra.bench.harness import BenchResult, copy_bandwidth_gbps, gpu_time_ms, routine

_SHAPES = [(4096, 7168), (8192, 7168), (16384, 2048), (4096, 16384), (128, 7168)]


def _variant(text: str) -> str:
    """``auto`` or ``BLOCK_M:GROUPS:WARPS[:ITERS[:STAGES]]``: the first three are Triton block shapes
    and a warp count (powers of two), the rest positive counts."""
    if text == "auto":
        return text
    parts = text.split(":")
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or BLOCK_M:GROUPS:WARPS[:ITERS:STAGES] integers, got {text!r}") from None
    if any(v < 1 for v in values) or any(v & (v - 1) for v in values[:3]):
        raise argparse.ArgumentTypeError(
            f"BLOCK_M, GROUPS and WARPS must be powers of two and ITERS, STAGES >= 1, got {text!r}")
    return text


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants", nargs="*", default=["auto"], type=_variant,
        help="kernel tiles to time, each BLOCK_M:GROUPS:WARPS[:ITERS:STAGES] (e.g. 8:4:4:4:3), or 'auto' for the default",
    )
    p.add_argument("--ue8m0", action="store_true", help="power-of-two scales")


@routine("fp8_cast", "per-token FP8 cast kernel: GB/s vs device copy and the PyTorch reference", _add_arguments, needs_gpu=True)
def bench_fp8_cast(args: argparse.Namespace) -> BenchResult:
    from openinfra.kernels.deep_gemm.cast.kernel import per_token_cast_to_fp8_triton
    from openinfra.kernels.deep_gemm.cast.reference import per_token_cast_to_fp8_reference

    copy = copy_bandwidth_gbps()
    rows = []
    for m, n in _SHAPES:
        x = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
        nbytes = m * n * 2 + m * n + m * ((n + 127) // 128) * 4
        ref_ms = gpu_time_ms(lambda: per_token_cast_to_fp8_reference(x, args.ue8m0))
        for variant in args.variants:
            tile = (None,) * 5 if variant == "auto" else tuple(int(v) for v in variant.split(":"))
            ms = gpu_time_ms(lambda: per_token_cast_to_fp8_triton(x, args.ue8m0, *tile))
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append({
                "m": m, "n": n, "tile": variant, "us": ms * 1e3, "GB/s": gbps,
                "/copy": gbps / copy, "torch GB/s": nbytes / (ref_ms * 1e-3) / 1e9, "x torch": ref_ms / ms,
            })
    big = [r for r in rows if r["m"] >= 4096]
    summary = {
        "copy_GBps": copy,
        "best_GBps": max(r["GB/s"] for r in big),
        "best_over_copy": max(r["/copy"] for r in big),
        "min_over_copy_large": min(r["/copy"] for r in big),
        "goal_over_copy": 0.85,
    }
    return BenchResult(rows, summary)
