"""``openinfra bench model``: forward+backward tokens/s of the DeepSeek-V3-architecture model.

Peer in the same run: the same model (same weights) computed with plain PyTorch ops
(``openinfra.model.reference.plain_loss``: explicit attention scores, a Python loop over experts).
Ours uses fused SDPA attention and the grouped-GEMM expert layouts (``torch._grouped_mm`` on Hopper,
deep_gemm's FP8 kernels with ``--fp8`` when present). Runs on CPU (wall time) or GPU (CUDA events).
"""

from __future__ import annotations

import argparse

from openinfra.argtypes import device, positive_int
from openinfra.bench.harness import BenchResult, cpu_time_s, gpu_time_ms, routine


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=None,
                   help="named configs (default: tiny small on CPU, tiny small medium on GPU)")
    p.add_argument("--batch", type=positive_int, default=None, help="sequences per step (default 8 CPU / 16 GPU)")
    p.add_argument("--seq", type=positive_int, default=None, help="tokens per sequence (default 128 CPU / 1024 GPU)")
    p.add_argument("--device", default=None, type=device, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--fp8", action="store_true", help="also time the model with gemm='fp8' (Hopper + deep_gemm)")
    p.add_argument("--repeat", type=positive_int, default=3, help="CPU timing repeats (median)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU intra-op threads (default: torch's; 1 gives stable numbers on a shared machine)")


@routine("model", "DeepSeek-V3-architecture model: forward+backward tokens/s vs the same model in plain PyTorch ops",
         _add_arguments, needs_gpu=False)
def bench_model(args: argparse.Namespace) -> BenchResult:
    import torch

    from openinfra.model import Transformer, get_config
    from openinfra.model.layers import fp8_gemm_available
    from openinfra.model.reference import plain_loss

    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    names = args.configs or (["tiny", "small", "medium"] if gpu else ["tiny", "small"])
    batch = args.batch or (16 if gpu else 8)
    seq_default = 1024 if gpu else 128
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for name in names:
        cfg = get_config(name)
        seq = min(args.seq or seq_default, cfg.max_seq_len)
        variants = [("bf16" if gpu else "fp32", cfg)]
        if args.fp8:
            variants.append(("fp8", cfg.replace(gemm="fp8")))
        for label, vcfg in variants:
            torch.manual_seed(0)
            model = Transformer(vcfg).to(device=device, dtype=dtype)
            tokens = torch.randint(0, vcfg.vocab_size, (batch, seq), device=device)
            if label == "fp8" and not fp8_gemm_available(torch.empty(1, device=device, dtype=dtype)):
                rows.append({"config": name, "gemm": label, "note": "deep_gemm FP8 GEMM not available here"})
                continue

            def ours():
                model.loss(tokens, tokens).backward()

            def plain():
                plain_loss(model, tokens, tokens).backward()

            if gpu:
                t_ours = gpu_time_ms(ours, warmup_ms=50, rep_ms=300) / 1e3
                t_plain = gpu_time_ms(plain, warmup_ms=50, rep_ms=300) / 1e3 if label != "fp8" else None
            else:
                t_ours = cpu_time_s(ours, repeat=args.repeat)
                t_plain = cpu_time_s(plain, repeat=args.repeat)
            n_tok = batch * seq
            row = {"config": name, "gemm": label, "params_M": vcfg.num_params() / 1e6,
                   "active_M": vcfg.num_params(active=True) / 1e6, "batch": batch, "seq": seq,
                   "ms/step": t_ours * 1e3, "tok/s": n_tok / t_ours}
            if t_plain is not None:
                row.update({"plain ms": t_plain * 1e3, "plain tok/s": n_tok / t_plain, "x plain": t_plain / t_ours})
            rows.append(row)
            del model
            if gpu:
                torch.cuda.empty_cache()
    timed = [r for r in rows if "x plain" in r]
    summary = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
               "dtype": str(dtype).replace("torch.", ""),
               **{f"{r['config']}_{r['gemm']}_tok_s": round(r["tok/s"], 1) for r in rows if "tok/s" in r},
               **{f"{r['config']}_x_plain": round(r["x plain"], 3) for r in timed}}
    return BenchResult(rows, summary)
