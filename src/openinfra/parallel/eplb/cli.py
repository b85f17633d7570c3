"""``openinfra eplb plan``: plan an expert placement from a loads file and print it (see
``_DESCRIPTION`` for the usage shown by ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]

_DESCRIPTION = """Plan an expert placement from a loads file and print it.

    openinfra eplb plan --loads loads.json --replicas 16 --groups 4 --nodes 2 --gpus 8
    openinfra eplb plan --loads loads.csv ... --previous plan.json --budget 0.01 --output new.json
    openinfra eplb plan --loads loads.json ... --png loads.png

Prints, per layer, the placement per GPU (expert ids and load) and the balancedness before
(the previous plan, or the static layout: expert e on GPU e*G//E with no redundancy) and after.
"""


def _error(msg: str) -> int:
    print(f"openinfra eplb: error: {msg}", file=sys.stderr)
    return 2


def _plan(args: argparse.Namespace) -> int:
    from openinfra.cli import picture_path

    try:  # before the imports below: they load PyTorch
        png = picture_path("--png", args.png) if args.png else None
    except ValueError as exc:
        return _error(str(exc))
    from openinfra.parallel.eplb.files import read_loads, read_plan, write_plan
    from openinfra.parallel.eplb.layout import gpu_loads, static_gpu_loads
    from openinfra.parallel.eplb.migration import rebalance_with_migration
    from openinfra.parallel.eplb.solver import choose_policy, rebalance_experts

    try:
        weight = read_loads(args.loads)
        previous = read_plan(args.previous) if args.previous else None
        layers, experts = weight.shape
        if previous is not None:
            plan = rebalance_with_migration(weight, previous, args.replicas, args.groups, args.nodes, args.gpus,
                                            budget=args.budget, expert_bytes=args.expert_bytes, solver=args.solver)
            phy2log = plan.phy2log
            before = gpu_loads(previous, weight, args.gpus)
        else:
            plan = None
            phy2log, _, _ = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus, solver=args.solver)
            before = static_gpu_loads(weight, args.gpus)
    except (ValueError, TypeError) as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot read {exc.filename}: {exc.strerror}")
    if args.show_layers is not None and (bad := [l for l in args.show_layers if not 0 <= l < layers]):
        return _error(f"--layers {' '.join(map(str, bad))}: outside [0, {layers}) (the loads have {layers} layers)")
    if args.png_layer is not None and not 0 <= args.png_layer < layers:
        return _error(f"--png-layer {args.png_layer} is outside [0, {layers})")

    after = gpu_loads(phy2log, weight, args.gpus)
    bal_before = before.mean(1) / before.max(1).values.clamp(min=1e-300)
    bal_after = after.mean(1) / after.max(1).values.clamp(min=1e-300)
    per_gpu = args.replicas // args.gpus
    policy = choose_policy(args.groups, args.nodes)
    gpus_per_node = args.gpus // args.nodes
    out = sys.stdout
    print(f"EPLB plan: {layers} layers x {experts} experts -> {args.replicas} slots on {args.gpus} GPUs "
          f"({args.nodes} nodes, {args.groups} groups, {policy} policy, solver {args.solver})", file=out)
    shown = range(layers) if args.show_layers is None else args.show_layers
    for layer in shown:
        print(f"layer {layer}: balancedness {bal_before[layer]:.3f} -> {bal_after[layer]:.3f}", file=out)
        if args.summary_only:
            continue
        for g in range(args.gpus):
            ids = phy2log[layer, g * per_gpu:(g + 1) * per_gpu].tolist()
            print(f"  gpu {g:>3} (node {g // gpus_per_node}): experts {ids}  load {after[layer, g]:,.1f}", file=out)
    print(f"mean balancedness: before {bal_before.mean():.4f}  after {bal_after.mean():.4f}", file=out)
    if plan is not None:
        print(f"migration: {plan.experts_moved} replicas moved ({plan.bytes_moved / 2**30:,.2f} GiB at "
              f"{args.expert_bytes:,} bytes per expert); layers kept {int((plan.source == 0).sum())}, "
              f"searched {int((plan.source == 1).sum())}, re-solved {int((plan.source == 2).sum())}; "
              f"a full re-solve would reach {plan.balancedness_fresh.mean():.4f}", file=out)
    if args.output:
        meta = {"num_replicas": args.replicas, "num_groups": args.groups, "num_nodes": args.nodes, "num_gpus": args.gpus,
                "solver": args.solver, "policy": policy, "balancedness": [round(float(b), 6) for b in bal_after]}
        try:
            write_plan(args.output, phy2log, **meta)
        except OSError as exc:
            return _error(f"cannot write {args.output}: {exc.strerror}")
        print(f"wrote {args.output}", file=out)
    if png:
        from openinfra.parallel.eplb.plot import plot_gpu_loads

        layer = args.png_layer if args.png_layer is not None else int(bal_before.argmin())
        try:
            plot_gpu_loads(png, before, after, layer, args.nodes,
                           title=f"EPLB per-GPU load, layer {layer} ({'previous plan' if plan is not None else 'static layout'} vs {args.solver})")
        except OSError as exc:
            return _error(f"cannot write {png}: {exc.strerror}")
        except ValueError as exc:  # matplotlib: the suffix is not an image format
            return _error(f"--png {png}: {exc}")
        print(f"wrote {png} (layer {layer})", file=out)
    if args.json:
        summary = {"balancedness_before": float(bal_before.mean()), "balancedness_after": float(bal_after.mean())}
        if plan is not None:
            summary.update(plan.summary())
        print(json.dumps(summary), file=out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from openinfra.parallel.eplb.migration import DEEPSEEK_V3_EXPERT_BYTES
    from openinfra.parallel.eplb.solver import DEFAULT_SOLVER, SOLVERS

    p = subparsers.add_parser("eplb", help="expert-parallel load balancer: plan expert placement from loads")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    sub = p.add_subparsers(title="eplb commands", metavar="COMMAND")
    plan = sub.add_parser("plan", help="plan a placement from a loads file (JSON / CSV) and print it",
                          description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--loads", required=True, help="loads [layers x experts]: .json (list of lists) or .csv (a row per layer)")
    plan.add_argument("--replicas", type=int, required=True, help="physical expert slots in total (a multiple of --gpus)")
    plan.add_argument("--groups", type=int, required=True, help="expert groups (must divide the experts)")
    plan.add_argument("--nodes", type=int, required=True, help="server nodes (must divide --gpus)")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in total")
    plan.add_argument("--solver", default=DEFAULT_SOLVER, choices=sorted(SOLVERS), help=f"placement solver (default {DEFAULT_SOLVER}; 'faithful' = the original EPLB)")
    plan.add_argument("--previous", help="the plan in service (JSON from --output): rebalance moving as few experts as --budget allows")
    plan.add_argument("--budget", type=float, default=0.01, help="with --previous: balancedness a layer may give up vs a full re-solve to save moves (default 0.01)")
    plan.add_argument("--expert-bytes", type=int, default=DEEPSEEK_V3_EXPERT_BYTES, help="bytes per expert for the bytes-moved report (default: DeepSeek-V3 FP8)")
    plan.add_argument("--output", help="write the plan (phy2log and settings) as JSON")
    plan.add_argument("--png", help="draw per-GPU load bars before and after into this PNG")
    plan.add_argument("--png-layer", type=int, help="layer to draw (default: the least balanced before)")
    plan.add_argument("--layers", dest="show_layers", type=int, nargs="+", help="print only these layers")
    plan.add_argument("--summary-only", action="store_true", help="print balancedness per layer, not the placement")
    plan.add_argument("--json", action="store_true", help="print a last JSON line with the summary")
    plan.set_defaults(func=_plan)
