"""``openinfra train``: run the training job on this machine (gloo ranks) or under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from openinfra.training.job import TrainConfig, train, train_worker
    from openinfra.training.data import read_token_shards

    cfg = TrainConfig(model=args.config, n_layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, seed=args.seed, pp=args.pp, num_chunks=args.chunks,
                      shards=args.shards, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, eplb_every=args.eplb_every, ep_gpus=args.ep_gpus, trace_dir=args.trace_dir)
    try:
        cfg.validate()
        for s in cfg.shards:
            if not os.path.exists(s):
                raise ValueError(f"shard {s} does not exist")
    except ValueError as exc:
        print(f"openinfra train: error: {exc}", file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        result = train_worker(dist.get_rank(), dist.get_world_size(), cfg)
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        result = train(cfg, read_token_shards(cfg.shards) if cfg.shards else None)
    for step, (loss, sec) in enumerate(zip(result["losses"], result["step_seconds"]), start=0):
        print(f"step {step:4d}  loss {loss:.4f}  {sec * 1e3:7.1f} ms")
    print(f"tokens/s {result['tokens_per_s']:,.0f}")
    for plan in result["eplb"]:
        print(f"EPLB at step {plan['step']}: balancedness {plan['balancedness_before']} -> {plan['balancedness_after']:.3f}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "eplb"} | {"eplb": [
            {k: v for k, v in p.items() if k != "phy2log"} for p in result["eplb"]]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the small DeepSeek-V3 (DualPipeV across --pp gloo ranks)")
    p.add_argument("--config", default="tiny", help="model config name (tiny, small, medium)")
    p.add_argument("--layers", type=int, default=0, help="override the config's layer count")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks (DualPipeV); 1 = single process")
    p.add_argument("--chunks", type=int, default=0, help="micro-batches per step (default 4*pp, or 1)")
    p.add_argument("--shards", nargs="*", default=[], help="token shards (.parquet with a tokens column, or .npy)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--eplb-every", type=int, default=10, help="steps between EPLB placement plans")
    p.add_argument("--ep-gpus", type=int, default=4, help="GPUs the EPLB plan places experts on")
    p.add_argument("--trace-dir", default=None, help="write profiler and schedule traces here")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, under torchrun)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    p.set_defaults(func=_run)
