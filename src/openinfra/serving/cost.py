"""The DeepSeek-V3/R1 inference system's cost vs theoretical income, recomputed.

Published inputs (DeepSeek's inference-system overview, a 24-hour window):

- 226.75 nodes on average, 8 H800 GPUs per node, $2 per GPU-hour -> $87,072 per day;
- 608B input tokens, of which 342B (56.3%) hit the on-disk KV cache; 168B output tokens;
- R1 prices: $0.14 per million cache-hit input tokens, $0.55 per million cache-miss input tokens,
  $2.19 per million output tokens -> $562,027 per day of theoretical income;
- cost-profit margin (income - cost) / cost = 545%.

Recomputing from the rounded published token counts gives $562,100 (0.013% off, inside the
rounding of "608B" alone: +-0.5B tokens x $0.55/M = +-$275) and a 545.6% margin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, fields

__all__ = ["CostInputs", "CostReport", "compute_cost", "format_table", "run_economics", "PUBLISHED", "register"]

_MILLION = 1e6
_HOURS_PER_DAY = 24.0


@dataclass(frozen=True)
class CostInputs:
    """Everything the table is computed from. Token counts are per day."""

    avg_nodes: float = 226.75
    gpus_per_node: int = 8
    gpu_hour_usd: float = 2.0
    input_tokens: float = 608e9
    cache_hit_share: float = 342 / 608  # published as 342B tokens, "56.3%"
    output_tokens: float = 168e9
    price_cache_hit_per_m: float = 0.14
    price_cache_miss_per_m: float = 0.55
    price_output_per_m: float = 2.19

    def validate(self) -> None:
        """Raise ValueError naming the first input that makes no sense."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        if self.avg_nodes <= 0:
            raise ValueError(f"avg_nodes must be > 0, got {self.avg_nodes}")
        if self.gpus_per_node <= 0 or int(self.gpus_per_node) != self.gpus_per_node:
            raise ValueError(f"gpus_per_node must be a positive integer, got {self.gpus_per_node}")
        if not 0.0 <= self.cache_hit_share <= 1.0:
            raise ValueError(f"cache_hit_share must be in [0, 1], got {self.cache_hit_share}")
        if self.gpu_hour_usd <= 0:
            raise ValueError(f"gpu_hour_usd must be > 0, got {self.gpu_hour_usd}")


@dataclass(frozen=True)
class CostReport:
    """The computed table; money in US dollars per day, throughput in tokens per second."""

    inputs: CostInputs
    cost_per_day: float
    income_cache_hit: float
    income_cache_miss: float
    income_output: float
    income_per_day: float
    margin: float  # (income - cost) / cost; 5.45 means 545%
    input_tokens_per_s_per_node: float  # averaged over every node and the whole day
    output_tokens_per_s_per_node: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["margin_percent"] = self.margin * 100.0
        return d


#: The overview's own figures, for comparison next to ours.
PUBLISHED = {
    "cost_per_day": 87_072.0,
    "income_per_day": 562_027.0,
    "margin_percent": 545.0,
    "prefill_input_tokens_per_s_per_node": 73_700.0,
    "decode_output_tokens_per_s_per_node": 14_800.0,
}


def compute_cost(inputs: CostInputs | None = None) -> CostReport:
    """Cost per day = nodes x GPUs x $/GPU-hour x 24; income = tokens x price per million."""
    inputs = inputs or CostInputs()
    inputs.validate()
    cost = inputs.avg_nodes * inputs.gpus_per_node * inputs.gpu_hour_usd * _HOURS_PER_DAY
    hit_tokens = inputs.input_tokens * inputs.cache_hit_share
    miss_tokens = inputs.input_tokens - hit_tokens
    income_hit = hit_tokens / _MILLION * inputs.price_cache_hit_per_m
    income_miss = miss_tokens / _MILLION * inputs.price_cache_miss_per_m
    income_out = inputs.output_tokens / _MILLION * inputs.price_output_per_m
    income = income_hit + income_miss + income_out
    node_seconds = inputs.avg_nodes * _HOURS_PER_DAY * 3600.0
    return CostReport(
        inputs=inputs,
        cost_per_day=cost,
        income_cache_hit=income_hit,
        income_cache_miss=income_miss,
        income_output=income_out,
        income_per_day=income,
        margin=(income - cost) / cost,
        input_tokens_per_s_per_node=inputs.input_tokens / node_seconds,
        output_tokens_per_s_per_node=inputs.output_tokens / node_seconds,
    )


