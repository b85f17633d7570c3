"""``openinfra bench flash_mla``: paged MLA decoding, ours against the copy bandwidth and plain PyTorch.

Counted as FlashMLA counts them (compute.md): ``FLOPs = 2 * s_q * sum(s_k) * h_q * (576 + 512)``,
``bytes = 2 * (sum(s_k) * 576 + b * s_q * h_q * (576 + 512))`` (the cache read once, q read and the
output written once). Timed end to end: the attention kernel and the combine kernel, with the tile
schedule built beforehand (it is built once per decode step and shared by every layer).

Peers in the same run: the device copy bandwidth (the physical limit for memory-bound shapes) and a
plain-PyTorch paged decode (gather the pages, bf16 matmuls, fp32 softmax). Sparse FP8 decoding
(b=128, h_q=128, s_q=2, topk=2048) is measured against the PyTorch reference of the same function.
"""

from __future__ import annotations

import argparse
import random

import torch

from openinfra.argtypes import positive_float, positive_int
from openinfra.bench.harness import BenchResult, copy_bandwidth_gbps, gpu_time_ms, routine


def _config_spec(text: str) -> str:
    parts = text.split(",")
    if len(parts) != 4 or not all(x.strip().isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"expected block_m,block_n,num_warps,num_stages (0 = default), got {text!r}")
    bm, bn = int(parts[0]), int(parts[1])
    if bm not in (0, 16, 32, 64) or bn not in (0, 16, 32, 64):
        raise argparse.ArgumentTypeError(f"block_m and block_n must be 0, 16, 32 or 64, got {text!r}")
    return text


def _kernel_label(q: torch.Tensor, k_cache: torch.Tensor, cfg, rows: int) -> str:
    """"gluon" where the Gluon decode kernel takes the call (the dense default at >= 64 rows on
    Hopper unless OPENINFRA_MLA_GLUON=0), else the Triton kernel's resolved launch config."""
    from openinfra.kernels.flash_mla.kernel import uses_gluon_decode

    if uses_gluon_decode(q, k_cache, rows, paged=True, sparse=False, is_fp8=False, has_sink=False, write_max=False):
        return "gluon"
    return ",".join(str(v) for v in cfg.resolve(rows))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=positive_int, default=128, help="requests per decode step")
    p.add_argument("--sq", type=positive_int, nargs="+", default=[1, 2], help="query tokens per request")
    p.add_argument("--hq", type=positive_int, nargs="+", default=[16, 32, 64, 128], help="query heads (h_kv = 1)")
    p.add_argument("--sk", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768], help="mean cache length")
    p.add_argument("--modes", nargs="+", default=["fixed", "varlen"], choices=["fixed", "varlen"])
    p.add_argument("--configs", nargs="+", default=["0,0,0,0"], type=_config_spec,
                   help="kernel variants block_m,block_n,num_warps,num_stages (0 = the default)")
    p.add_argument("--parts-per-sm", type=positive_float, nargs="+", default=[1.0],
                   help="multiplier of the default schedule chunks (variants; 0.5 = half as many)")
    p.add_argument("--no-peer", action="store_true", help="skip the plain-PyTorch peer (faster sweeps)")
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure sparse FP8 decoding (b=128, h_q=128, s_q=2, topk=2048)")


def _torch_paged_decode(q, k_cache, block_table, lens, max_len, scale, causal):
    """Plain PyTorch paged MLA decode (h_kv = 1): gather pages, bf16 matmuls, fp32 softmax."""
    b, s_q, h_q, d = q.shape
    page = k_cache.shape[1]
    pages = (max_len + page - 1) // page
    kv = k_cache[block_table[:, :pages]].view(b, pages * page, d)
    s = torch.matmul(q.view(b, s_q * h_q, d), kv.transpose(1, 2)).float() * scale
    pos = torch.arange(pages * page, device=q.device)
    keep = pos[None, None, :] < lens[:, None, None]
    if causal:
        row_sq = torch.arange(s_q, device=q.device).repeat_interleave(h_q)
        keep = keep & (pos[None, None, :] <= (lens[:, None] - s_q + row_sq[None, :])[:, :, None])
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, kv[..., :512]).view(b, s_q, h_q, 512)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return 1.0 - 2.0 * (a * b).sum().item() / max((a * a + b * b).sum().item(), 1e-30)


