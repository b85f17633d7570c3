"""``openinfra bench deep_ep``: DeepEP's single-GPU row kernels against copy bandwidth and PyTorch.

Shapes: DeepSeek-V3 on EP8 -- T=4096 tokens, H=7168, top-8 of E=256 experts, R=8 ranks (the
layout is computed as if the other ranks existed; no communication is timed here). Kernels:

- permute (normal): each token once into the send block of every rank it goes to (~5.3 of 8);
- permute (low latency): each token into one slot per selected expert (8 messages);
- either with the FP8 cast fused (e4m3 + one fp32 scale per 128 channels);
- unpermute (normal): sum of a token's copies back at the origin (+ bias);
- unpermute (low latency): top-k weighted sum of a token's 8 expert outputs.

Bytes counted: every byte each kernel must read and write once (index / weight tensors included).
Peers in the same run: the device copy (the memory ceiling) and the same operation in PyTorch
(``index_copy_`` / gather + sum, the reference path, on the same GPU).
"""

from __future__ import annotations

import argparse

import torch

from openinfra.argtypes import device_name, positive_int, power_of_two
from openinfra.bench.harness import BenchResult, copy_bandwidth_gbps, gpu_time_ms, routine


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens per rank (T)")
    p.add_argument("--hidden", type=positive_int, default=7168, help="hidden size (H)")
    p.add_argument("--topk", type=positive_int, default=8, help="experts per token (K)")
    p.add_argument("--experts", type=positive_int, default=256, help="experts (E)")
    p.add_argument("--ranks", type=positive_int, default=8, help="simulated EP ranks (R)")
    p.add_argument("--num-warps", type=power_of_two, nargs="+", default=[4], help="kernel warps per program (variants)")
    p.add_argument("--block-groups", type=power_of_two, nargs="*", default=[None],
                   help="permute kernels: 128-channel groups per program, powers of two (variants; default auto = 8)")
    p.add_argument("--device", default="cuda", type=device_name, help=argparse.SUPPRESS)  # tests smoke-run it on CPU


@routine("deep_ep", "DeepEP permute / FP8-cast / unpermute kernels: GB/s vs device copy and PyTorch", _add_arguments,
         needs_gpu=True)
