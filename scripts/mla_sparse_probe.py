"""Where the sparse decode's time goes (H200 probe): DeepSeek-V3.2's decode shape (b = 128,
s_q = 2, h_q = 128, topk = 2048, FP8 cache of 32,768 tokens a request), timing each step alone:
packing the valid indices, the gather + dequantization, the dense decode of
the workspace (attention + combine), the fused kernel (gathering producer; register splits and
schedules as variants, each checked against gather-then-dense), and the whole call.

    python3 scripts/mla_sparse_probe.py     # JSON: us per step and variant, GB/s of the gather
"""
from __future__ import annotations

import json
import os

import torch


def main() -> None:
    from openinfra.bench.harness import copy_bandwidth_gbps, gpu_time_ms
    from openinfra.bench.routines.flash_mla import SPARSE_SHAPE, sparse_decode_inputs
    from openinfra.kernels.flash_mla import flash_mla_with_kvcache, get_mla_metadata
    from openinfra.kernels.flash_mla.kernel import mla_attention_triton
    from openinfra.kernels.flash_mla.sparse_gather import gather_tokens, pack_valid_indices

    dev = torch.device("cuda")
    b, s_q, h_q, topk, skv = SPARSE_SHAPE
    nblocks = b * skv // 64
    q, cache, idx = sparse_decode_inputs(dev)
    res = {"copy_GBps": round(copy_bandwidth_gbps(dev))}
    us = lambda fn: round(gpu_time_ms(fn) * 1e3, 1)  # noqa: E731
    res["pack"] = us(lambda: pack_valid_indices(idx, nblocks * 64, None))
    packed, counts = pack_valid_indices(idx, nblocks * 64, None)
    moved = b * s_q * topk * (656 + 1152)
    for block_t, warps in ((16, 4), ):
        t = us(lambda: gather_tokens(cache, packed, counts, True, block_t=block_t, num_warps=warps))
        res[f"gather {block_t}x{warps}"] = [t, round(moved / t / 1e3)]
    work = gather_tokens(cache, packed, counts, True)
    rows = b * s_q
    table = torch.arange(work.shape[0], dtype=torch.int32, device=dev).view(rows, -1)
    meta, splits = get_mla_metadata(torch.zeros(b, dtype=torch.int32, device=dev), s_q * h_q, 1, h_q, True, topk)
    out = torch.empty(rows, 1, h_q, 512, dtype=q.dtype, device=dev)
    lse = torch.empty(rows, h_q, 1, dtype=torch.float32, device=dev)
    run = lambda: flash_mla_with_kvcache(q, cache, None, None, 512, meta, splits, is_fp8_kvcache=True, indices=idx)
    res["whole call"] = us(run)

    def host_us(fn, n: int = 30) -> float:  # launch-side time of one call (the GPU keeps up unless it is shorter)
        import time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return round((t1 - t0) / n * 1e6, 1)

    res["host: whole call"] = host_us(run)
    res["host: pack"] = host_us(lambda: pack_valid_indices(idx, nblocks * 64, None))
    os.environ["OPENINFRA_MLA_SPARSE_FUSED"] = "0"
    res["whole call, gather-then-dense"] = us(run)
    del os.environ["OPENINFRA_MLA_SPARSE_FUSED"]
    from openinfra.kernels.flash_mla.gluon_sparse import SparseKernelConfig, mla_sparse_decode_fused

    ref = out.clone()
    mla_attention_triton(q.view(rows, 1, h_q, 576), work, counts, meta, splits, 576 ** -0.5, out=ref, lse=lse,
                         block_table=table)
    ref_lse = lse.clone()
    flops = 2 * rows * h_q * topk * (576 + 512)
    # the default; without the two-group loads; without the L2 requests; loads that hit L1 (the
    # latency removed, the conversion kept); no producer work at all (the math warpgroups alone)
    for cfg in (SparseKernelConfig(), SparseKernelConfig(prefetch=0), SparseKernelConfig(l2_ahead=0),
                SparseKernelConfig(debug=1), SparseKernelConfig(debug=4)):
        o2 = torch.empty(rows, h_q, 512, dtype=q.dtype, device=dev)
        l2 = torch.empty(rows, h_q, dtype=torch.float32, device=dev)
        f = lambda: mla_sparse_decode_fused(q.view(rows, h_q, 576), cache, packed, counts, meta, splits,  # noqa: E731
                                            576 ** -0.5, is_fp8=True, out=o2, lse=l2, config=cfg)
        try:
            f()
            torch.cuda.synchronize()
            err = (o2.float() - ref.view(rows, h_q, 512).float()).abs().max().item() if not cfg.debug else None
            lerr = (l2 - ref_lse.view(rows, h_q)).abs().max().item()
            t = us(f)
            res[f"host: fused {tuple(cfg)}"] = host_us(f)
            res[f"fused {tuple(cfg)}"] = {"us": t, "TFLOPS": round(flops / t / 1e6, 1), "max_abs_err_vs_gathered": err,
                                          "lse_err": lerr}
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is reported, not fatal
            res[f"fused {tuple(cfg)}"] = f"{type(e).__name__}: {e}"[:300]
    res["dense decode"] = us(lambda: mla_attention_triton(q.view(rows, 1, h_q, 576), work, counts, meta, splits,
                                                          576 ** -0.5,
                                                          out=out, lse=lse, block_table=table))
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mla_sparse_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
