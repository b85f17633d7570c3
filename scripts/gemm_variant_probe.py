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
    pingpong1   the kernel as it is, the math warpgroups taking turns on the tensor cores (one
                issues its MMA only when the other's is over: ``pingpong=1``)
    pingpong2   ... handing the turn over right after issuing (``pingpong=2``: issue order only)
    pp1_b5 / pp1_b6   pingpong 1 with 5 / 6 stages

    python3 scripts/gemm_variant_probe.py [VARIANT ...]   # JSON: us and TFLOPS per (variant, shape)
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

import torch

import openinfra.kernels.deep_gemm.gemm.gluon_kernel as gk

_MMA = """                mma = warpgroup_mma(a_bufs.index(s).slice(HALF * 64, 64), b_bufs.index(s).permute((1, 0)), zero,
                                    use_acc=False, is_async=True)
                if PINGPONG == 2:
                    mbarrier.arrive(turn.index(1 - HALF), count=1)  # the other may queue its MMA behind mine
                acc, done = warpgroup_mma_wait(num_outstanding=1, deps=(acc, done))  # pins the FMAs after the issue
                acc += done * done_scale[:, None]
                done = warpgroup_mma_wait(num_outstanding=0, deps=(mma, ))
"""
_LOADS = """                mbarrier.expect(full.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [a_row, k * 128], full.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [b_row, k * 128], full.index(s), b_bufs.index(s))
"""
EDITS = {
    "base": [],
    "loads_only": [(_MMA, "")],
    "no_load": [(_LOADS, "                mbarrier.arrive(full.index(s), count=1)\n")],
    "no_promote": [(_MMA, _MMA.replace("                acc += done * done_scale[:, None]\n", ""))],
    "pingpong1": [], "pingpong2": [], "pp1_b5": [], "pp1_b6": [],
}
KWARGS = {"pingpong1": dict(pingpong=1), "pingpong2": dict(pingpong=2), "pp1_b5": dict(pingpong=1, num_buffers=5),
          "pp1_b6": dict(pingpong=1, num_buffers=6)}
SHAPES = [(4096, 4096, 7168), (4096, 7168, 16384), (4096, 2112, 7168), (4096, 24576, 1536), (4096, 7168, 2048)]


def load_variant(name: str):
    src = open(gk.__file__).read()
    for old, new in EDITS[name]:
        assert src.count(old) == 1, (name, old[:60])
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"gemm_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"gemm_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from openinfra.bench.harness import gpu_time_ms

    dev = torch.device("cuda")
    res = {}
    for name in sys.argv[1:] or list(EDITS):
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
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemm_variant_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
