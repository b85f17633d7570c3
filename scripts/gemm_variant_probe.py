"""Where does the warp-specialized FP8 GEMM's time go? Variant timings (H200 probe, METHOD.md style).

Builds copies of `openinfra.kernels.deep_gemm.gemm.gluon_kernel` with one piece of work removed
each (the outputs are then wrong; only the time matters) and times dense 128 x 128 tiles at
M = 4096 on the DeepSeek-V3 shapes:

    base        the kernel as it is
    loads_only  the math warpgroups wait for each stage and release it: no MMA, no promotion
                (the TMA stream L2 -> shared memory alone, with the same ring and barriers)
    no_load     the producer arrives on each stage without loading it: MMA and promotion on
                stale shared memory (compute and synchronisation alone)
    no_promote  the MMA of every slice is issued and waited for, its product never added
                (the promotion FMAs' cost)
    b3 / b5     3 / 5 stages

    contiguous  not a copy: the grouped contiguous layout (MoE) through the Triton kernel (the
                default) and through the warp-specialized kernel's CONTIGUOUS mode, same inputs

    python3 scripts/gemm_variant_probe.py [VARIANT ...]   # JSON: us and TFLOPS per (variant, shape)
"""
from __future__ import annotations

import json
import os
import sys

import torch

import openinfra.kernels.deep_gemm.gemm.gluon_kernel as gk

_PROMOTE = [("                acc += p0 * scale0[:, None]\n", ""), ("                acc += p1 * scale1[:, None]\n", "")]
_NO_MMA = [("""    return warpgroup_mma(a_bufs.index(s).slice(HALF * 64, 64), b_bufs.index(s).permute((1, 0)), product,
                         use_acc=False, is_async=True)""", "    return product"),
           ("warpgroup_mma_wait(num_outstanding=1, deps=(p0, ))", "p0"),
           ("warpgroup_mma_wait(num_outstanding=0, deps=(p0, ))", "p0"),
           ("warpgroup_mma_wait(num_outstanding=0, deps=(p1, ))", "p1")]
_LOADS = """                mbarrier.expect(full.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [a_row, k * 128], full.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [b_row, k * 128], full.index(s), b_bufs.index(s))
"""
EDITS = {
    "base": [],
    "loads_only": _PROMOTE + _NO_MMA,
    "no_load": [(_LOADS, "                mbarrier.arrive(full.index(s), count=1)\n")],
    "no_promote": _PROMOTE,
    "b5": [], "b3": [],
}
KWARGS = {"b5": dict(num_buffers=5), "b3": dict(num_buffers=3)}
SHAPES = [(4096, 4096, 7168), (4096, 7168, 16384), (4096, 2112, 7168), (4096, 24576, 1536), (4096, 7168, 2048)]


def load_variant(name: str):
    from kernel_variants import load_variant as load  # scripts/ is on the path when run as a script

    return load(gk, name, EDITS[name])


def _save(res: dict) -> None:
    # after every variant: a later one failing to compile keeps the earlier figures
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemm_variant_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


def contiguous(res: dict) -> None:
    from openinfra.bench.harness import gpu_time_ms
    from openinfra.kernels.deep_gemm import calc_diff, m_grouped_fp8_gemm_nt_contiguous

    dev = torch.device("cuda")
    for groups, m, n, k in [(4, 8192, 4096, 7168), (8, 4096, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 7168, 2048)]:
        total = groups * m
        a = torch.randn(total, k, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(groups, n, k, device=dev).to(torch.float8_e4m3fn)
        sfa = torch.rand(total, k // 128, device=dev) + 0.5
        sfb = torch.rand(groups, n // 128, k // 128, device=dev) + 0.5
        m_indices = torch.arange(groups, device=dev, dtype=torch.int32).repeat_interleave(m)
        d_triton = torch.empty(total, n, dtype=torch.bfloat16, device=dev)
        d_gluon = torch.empty_like(d_triton)
        fns = {"triton": lambda: m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d_triton, m_indices),
               "gluon": lambda: gk.fp8_gemm_nt_gluon_ws(a, sfa, b, sfb, d_gluon, mode=1, layout=m_indices)}
        for name, fn in fns.items():
            fn()
            us = gpu_time_ms(fn) * 1e3
            res[f"contiguous {name} {groups}x{m} {n}x{k}"] = {"us": round(us, 1),
                                                              "TFLOPS": round(2 * total * n * k / us / 1e6, 1)}
        assert calc_diff(d_triton.float(), d_gluon.float()) < 1e-6
    _save(res)


def main() -> None:
    from openinfra.bench.harness import gpu_time_ms

    dev = torch.device("cuda")
    res = {}
    names = sys.argv[1:] or list(EDITS)
    if "contiguous" in names:
        names.remove("contiguous")
        contiguous(res)
    for name in names:
        mod = load_variant(name)
        kwargs = dict(num_buffers=4, group_m=8) | KWARGS.get(name, {})
        for m, n, k in SHAPES:
            a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
            sfa = torch.rand(m, k // 128, device=dev) + 0.5
            sfb = torch.rand((n + 127) // 128, k // 128, device=dev) + 0.5
            d = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            fn = lambda: mod.fp8_gemm_nt_gluon_ws(a, sfa, b, sfb, d, **kwargs)
            fn()
            if name in KWARGS:  # the real kernel with other arguments: check it against the base
                ref = torch.empty_like(d)
                gk.fp8_gemm_nt_gluon_ws(a, sfa, b, sfb, ref)
                assert torch.equal(d, ref), name
            us = gpu_time_ms(fn) * 1e3
            res[f"{name} {m}x{n}x{k}"] = {"us": round(us, 1), "TFLOPS": round(2 * m * n * k / us / 1e6, 1)}
        _save(res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