def bench_deep_ep(args: argparse.Namespace) -> BenchResult:
    from openinfra.comm.deep_ep.kernels.kernel import gather_reduce_triton, scatter_rows_triton
    from openinfra.comm.deep_ep.kernels.reference import gather_reduce_reference, scatter_rows_reference
    from openinfra.comm.deep_ep.layout import compute_layout, send_index_from_mask
    from openinfra.comm.deep_ep.low_latency import _message_slots

    T, H, K, E, R = args.tokens, args.hidden, args.topk, args.experts, args.ranks
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    topk_idx = torch.rand(T, E, generator=gen, device=dev).topk(K, dim=1).indices
    x = torch.randn(T, H, generator=gen, device=dev).to(torch.bfloat16)
    _, _, in_rank = compute_layout(topk_idx, E, R)
    counts = in_rank.sum(0)
    normal_index = send_index_from_mask(in_rank, torch.cumsum(counts, 0) - counts)
    n_normal = int(counts.sum())
    ll_index = _message_slots(topk_idx, R, E // R, T * K)
    n_ll = int((ll_index >= 0).sum())
    ll_rows = R * T * K
    groups = H // 128
    weights = torch.rand(T, K, generator=gen, device=dev)
    bias = torch.randn(T, H, generator=gen, device=dev).to(torch.bfloat16)

    copy = copy_bandwidth_gbps(dev)
    rows = []

    peer_cache: dict[str, float] = {}

    def add(name: str, nbytes: int, ours, torch_peer, warps: int, groups: int | None = None) -> None:
        ms = gpu_time_ms(ours)
        if name not in peer_cache:  # the PyTorch peer does not depend on the kernel variant
            peer_cache[name] = gpu_time_ms(torch_peer)
        peer_ms = peer_cache[name]
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append({"kernel": name, "warps": warps, "groups": groups or "auto", "MB": nbytes / 1e6, "us": ms * 1e3,
                     "GB/s": gbps, "/copy": gbps / copy, "torch us": peer_ms * 1e3, "x torch": peer_ms / ms})

    idx_bytes_normal = normal_index.numel() * 8
    idx_bytes_ll = ll_index.numel() * 8
    send_normal = torch.empty(n_normal, H, dtype=torch.bfloat16, device=dev)
    send_normal_fp8 = torch.empty(n_normal, H, dtype=torch.float8_e4m3fn, device=dev)
    sf_normal = torch.empty(n_normal, groups, device=dev)
    send_ll = torch.empty(ll_rows, H, dtype=torch.bfloat16, device=dev)
    send_ll_fp8 = torch.empty(ll_rows, H, dtype=torch.float8_e4m3fn, device=dev)
    sf_ll = torch.empty(ll_rows, groups, device=dev)
    recv_normal = torch.randn(n_normal, H, generator=gen, device=dev).to(torch.bfloat16)
    recv_ll = torch.randn(ll_rows, H, generator=gen, device=dev).to(torch.bfloat16)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)

    for w in args.num_warps:
        for g in args.block_groups:
            add("permute normal bf16", T * H * 2 + n_normal * H * 2 + idx_bytes_normal,
                lambda: scatter_rows_triton(x, normal_index, send_normal, num_warps=w, block_groups=g),
                lambda: scatter_rows_reference(x, normal_index, send_normal), w, g)
            add("permute normal +fp8", T * H * 2 + n_normal * (H + groups * 4) + idx_bytes_normal,
                lambda: scatter_rows_triton(x, normal_index, send_normal_fp8, sf_normal, cast_fp8=True, num_warps=w,
                                            block_groups=g),
                lambda: scatter_rows_reference(x, normal_index, send_normal_fp8, sf_normal, cast_fp8=True), w, g)
            add("permute LL bf16", T * H * 2 + n_ll * H * 2 + idx_bytes_ll,
                lambda: scatter_rows_triton(x, ll_index, send_ll, num_warps=w, block_groups=g),
                lambda: scatter_rows_reference(x, ll_index, send_ll), w, g)
            add("permute LL +fp8", T * H * 2 + n_ll * (H + groups * 4) + idx_bytes_ll,
                lambda: scatter_rows_triton(x, ll_index, send_ll_fp8, sf_ll, cast_fp8=True, num_warps=w, block_groups=g),
                lambda: scatter_rows_reference(x, ll_index, send_ll_fp8, sf_ll, cast_fp8=True), w, g)
        add("unpermute normal +bias", n_normal * H * 2 + 2 * T * H * 2 + idx_bytes_normal,
            lambda: gather_reduce_triton(recv_normal, normal_index, None, bias, None, out, num_warps=w),
            lambda: gather_reduce_reference(recv_normal, normal_index, None, bias, None, out), w)
        add("unpermute LL weighted", n_ll * H * 2 + T * H * 2 + idx_bytes_ll + weights.numel() * 4,
            lambda: gather_reduce_triton(recv_ll, ll_index, weights, None, None, out, num_warps=w),
            lambda: gather_reduce_reference(recv_ll, ll_index, weights, None, None, out), w)

    best = {}
    for r in rows:
        if r["kernel"] not in best or r["/copy"] > best[r["kernel"]]["/copy"]:
            best[r["kernel"]] = r
    summary = {
        "copy_GBps": copy,
        "shape": {"T": T, "H": H, "K": K, "E": E, "R": R},
        "tokens_sent_normal": n_normal, "messages_ll": n_ll,
        "best_over_copy": {k: round(v["/copy"], 3) for k, v in best.items()},
        "min_best_over_copy": min(v["/copy"] for v in best.values()),
        "goal_over_copy": 0.8,
    }
    return BenchResult(rows, summary)