#: The sparse FP8 decode of the bench: DeepSeek-V3.2's decode shape (b, s_q, h_q, topk, cache tokens a request).
SPARSE_SHAPE = (128, 2, 128, 2048, 32768)


def sparse_decode_inputs(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [b, s_q, h_q, 576] bf16, FP8 cache [b * s_kv / 64, 64, 1, 656], indices [b, s_q, topk]
    uniform over the cache) at :data:`SPARSE_SHAPE`."""
    from openinfra.kernels.flash_mla import quantize_kv_cache_fp8

    b, s_q, h_q, topk, s_kv = SPARSE_SHAPE
    nblocks = b * s_kv // 64
    kv = (torch.randn(nblocks, 64, 1, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
    cache = quantize_kv_cache_fp8(kv)
    del kv
    idx = torch.randint(0, nblocks * 64, (b, s_q, topk), device=dev, dtype=torch.int32)
    q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
    return q, cache, idx


@routine("flash_mla", "paged MLA decode (FlashMLA API): GB/s and TFLOPS vs copy bandwidth and plain PyTorch",
         _add_arguments, needs_gpu=True)
def bench_flash_mla(args: argparse.Namespace) -> BenchResult:
    from openinfra.kernels.flash_mla import flash_mla_with_kvcache, get_mla_metadata
    from openinfra.kernels.flash_mla.kernel import KernelConfig, mla_attention_triton
    from openinfra.kernels.flash_mla.metadata import build_schedule, default_num_sm_parts
    from openinfra.kernels.flash_mla.reference import mla_sparse_decode_reference

    dev = torch.device("cuda")
    copy = copy_bandwidth_gbps()
    configs = []
    for spec in args.configs:
        bm, bn, nw, ns = (int(x) for x in spec.split(","))
        configs.append(KernelConfig(bm or None, bn or None, nw or None, ns or None))
    rows: list[dict] = []
    b = args.batch
    rnd = random.Random(0)
    for mode in args.modes:
        for sk in args.sk:
            if mode == "varlen":
                lens_l = [max(int(rnd.normalvariate(sk, sk / 2)), 2) for _ in range(b)]
            else:
                lens_l = [sk] * b
            max_len = max(lens_l)
            pages = (max_len + 63) // 64
            lens = torch.tensor(lens_l, dtype=torch.int32, device=dev)
            block_table = torch.randperm(b * pages, device=dev, dtype=torch.int32).view(b, pages)
            k_cache = (torch.randn(b * pages, 64, 1, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
            total = sum(lens_l)
            for s_q in args.sq:
                for h_q in args.hq:
                    q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
                    causal = s_q > 1
                    flops = 2 * s_q * total * h_q * (576 + 512)
                    nbytes = 2 * (total * 576 + b * s_q * h_q * (576 + 512))
                    peer_ms = peer_out = None
                    if not args.no_peer:
                        peer = lambda: _torch_paged_decode(q, k_cache, block_table, lens, max_len, 576 ** -0.5, causal)
                        peer_out = peer()
                        peer_ms = gpu_time_ms(peer)
                    base_parts = default_num_sm_parts(dev, 1, s_q * h_q)
                    for pps in args.parts_per_sm:
                        parts = max(int(base_parts * pps), 1)
                        meta, splits = build_schedule(lens, parts)
                        for variant, cfg in enumerate(configs):
                            def ours():
                                out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev)
                                lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=dev)
                                mla_attention_triton(q, k_cache, lens, meta, splits, 576 ** -0.5, out=out, lse=lse,
                                                     block_table=block_table, causal=causal, config=cfg)
                                return out

                            out = ours()
                            ms = gpu_time_ms(ours)
                            row = {
                                "mode": mode, "variant": variant, "pps": pps, "s_k": sk, "s_q": s_q, "h_q": h_q, "cfg": _kernel_label(q, k_cache, cfg, s_q * h_q),
                                "parts": parts, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6,
                                "TFLOPS": flops / ms / 1e9, "/copy": nbytes / ms / 1e6 / copy,
                            }
                            if peer_ms is not None:
                                row["torch GB/s"] = nbytes / peer_ms / 1e6
                                row["x torch"] = peer_ms / ms
                                row["cos vs torch"] = _cos(out, peer_out)
                            rows.append(row)
                    del q
            del k_cache, block_table
            torch.cuda.empty_cache()

    # The headline figures are the first variant's (the defaults, unless --configs says otherwise);
    # best_* take the best variant per shape.
    summary: dict = {"copy_GBps": copy, "configs": args.configs, "parts_per_sm": args.parts_per_sm}
    for label, pick in (("", lambda r: r["variant"] == 0 and r["pps"] == args.parts_per_sm[0]),
                        ("best_variant_", lambda r: True)):
        best: dict = {}
        for r in filter(pick, rows):
            key = (r["mode"], r["s_k"], r["s_q"], r["h_q"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        mem = [r for r in best.values() if r["s_q"] * r["h_q"] <= 64]
        comp = [r for r in best.values() if r["h_q"] == 128]
        if mem:
            summary[label + "memory_bound_over_copy_min"] = min(r["/copy"] for r in mem)
            summary[label + "memory_bound_over_copy_max"] = max(r["/copy"] for r in mem)
        if comp:
            summary[label + "compute_bound_TFLOPS_min"] = min(r["TFLOPS"] for r in comp)
            summary[label + "compute_bound_TFLOPS_max"] = max(r["TFLOPS"] for r in comp)
        if best and all("x torch" in r for r in best.values()):
            summary[label + "x_torch_memory_bound_min"] = min((r["x torch"] for r in mem), default=None)
            summary[label + "x_torch_compute_bound_min"] = min((r["x torch"] for r in comp), default=None)
    summary["goal_over_copy"] = 0.95
    summary["goal_TFLOPS"] = 700
    if rows and "cos vs torch" in rows[0]:
        summary["max_cos_diff_vs_torch"] = max(r["cos vs torch"] for r in rows)

    if args.sparse:
        sb, ssq, shq, topk, skv = SPARSE_SHAPE
        q, cache, idx = sparse_decode_inputs(dev)
        meta, splits = get_mla_metadata(torch.zeros(sb, dtype=torch.int32, device=dev), ssq * shq, 1, shq, True, topk)
        run = lambda: flash_mla_with_kvcache(q, cache, None, None, 512, meta, splits, is_fp8_kvcache=True, indices=idx)
        out, _ = run()
        ms = gpu_time_ms(run)
        ref_run = lambda: mla_sparse_decode_reference(q, cache, idx, 512, None, True)
        ref_out, _ = ref_run()
        ref_ms = gpu_time_ms(ref_run)
        flops = 2 * sb * ssq * shq * topk * (576 + 512)
        nbytes = sb * ssq * topk * 656 + 2 * sb * ssq * shq * (576 + 512)
        rows.append({"mode": "sparse-fp8", "variant": 0, "pps": 1, "s_k": skv, "s_q": ssq, "h_q": shq, "cfg": f"topk={topk}", "parts": meta.shape[0],
                     "us": ms * 1e3, "GB/s": nbytes / ms / 1e6, "TFLOPS": flops / ms / 1e9, "/copy": nbytes / ms / 1e6 / copy,
                     "torch GB/s": nbytes / ref_ms / 1e6, "x torch": ref_ms / ms, "cos vs torch": _cos(out, ref_out)})
        summary["sparse_fp8_TFLOPS"] = flops / ms / 1e9
        summary["goal_sparse_fp8_TFLOPS"] = 450
    return BenchResult(rows, summary)
