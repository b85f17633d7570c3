"""Is the dense decode kernel waiting on memory or on its own schedule? (H200 probe)

Times the decode (attention + combine, as `openinfra bench flash_mla` does) at b = 128, s_k = 16,384
twice per shape: with the usual shuffled block table (every page streamed from HBM), and with every
block-table entry pointing at one of 64 pages (the same FLOPs and the same instruction stream; the
pages stay in L2). If the second is much faster, the kernel waits on loads; if not, on compute.

    python3 scripts/mla_l2_probe.py      # prints JSON: us and TFLOPS per (h_q, s_q, table)
"""
from __future__ import annotations

import json

import torch

from openinfra.bench.harness import gpu_time_ms
from openinfra.kernels.flash_mla.kernel import mla_attention_triton
from openinfra.kernels.flash_mla.metadata import build_schedule, default_num_sm_parts


def decode_inputs(dev: torch.device, b: int = 128, sk: int = 16384):
    """(lengths [b], bf16 cache [b * sk / 64, 64, 1, 576], block tables by name) of the probes:
    "hbm" a shuffled table over every page, "l2" every entry one of 64 pages (L2-resident)."""
    pages = sk // 64
    lens = torch.full((b, ), sk, dtype=torch.int32, device=dev)
    k_cache = (torch.randn(b * pages, 64, 1, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
    tables = {"hbm": torch.randperm(b * pages, device=dev, dtype=torch.int32).view(b, pages),
              "l2": torch.randint(0, 64, (b, pages), device=dev, dtype=torch.int32)}
    return lens, k_cache, tables


def main() -> None:
    dev = torch.device("cuda")
    b, sk = 128, 16384
    lens, k_cache, tables = decode_inputs(dev, b, sk)
    out = {}
    for h_q, s_q in ((64, 1), (128, 1), (128, 2)):
        q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
        meta, splits = build_schedule(lens, default_num_sm_parts(dev, 1, s_q * h_q))
        flops = 2 * s_q * b * sk * h_q * (576 + 512)
        for name, bt in tables.items():
            o = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev)
            lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=dev)
            fn = lambda: mla_attention_triton(q, k_cache, lens, meta, splits, 576 ** -0.5, out=o, lse=lse,
                                              block_table=bt, causal=s_q > 1)
            fn()
            ms = gpu_time_ms(fn)
            out[f"h_q={h_q} s_q={s_q} {name}"] = {"us": round(ms * 1e3, 1), "TFLOPS": round(flops / ms / 1e9, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
