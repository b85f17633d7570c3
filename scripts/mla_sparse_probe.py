"""Where the gathered sparse decode's time goes (H200 probe): DeepSeek-V3.2's decode shape (b = 128,
s_q = 2, h_q = 128, topk = 2048, FP8 cache of 32,768 tokens a request), timing each step alone:
packing the valid indices, the gather + dequantization (several tile shapes), the dense decode of
the workspace (attention + combine), and the whole call.

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
    for block_t, warps in ((16, 4), (32, 4), (32, 8), (64, 8)):
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
    res["dense decode"] = us(lambda: mla_attention_triton(q.view(rows, 1, h_q, 576), work, counts, meta, splits,
                                                          576 ** -0.5,
                                                          out=out, lse=lse, block_table=table))
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mla_sparse_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
