"""Launch one kernel of one shape a few times, for Nsight Compute to profile (scripts/gpu_profile.sh).

    python scripts/profile_kernels.py mla16|mla64|mla128|gemm4096|gemm4096_256|gemm64

The first launches compile and warm up; the profiler is told to skip them (--launch-skip).
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch


def mla(h_q: int) -> None:
    from openinfra.kernels.flash_mla.kernel import KernelConfig, mla_attention_triton
    from openinfra.kernels.flash_mla.metadata import build_schedule, default_num_sm_parts

    dev, b, sk, s_q = torch.device("cuda"), 128, 16384, 1
    pages = sk // 64
    lens = torch.full((b,), sk, dtype=torch.int32, device=dev)
    bt = torch.randperm(b * pages, device=dev, dtype=torch.int32).view(b, pages)
    kv = (torch.randn(b * pages, 64, 1, 576, device=dev) / 10).to(torch.bfloat16)
    q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).to(torch.bfloat16)
    meta, splits = build_schedule(lens, default_num_sm_parts(dev, 1, s_q * h_q))
    out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=dev)
    for _ in range(3):
        mla_attention_triton(q, kv, lens, meta, splits, 576 ** -0.5, out=out, lse=lse, block_table=bt,
                             config=KernelConfig())
    torch.cuda.synchronize()


def gemm(m: int, n: int, k: int, block_n: int | None = None) -> None:
    from openinfra.kernels.deep_gemm.gemm.config import choose_config
    from openinfra.kernels.deep_gemm.gemm.kernel import DENSE, launch_gemm
    from openinfra.kernels.deep_gemm import per_block_cast_to_fp8, per_token_cast_to_fp8

    a, sfa = per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b, sfb = per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cfg = choose_config(m, n, k, d.device)
    if block_n is not None:  # the warp-specialized Gluon kernel with this tile width
        cfg = replace(cfg, block_n=block_n, gluon_ws=True, num_stages=4)
    print(cfg)
    for _ in range(3):
        launch_gemm(DENSE, a, b, d, cfg, sfa=sfa, sfb=sfb)
    torch.cuda.synchronize()


if __name__ == "__main__":
    case = sys.argv[1]
    {"mla16": lambda: mla(16), "mla64": lambda: mla(64), "mla128": lambda: mla(128), "gemm4096": lambda: gemm(4096, 4096, 7168),
     "gemm4096_256": lambda: gemm(4096, 4096, 7168, block_n=256), "gemm64": lambda: gemm(64, 7168, 16384)}[case]()
