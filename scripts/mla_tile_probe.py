"""K tile size of the Gluon decode kernel: 64 tokens in 2 stages against 32 tokens in 4 (H200 probe).

A stage goes back to the producer only after both warpgroups' P V of it, so with two 64-token
stages the loads run one tile ahead of the math; four 32-token stages (the same 128 KB) let them run
three tiles ahead. Times the attention kernel alone (no combine) at b = 128, fixed lengths, shuffled
pages, and reports GB/s against the copy bandwidth measured in the same run:

    python3 scripts/mla_tile_probe.py     # JSON: {shape: {block_tokens: [us, GB/s, /copy]}}
"""
from __future__ import annotations

import json
import os

import torch


def main() -> None:
    from mla_l2_probe import decode_inputs  # scripts/ is on the path when run as a script

    from openinfra.bench.harness import copy_bandwidth_gbps, gpu_time_ms
    from openinfra.kernels.flash_mla.gluon_kernel import mla_decode_gluon
    from openinfra.kernels.flash_mla.metadata import build_schedule, default_num_sm_parts

    dev = torch.device("cuda")
    copy = copy_bandwidth_gbps(dev)
    res = {"copy_GBps": round(copy)}
    b = 128
    for sk in (4096, 16384):
        lens, kv, tables = decode_inputs(dev, b, sk)
        bt = tables["hbm"]
        for h_q, s_q in ((16, 1), (32, 1), (16, 2), (64, 1), (32, 2), (128, 1)):
            q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
            meta, splits = build_schedule(lens, default_num_sm_parts(dev, 1, s_q * h_q))
            pieces, rows = meta.shape[0], s_q * h_q
            out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev)
            lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=dev)
            oacc = torch.empty(pieces * rows * 512, dtype=torch.float32, device=dev)
            lacc = torch.empty(pieces * rows, dtype=torch.float32, device=dev)
            nbytes = 2 * (b * sk * 576 + b * rows * (576 + 512))
            row = {}
            for block_t in (64, 32):
                fn = lambda: mla_decode_gluon(q, kv, lens, meta, splits, 576 ** -0.5, out=out, lse=lse, block_table=bt,
                                              causal=s_q > 1, oacc=oacc, lacc=lacc, block_tokens=block_t)
                fn()
                us = gpu_time_ms(fn) * 1e3
                row[block_t] = [round(us, 1), round(nbytes / us / 1e3), round(nbytes / us / 1e3 / copy, 3)]
            res[f"s_k={sk} h_q={h_q} s_q={s_q}"] = row
            print(f"s_k={sk} h_q={h_q} s_q={s_q}", row, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "mla_tile_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
