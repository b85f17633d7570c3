"""``openinfra bench dualpipe``: pipeline schedules on the same model, ranks and micro-batches.

Peers in the same run (torch.distributed.pipelining): Schedule1F1B, ScheduleInterleaved1F1B,
ScheduleZBVZeroBubble, ScheduleDualPipeV; ours: DualPipeV and DualPipe, each with and without
``overlapped_forward_backward``. The model is 2*PP blocks; with ``--model moe`` (default) each
block is attention + a MoE FFN whose experts are sharded over an EP group of ``--ep`` ranks, so
its all-to-all is a real share of the step (``a2a_share`` reports it). World = PP x EP ranks
(gloo on CPU; NCCL when every rank has its own GPU).

Per schedule: median step time over ``--steps`` timed steps (max over ranks), and the bubble
estimated the same way for every schedule: 1 - (this rank's standalone compute for its
micro-batches) / step time, averaged over ranks. For ours the recorded trace also gives the
measured bubble (idle inside the step window) and the DualPipe formula evaluated with the
trace's own F/B/W/F&B times. ``--trace-dir`` keeps our traces (JSON + Chrome) and PNG timelines.
"""

from __future__ import annotations

import argparse
import statistics
import time

from openinfra.argtypes import positive_float, positive_int
from openinfra.bench.harness import BenchResult, routine