def run_economics(prefill_tokens_per_s: float, decode_tokens_per_s: float, cache_hit_share: float,
                  gpus: int, gpu_hour_usd: float, inputs: CostInputs | None = None) -> dict[str, float]:
    """The overview's arithmetic for a run of our own engine on ``gpus`` GPUs.

    Assumes the overview's traffic mix (input:output tokens = 608:168) and splits the GPUs between
    prefill and decode so both sides keep up; returns cost per million tokens and the margin at
    R1 prices with this run's measured throughput and prefix-cache hit share.
    """
    if prefill_tokens_per_s <= 0 or decode_tokens_per_s <= 0:
        raise ValueError("prefill_tokens_per_s and decode_tokens_per_s must be > 0")
    inputs = inputs or CostInputs()
    ratio = inputs.input_tokens / inputs.output_tokens  # input tokens per output token
    # Time for one output token and its `ratio` input tokens, on one GPU doing both phases.
    seconds_per_output = ratio / prefill_tokens_per_s + 1.0 / decode_tokens_per_s
    output_tokens_per_hour = gpus * 3600.0 / seconds_per_output
    cost_per_hour = gpus * gpu_hour_usd
    income_per_output = (ratio * (cache_hit_share * inputs.price_cache_hit_per_m
                                  + (1 - cache_hit_share) * inputs.price_cache_miss_per_m)
                         + inputs.price_output_per_m) / _MILLION
    income_per_hour = output_tokens_per_hour * income_per_output
    return {
        "output_tokens_per_hour": output_tokens_per_hour,
        "cost_per_hour_usd": cost_per_hour,
        "income_per_hour_usd": income_per_hour,
        "cost_per_m_output_usd": cost_per_hour / output_tokens_per_hour * _MILLION,
        "margin": (income_per_hour - cost_per_hour) / cost_per_hour,
    }


def format_table(report: CostReport) -> str:
    """A plain-text table, ours beside the published figure where there is one."""
    i = report.inputs
    rows = [
        ("GPUs", f"{i.avg_nodes:g} nodes x {i.gpus_per_node} GPUs", ""),
        ("GPU price", f"${i.gpu_hour_usd:g} / GPU-hour", ""),
        ("Cost per day", f"${report.cost_per_day:,.0f}", "$87,072"),
        ("Input tokens per day", f"{i.input_tokens / 1e9:,.1f}B ({i.cache_hit_share:.2%} cache hits)", "608B (56.3%)"),
        ("Output tokens per day", f"{i.output_tokens / 1e9:,.1f}B", "168B"),
        ("Income, cache-hit input", f"${report.income_cache_hit:,.0f}  (@ ${i.price_cache_hit_per_m:g}/M)", ""),
        ("Income, cache-miss input", f"${report.income_cache_miss:,.0f}  (@ ${i.price_cache_miss_per_m:g}/M)", ""),
        ("Income, output", f"${report.income_output:,.0f}  (@ ${i.price_output_per_m:g}/M)", ""),
        ("Theoretical income per day", f"${report.income_per_day:,.0f}", "$562,027"),
        ("Cost-profit margin", f"{report.margin * 100:,.1f}%", "545%"),
        ("Input tokens/s per node (day average)", f"{report.input_tokens_per_s_per_node:,.0f}", "73.7k in prefill"),
        ("Output tokens/s per node (day average)", f"{report.output_tokens_per_s_per_node:,.0f}", "14.8k in decode"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'':{w0}}  {'computed':{w1}}  published", "-" * (w0 + w1 + 13)]
    lines += [f"{a:{w0}}  {b:{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------

_FLAGS = [
    ("--avg-nodes", "avg_nodes", float, "average number of serving nodes over the day"),
    ("--gpus-per-node", "gpus_per_node", int, "GPUs per node"),
    ("--gpu-hour-price", "gpu_hour_usd", float, "rental price in $ per GPU-hour"),
    ("--input-tokens", "input_tokens", float, "input tokens per day (e.g. 608e9)"),
    ("--cache-hit-share", "cache_hit_share", float, "share of input tokens that hit the KV cache, in [0, 1]"),
    ("--output-tokens", "output_tokens", float, "output tokens per day (e.g. 168e9)"),
    ("--price-cache-hit", "price_cache_hit_per_m", float, "$ per million cache-hit input tokens"),
    ("--price-cache-miss", "price_cache_miss_per_m", float, "$ per million cache-miss input tokens"),
    ("--price-output", "price_output_per_m", float, "$ per million output tokens"),
]


def _run(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, field) for _, field, _, _ in _FLAGS if getattr(args, field) is not None}
    try:
        report = compute_cost(CostInputs(**overrides))
    except ValueError as exc:
        print(f"openinfra cost: error: {exc}", file=sys.stderr)  # one line, exit code 2 like argparse
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print("DeepSeek-V3/R1 inference: cost vs theoretical income (24 h)")
        print(format_table(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = CostInputs()
    p = subparsers.add_parser(
        "cost",
        help="the DeepSeek-V3/R1 inference cost vs theoretical income table",
        description="Recompute the inference overview's cost vs income table; every input can be overridden.",
    )
    for flag, field, kind, text in _FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} (default {getattr(defaults, field):g})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_run)
