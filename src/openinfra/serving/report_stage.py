"""The demo's last stage: the report. Today it holds the cost-vs-income table; the stages before
it add their sections through ``ctx.results``."""

from __future__ import annotations

import json

from openinfra.serving.cost import PUBLISHED, compute_cost, format_table

__all__ = ["run_stage"]


def run_stage(ctx) -> dict[str, object]:
    report = compute_cost()
    table = format_table(report)
    ctx.log("DeepSeek-V3/R1 inference: cost vs theoretical income (24 h, published inputs)")
    for line in table.splitlines():
        ctx.log(line)
    sections = ["# openinfra demo report", "", "## Cost vs theoretical income (published inputs)", "", "```", table, "```", ""]
    for stage, results in ctx.results.items():
        sections += [f"## {stage}", ""] + [f"- {k}: {v}" for k, v in results.items()] + [""]
    path = ctx.data_dir / "report.md"
    path.write_text("\n".join(sections))
    (ctx.data_dir / "cost.json").write_text(json.dumps({"computed": report.to_dict(), "published": PUBLISHED}, indent=2))
    return {
        "cost per day": f"${report.cost_per_day:,.0f}",
        "income per day": f"${report.income_per_day:,.0f}",
        "margin": f"{report.margin * 100:.1f}%",
        "report": str(path),
    }