OURS = ("DualPipeV", "DualPipeV-nooverlap", "DualPipe", "DualPipe-nooverlap")
TORCH = ("1F1B", "Interleaved1F1B", "ZBV", "torch-DualPipeV")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", type=positive_int, default=2, help="pipeline ranks (even, for DualPipe)")
    p.add_argument("--ep", type=positive_int, default=2, help="expert-parallel ranks per pipeline rank (MoE model)")
    p.add_argument("--chunks", type=positive_int, default=8, help="micro-batches per step (even, >= 2*PP)")
    p.add_argument("--model", choices=("moe", "mlp"), default="moe")
    p.add_argument("--mb", type=positive_int, default=4, help="micro-batch size")
    p.add_argument("--seq", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--experts", type=positive_int, default=8, help="experts per MoE layer (global)")
    p.add_argument("--expert-hidden", type=positive_int, default=128)
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per schedule (after one warm-up)")
    p.add_argument("--schedules", nargs="*", default=list(TORCH + OURS), help="subset to run")
    p.add_argument("--trace-dir", default=None, type=str, help="write our schedules' traces and timelines here")
    p.add_argument("--timeout", type=positive_float, default=580, help="seconds before the ranks are killed")


def _block(cfg: dict, num_layers: int, ep_group, device, recorder=None, ours: bool = True):
    import torch.nn as nn

    from openinfra.parallel.dualpipe.moe import MoEConfig, MoEStage
    from openinfra.parallel.dualpipe.toy import MLPStage

    if cfg["model"] == "moe":
        mc = MoEConfig(hidden=cfg["hidden"], num_heads=4, num_experts=cfg["experts"], topk=2,
                       expert_hidden=cfg["expert_hidden"], num_layers=num_layers)
        # torch's zero-bubble schedules split backward over one connected graph: give them that.
        return MoEStage(mc, ep_group=ep_group, recorder=recorder, device=device, segmented=ours)
    h = cfg["hidden"]
    if ours:
        mods = [MLPStage(h, device=device) for _ in range(num_layers)]
    else:
        mods = [nn.Sequential(nn.Linear(h, 4 * h, bias=False, device=device), nn.GELU(),
                              nn.Linear(4 * h, h, bias=False, device=device)) for _ in range(num_layers)]
    return mods[0] if num_layers == 1 else nn.Sequential(*mods)


def _layout(name: str, pp: int, rank: int) -> tuple[list[int], int, int]:
    """(stage indices held by ``rank``, layers per stage, micro-batches per stage)."""
    if name == "1F1B":
        return [rank], 2, 0
    if name == "Interleaved1F1B":
        return [rank, rank + pp], 1, 0
    if name.startswith("DualPipe-") or name == "DualPipe":
        return [rank, pp - 1 - rank], 2, 0
    return [rank, 2 * pp - 1 - rank], 1, 0  # V layouts


def _rank_main(rank: int, world: int, cfg: dict):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from openinfra.parallel.dualpipe import DualPipe, DualPipeV, ScheduleRecorder
    from openinfra.parallel.dualpipe.timeline import bubble_stats

    pp, ep = cfg["pp"], cfg["ep"]
    pp_rank, ep_rank = divmod(rank, ep)
    pp_groups = [dist.new_group([e + p * ep for p in range(pp)]) for e in range(ep)]
    ep_groups = [dist.new_group([p * ep + e for e in range(ep)]) for p in range(pp)]
    pp_group, ep_group = pp_groups[ep_rank], ep_groups[pp_rank]
    if ep == 1:
        pp_group = dist.group.WORLD  # the default group: nothing to split
    if cfg["model"] == "mlp" or ep == 1:
        ep_group = None
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU per rank
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mb, seq, h, C = cfg["mb"], cfg["seq"], cfg["hidden"], cfg["chunks"]
    gen = torch.Generator().manual_seed(1234 + ep_rank)
    x = torch.randn(C * mb, seq, h, generator=gen).to(device)
    y = torch.randn(C * mb, seq, h, generator=gen).to(device)

    def crit(out, target):
        return F.mse_loss(out, target).clone()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def max_over_world(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def mean_over_pp(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=pp_group)
        return float(t) / pp

    def standalone_fb(mods) -> float:
        """Seconds of one micro-batch's F+B through ``mods`` with no pipeline around (EP peers in step)."""
        times = []
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            sync()
            for m in mods:
                xi = torch.randn(mb, seq, h, device=device, requires_grad=True)
                m(xi).backward(torch.ones(mb, seq, h, device=device))
            sync()
            times.append(time.perf_counter() - t0)
            for m in mods:
                m.zero_grad()
        return statistics.median(times)

    rows = []
    for name in cfg["schedules"]:
        torch.manual_seed(0)
        stages, layers, _ = _layout(name, pp, pp_rank)
        num_stages = 2 * pp if layers == 1 else pp
        rec = ScheduleRecorder(enabled=False) if name in OURS else None
        mods = [_block(cfg, layers, ep_group, device, rec, ours=name in OURS) for _ in stages]
        per_module = C // 2 if name.startswith("DualPipe") and not name.startswith("DualPipeV") else C
        if name in OURS:
            cls = DualPipeV if name.startswith("DualPipeV") else DualPipe
            pipe = cls(tuple(mods), process_group=pp_group, p2p_shapes=[(mb, seq, h)], recorder=rec)
            if name.endswith("nooverlap"):
                pipe.overlapped_forward_backward = False
            if cls is DualPipeV:
                args = (x,) if pp_rank == 0 else ()
                labels = (y,) if pp_rank == 0 else ()
            else:
                half = 0 if pp_rank == 0 else 1
                args = (x.chunk(2)[half],) if pp_rank in (0, pp - 1) else ()
                labels = (y.chunk(2)[1 - half],) if pp_rank in (0, pp - 1) else ()

            def one_step():
                pipe.step(*args, num_chunks=C, criterion=crit, labels=labels)
        else:
            from torch.distributed.pipelining import (
                PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
            )

            example = torch.empty(mb, seq, h, device=device)
            pstages = [PipelineStage(m, i, num_stages, device, input_args=(example,),
                                     group=pp_group) for m, i in zip(mods, stages)]
            sched_cls = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B,
                         "ZBV": ScheduleZBVZeroBubble, "torch-DualPipeV": ScheduleDualPipeV}[name]
            sched = sched_cls(pstages if len(pstages) > 1 else pstages[0], n_microbatches=C, loss_fn=crit,
                              scale_grads=False)
            first = 0 in stages
            last = (num_stages - 1) in stages

            def one_step():
                kwargs = {"target": y, "losses": []} if last else {}
                if first:
                    sched.step(x, **kwargs)
                else:
                    sched.step(**kwargs)

        one_step()  # warm-up
        for m in mods:
            m.zero_grad()
        times = []
        for i in range(cfg["steps"]):
            if rec is not None:
                rec.enabled = i == cfg["steps"] - 1  # record the last step only
            dist.barrier()
            t0 = time.perf_counter()
            one_step()
            sync()
            times.append(max_over_world(time.perf_counter() - t0))
            for m in mods:
                m.zero_grad()
        step_s = statistics.median(times)
        compute_s = per_module * standalone_fb(mods)
        est_bubble = mean_over_pp(max(0.0, 1 - compute_s / step_s))
        row = {"schedule": name, "step_ms": step_s * 1e3, "bubble_est": est_bubble}
        if rec is not None:
            events = rec.gather(pp_group)
            trace = rec.trace(events)
            stats = bubble_stats(trace)
            a2a = sum(e.duration_us for e in events if e.kind.startswith("a2a:"))
            row.update(bubble_trace=stats["measured_bubble"], bubble_formula=stats["formula_bubble"])
            if cfg["model"] == "moe" and ep > 1:
                # all-to-all time in flight per rank over the step window; without overlap the
                # waits block, so there it is the all-to-all's share of the step
                row["a2a_inflight"] = a2a / len({e.rank for e in events}) / stats["window_us"]
            if cfg.get("trace_dir") and pp_rank == 0 and ep_rank == 0:
                from pathlib import Path

                from openinfra.parallel.dualpipe.timeline import draw_timeline

                d = Path(cfg["trace_dir"])
                d.mkdir(parents=True, exist_ok=True)
                rec.to_json(d / f"{name}.json", events)
                rec.to_chrome_trace(d / f"{name}.chrome.json", events)
                draw_timeline(trace, d / f"{name}.png")
        elif name == "1F1B":
            row["bubble_formula"] = (pp - 1) / (pp - 1 + C)
        rows.append(row)
        del mods
    return rows if rank == 0 else None


@routine("dualpipe", "pipeline schedules (1F1B, Interleaved, ZBV, torch DualPipeV, our DualPipe/V): step time and bubble",
         _add_arguments)
def bench_dualpipe(args: argparse.Namespace) -> BenchResult:
    import torch

    from openinfra.testing.distributed import run_on_ranks

    unknown = [s for s in args.schedules if s not in TORCH + OURS]
    if unknown:
        raise ValueError(f"--schedules: unknown {unknown}; choose from {list(TORCH + OURS)}")
    if args.pp < 2 or args.pp % 2:
        raise ValueError(f"--pp must be even and >= 2 (DualPipe), got {args.pp}")
    if args.chunks % 2 or args.chunks < 2 * args.pp:
        raise ValueError(f"--chunks must be even and >= 2*pp = {2 * args.pp}, got {args.chunks}")
    if args.ep < 1 or (args.model == "moe" and args.experts % args.ep):
        raise ValueError(f"--ep must be >= 1 and divide --experts ({args.experts}), got {args.ep}")
    cfg = {k: getattr(args, k) for k in ("pp", "ep", "chunks", "model", "mb", "seq", "hidden", "experts", "steps", "schedules", "trace_dir")}
    cfg["expert_hidden"] = args.expert_hidden
    world = args.pp * (args.ep if args.model == "moe" else 1)
    cfg["ep"] = args.ep if args.model == "moe" else 1
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    rows = run_on_ranks(_rank_main, world, cfg, backend=backend, timeout=args.timeout)[0]
    by = {r["schedule"]: r for r in rows}
    torch_best = min((by[s]["step_ms"] for s in TORCH if s in by), default=None)
    summary = {"backend": backend, "world": world, "pp": args.pp, "ep": cfg["ep"], "chunks": args.chunks, "model": args.model}
    for s in OURS:
        if s in by and torch_best:
            summary[f"{s}_over_best_torch"] = by[s]["step_ms"] / torch_best
    if "DualPipeV" in by and "torch-DualPipeV" in by:
        summary["DualPipeV_over_torch_DualPipeV"] = by["DualPipeV"]["step_ms"] / by["torch-DualPipeV"]["step_ms"]
    if "DualPipeV" in by and by["DualPipeV"].get("bubble_formula"):
        summary["DualPipeV_bubble_trace_over_formula"] = by["DualPipeV"]["bubble_trace"] / by["DualPipeV"]["bubble_formula"]
    if "DualPipeV-nooverlap" in by and "a2a_inflight" in by["DualPipeV-nooverlap"]:
        summary["a2a_share_of_step"] = by["DualPipeV-nooverlap"]["a2a_inflight"]
    if "DualPipeV" in by and "DualPipeV-nooverlap" in by:
        summary["DualPipeV_overlap_over_nooverlap"] = by["DualPipeV"]["step_ms"] / by["DualPipeV-nooverlap"]["step_ms"]
    if "1F1B" in by and "DualPipeV" in by:
        summary["DualPipeV_over_1F1B"] = by["DualPipeV"]["step_ms"] / by["1F1B"]["step_ms"]
    summary["goal_over_best_torch"] = 0.85
    return BenchResult(rows, summary)
