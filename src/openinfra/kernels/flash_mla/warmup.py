"""Compile the Triton kernel variants ahead of time, in parallel processes.

Each variant of the attention kernel (rows per tile, causal, FP8, sparse, sink, tile sizes) takes
seconds to compile, one at a time per process. A server (or a benchmark) that knows the shapes it
will run calls :func:`warmup` once: worker processes each launch one variant on tiny inputs, which
fills Triton's on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so the real
launches that follow load binaries instead of compiling.

    python -m openinfra.kernels.flash_mla.warmup --rows 16 32 64 128 --processes 8
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

__all__ = ["Variant", "warmup", "default_variants"]


@dataclass(frozen=True)
class Variant:
    rows: int  # query rows per KV head (s_q * h_q / h_kv dense, h_q sparse)
    causal: bool = False
    dtype: str = "bfloat16"
    fp8: bool = False
    sparse: bool = False
    sink: bool = False
    prefill: bool = False
    config: tuple[int, int, int, int] = (0, 0, 0, 0)  # block_m, block_n, num_warps, num_stages (0 = default)


def _run_variant(v: Variant, device: str = "cuda") -> tuple[Variant, float, str]:
    from openinfra.kernels.flash_mla.cases import make_dense_case, make_sparse_decode_case, make_sparse_prefill_case
    from openinfra.kernels.flash_mla.kernel import KernelConfig, mla_attention_triton
    from openinfra.kernels.flash_mla.metadata import build_schedule

    t0 = time.perf_counter()
    try:
        dev = device
        cfg = KernelConfig(*(x or None for x in v.config))
        dtype = getattr(torch, v.dtype)
        if v.prefill:
            from openinfra.kernels.flash_mla.api import flash_mla_sparse_fwd

            q, kv, idx, tl_, sink = make_sparse_prefill_case(2, 64, v.rows, 64, device=dev, with_sink=v.sink)
            flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, tl_)
        elif v.sparse:
            c = make_sparse_decode_case(1, 1, v.rows, 64, 2, 64, fp8=v.fp8, device=dev, with_sink=v.sink)
            lengths = torch.full((1,), 64, dtype=torch.int32, device=dev)
            meta, splits = build_schedule(lengths, 2)
            out = torch.empty(1, 1, v.rows, 512, dtype=torch.bfloat16, device=dev)
            lse = torch.empty(1, v.rows, 1, dtype=torch.float32, device=dev)
            mla_attention_triton(c.q, c.k_cache, lengths, meta, splits, 0.05, out=out, lse=lse, indices=c.indices,
                                 n_tokens=128, is_fp8=v.fp8, attn_sink=c.attn_sink, config=cfg)
        else:
            s_q = 2 if v.rows % 2 == 0 and v.causal else 1
            c = make_dense_case(1, s_q, 100, v.rows // s_q, 1, dtype=dtype, device=dev, fp8=v.fp8)
            meta, splits = build_schedule(c.cache_seqlens, 2)
            out = torch.empty(1, s_q, v.rows // s_q, 512, dtype=dtype, device=dev)
            lse = torch.empty(1, v.rows // s_q, s_q, dtype=torch.float32, device=dev)
            mla_attention_triton(c.q, c.k_cache, c.cache_seqlens, meta, splits, 0.05, out=out, lse=lse,
                                 block_table=c.block_table, causal=v.causal, is_fp8=v.fp8, config=cfg)
        if dev == "cuda":
            torch.cuda.synchronize()
        return v, time.perf_counter() - t0, "ok"
    except Exception as e:  # reported, not raised: one bad variant must not hide the others
        return v, time.perf_counter() - t0, f"{type(e).__name__}: {e}"


def default_variants(rows: list[int], configs: list[tuple[int, int, int, int]] | None = None) -> list[Variant]:
    """Dense bf16/fp16 causal and not, FP8 dense, sparse FP8 with and without sink, sparse prefill."""
    configs = configs or [(0, 0, 0, 0)]
    out = [Variant(r, c, "bfloat16", config=cfg) for r, c, cfg in itertools.product(rows, (False, True), configs)]
    out += [Variant(r, c, "float16") for r, c in itertools.product(rows, (False, True))]
    out += [Variant(r, fp8=True) for r in rows]
    out += [Variant(r, sparse=True, fp8=True, sink=s) for r, s in itertools.product((16, 64, 128), (False, True))]
    out += [Variant(r, prefill=True, sink=s) for r, s in itertools.product((64, 128), (False, True))]
    return list(dict.fromkeys(out))


def warmup(variants: list[Variant], processes: int = 8) -> list[tuple[Variant, float, str]]:
    """Launch every variant once, ``processes`` at a time in fresh processes; returns (variant, s, status)."""
    if not variants:
        return []
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ctx.Pool(min(processes, len(variants))) as pool:
        return pool.map(_run_variant, variants, chunksize=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--configs", nargs="*", default=[], help="block_m,block_n,num_warps,num_stages (0 = default)")
    p.add_argument("--processes", type=int, default=8)
    args = p.parse_args()
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] or None
    t0 = time.perf_counter()
    results = warmup(default_variants(args.rows, configs), args.processes)
    for v, s, status in results:
        print(f"{s:6.1f}s  {status:8.8}  {v}")
    bad = [r for r in results if r[2] != "ok"]
    print(f"{len(results)} variants in {time.perf_counter() - t0:.1f}s, {len(bad)} failed")
    for v, _, status in bad:
        print(f"FAILED {v}: {status}")


if __name__ == "__main__":
    main()
