"""``openinfra train``: run the training job on this machine (gloo ranks) or under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from openinfra.cli import not_a_directory

__all__ = ["register"]


def _read_shards(read_token_shards, shards: list[str]):
    """``read_token_shards(shards)``, one shard at a time so that an error names the shard."""
    import torch

    parts = []
    for s in shards:
        try:
            parts.append(read_token_shards([s]))
        except (ValueError, OSError) as exc:
            raise ValueError(str(exc) if s in str(exc) else f"shard {s}: {exc}") from None
    return torch.cat(parts)


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags TrainConfig does not check (a message naming the flag)."""
    if not math.isfinite(args.lr):
        return f"--lr: expected a finite learning rate, got {args.lr}"
    if args.chunks < 0:
        return f"--chunks: expected a count >= 0 (0: the default), got {args.chunks}"
    if args.resume and not args.checkpoint_dir:
        return "--resume needs --checkpoint-dir (the directory to continue from)"
    if args.device == "cuda":
        return ("--device cuda: GPU training is not wired in this job (its stages stay on the CPU, which NCCL "
                "cannot move); train on CPU gloo ranks (--device cpu), under torchrun or not")
    for flag, d in (("--checkpoint-dir", args.checkpoint_dir), ("--trace-dir", args.trace_dir)):
        if d and "://" not in d and (problem := not_a_directory(flag, d)):
            return problem
    for s in args.shards:
        if not os.path.exists(s):
            return f"shard {s} does not exist"
        if os.path.isdir(s):
            return f"shard {s} is a directory; give the .parquet or .npy files in it"
    return None


def _run(args: argparse.Namespace) -> int:
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if problem := _check(args):  # before the imports below: they load PyTorch
        print(f"openinfra train: error: {problem}", file=sys.stderr)
        return 2
    from openinfra.training.job import TrainConfig, train, train_worker
    from openinfra.training.data import TokenStream, read_token_shards

    cfg = TrainConfig(model=args.config, n_layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, seed=args.seed, pp=args.pp, ep=args.ep, num_chunks=args.chunks,
                      shards=args.shards, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, eplb_every=args.eplb_every, ep_gpus=args.ep_gpus, trace_dir=args.trace_dir)
    tokens = None
    try:
        cfg.validate()
        if cfg.shards and not under_torchrun:  # a shard that is not tokens fails here, before training
            tokens = _read_shards(read_token_shards, cfg.shards)
            try:  # enough ids, all in the model's vocabulary
                TokenStream(tokens, cfg.seq_len, cfg.model_config().vocab_size, cfg.seed)
            except ValueError as exc:
                raise ValueError(f"--shards {' '.join(cfg.shards)}: {exc}") from None
    except (ValueError, OSError) as exc:  # OSError: a shard that cannot be read
        print(f"openinfra train: error: {exc}", file=sys.stderr)
        return 2
    if under_torchrun:  # under torchrun: this process is one rank
        import torch.distributed as dist

        dist.init_process_group("gloo")
        result = train_worker(dist.get_rank(), dist.get_world_size(), cfg)
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        result = train(cfg, tokens)
    for step, (loss, sec) in enumerate(zip(result["losses"], result["step_seconds"]), start=0):
        print(f"step {step:4d}  loss {loss:.4f}  {sec * 1e3:7.1f} ms")
    print(f"tokens/s {result['tokens_per_s']:,.0f}")
    for plan in result["eplb"]:
        moved = f"; {plan['ep_experts_moved']} of rank 0's expert slots re-placed over the EP ranks" \
            if "ep_experts_moved" in plan else ""
        before = "n/a" if plan["balancedness_before"] is None else f"{plan['balancedness_before']:.3f}"
        print(f"EPLB at step {plan['step']}: balancedness {before} -> {plan['balancedness_after']:.3f} "
              f"on {plan['gpus']} GPUs{moved}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "eplb"} | {"eplb": [
            {k: v for k, v in p.items() if k != "phy2log"} for p in result["eplb"]]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the small DeepSeek-V3 (DualPipeV across --pp gloo ranks, or experts across --ep ranks)")
    p.add_argument("--config", default="tiny", help="model config name (tiny, small, medium)")
    p.add_argument("--layers", type=int, default=0, help="override the config's layer count")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks (DualPipeV); 1 = single process")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks: each holds 1/ep of the routed experts, tokens move by DeepEP "
                        "dispatch/combine; with --pp: pp * ep ranks")
    p.add_argument("--chunks", type=int, default=0, help="micro-batches per step (default 4*pp, 2*pp*ep with --ep, or ep)")
    p.add_argument("--shards", nargs="*", default=[], help="token shards (.parquet with a tokens column, or .npy)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--eplb-every", type=int, default=10, help="steps between EPLB placement plans")
    p.add_argument("--ep-gpus", type=int, default=4, help="GPUs the EPLB plan places experts on")
    p.add_argument("--trace-dir", default=None, help="write profiler and schedule traces here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (gloo ranks); cuda is refused: GPU training is not wired in this job")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    p.set_defaults(func=_run)
