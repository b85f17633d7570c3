"""The demo's last stage: the report (``<data-dir>/report.md`` plus pictures).

It collects what the earlier stages measured — throughput per stage, expert balance before and
after EPLB, pipeline bubble (measured against the formula) and compute/communication overlap from
the training traces — draws a picture of each, and adds the cost-vs-income table of the
DeepSeek-V3/R1 inference overview plus the same arithmetic for this run's serving throughput.
A section whose inputs are missing (its stage did not run) says so instead of inventing numbers.
"""

from __future__ import annotations

import json

from openinfra.serving.cost import PUBLISHED, compute_cost, format_table

__all__ = ["run_stage"]


def _eplb_section(ctx, lines: list[str]) -> str | None:
    train_json = ctx.data_dir / "train.json"
    if not train_json.exists():
        lines.append("_No training run: no expert loads to balance._")
        return None
    plans = json.loads(train_json.read_text()).get("eplb") or []
    if not plans:
        lines.append("_The training run made no EPLB plan._")
        return None
    plan = plans[-1]
    lines.append(f"Plan at step {plan['step']} from {plan['tokens']:,} routed tokens: {plan['experts']} experts x "
                 f"{plan['layers']} MoE layers onto {plan['gpus']} GPUs ({plan['replicas']} slots).")
    lines.append(f"Balancedness (mean GPU load / max GPU load): {plan['balancedness_before']:.3f} with experts in "
                 f"order -> {plan['balancedness_after']:.3f} with EPLB.")
    if plan.get("gpu_loads_before") is None:
        return None
    import torch

    from openinfra.parallel.eplb.plot import plot_gpu_loads

    png = ctx.data_dir / "eplb.png"
    plot_gpu_loads(png, torch.tensor(plan["gpu_loads_before"]), torch.tensor(plan["gpu_loads_after"]), layer=0,
                   title="per-GPU expert load, MoE layer 0: in order (top) vs EPLB (bottom)")
    lines.append(f"![EPLB]({png.name})")
    return str(png)


def _pipeline_section(ctx, lines: list[str]) -> dict:
    traces = ctx.data_dir / "train" / "traces"
    out: dict = {}
    schedule = traces / "schedule.json"
    if schedule.exists():
        from openinfra.parallel.dualpipe.timeline import pipeline_report

        stats = pipeline_report(schedule, ctx.data_dir / "pipeline.png")
        out["bubble"] = stats
        shown = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and k != "png"}
        lines.append("DualPipeV schedule of the last training step (per-rank F/B/W, sends and receives):")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in shown.items()]
        lines.append("![pipeline](pipeline.png)")
    else:
        lines.append("_No pipeline schedule trace (the train stage did not run with DualPipe)._")
    rank_traces = sorted(traces.glob("train_rank*.json")) if traces.exists() else []
    if rank_traces:
        from openinfra.profiling.summary import format_summary, summarize
        from openinfra.profiling.timeline import plot_timeline

        summary = summarize([str(p) for p in rank_traces])
        out["profile"] = summary.to_dict()
        lines += ["", "torch.profiler traces of the same step:", "", "```", format_summary(summary), "```"]
        plot_timeline([str(p) for p in rank_traces], ctx.data_dir / "timeline.png")
        lines.append("![timeline](timeline.png)")
    return out


def run_stage(ctx) -> dict[str, object]:
    report = compute_cost()
    table = format_table(report)
    ctx.log("DeepSeek-V3/R1 inference: cost vs theoretical income (24 h, published inputs)")
    for line in table.splitlines():
        ctx.log(line)
    md = ["# openinfra demo report", ""]
    md += ["## Stages and their throughput", ""]
    for stage, results in ctx.results.items():
        md += [f"### {stage}", ""] + [f"- {k}: {v}" for k, v in results.items()] + [""]
    md += ["## Expert balance (EPLB)", ""]
    eplb_png = _eplb_section(ctx, md)
    md += ["", "## Pipeline bubble and overlap", ""]
    pipeline = _pipeline_section(ctx, md)
    md += ["", "## Cost vs theoretical income (published inputs)", "", "```", table, "```", ""]
    serve = ctx.data_dir / "serve.json"
    if serve.exists():
        econ = json.loads(serve.read_text())["economics"]
        md += ["## The same arithmetic for this run's serving throughput (1 GPU at $2/GPU-hour)", ""]
        md += [f"- {k}: {v:,.4g}" for k, v in econ.items()] + [""]
    path = ctx.data_dir / "report.md"
    path.write_text("\n".join(md))
    (ctx.data_dir / "cost.json").write_text(json.dumps({"computed": report.to_dict(), "published": PUBLISHED}, indent=2))
    summary: dict[str, object] = {
        "cost per day": f"${report.cost_per_day:,.0f}",
        "income per day": f"${report.income_per_day:,.0f}",
        "margin": f"{report.margin * 100:.1f}%",
        "report": str(path),
    }
    if eplb_png:
        summary["EPLB picture"] = eplb_png
    bubble = pipeline.get("bubble")
    if bubble:
        keys = [k for k in bubble if "bubble" in k and isinstance(bubble[k], float)]
        summary["pipeline"] = ", ".join(f"{k} {bubble[k]:.3f}" for k in keys[:3]) or "see report"
    prof = pipeline.get("profile")
    if prof and prof.get("overlap_fraction") is not None:
        summary["comm/compute overlap"] = f"{prof['overlap_fraction']:.1%}"
    return summary
