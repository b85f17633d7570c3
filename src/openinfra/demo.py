"""``openinfra demo``: the main job, as an ordered list of stages.

The stages are fixed here, in order (architecture.md, "The main job"). A stage is built by
providing its module: ``run_stage(ctx: DemoContext) -> dict[str, object]`` does the work and
returns the lines for the summary. A stage whose module does not exist yet is reported as not
built, and the demo goes on with the rest; a stage that fails stops the demo with its error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Stage", "STAGES", "DemoContext", "run_demo", "register"]


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    module: str

    def is_built(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


STAGES: tuple[Stage, ...] = (
    Stage("cluster", "start an embedded 3FS cluster (mgmtd, meta, storage chains) on loopback", "openinfra.fs.demo_stage"),
    Stage("data", "smallpond: corpus -> tokenized, deduplicated, shuffled shards on 3FS", "openinfra.smallpond.demo_stage"),
    Stage("train", "train a small DeepSeek-V3 with DualPipeV and DeepEP expert parallelism, gate balancing and EPLB plans; checkpoints to 3FS", "openinfra.training.demo_stage"),
    Stage("serve", "batched generation with a paged MLA KV cache and prefix KVCache on 3FS", "openinfra.serving.demo_stage"),
    Stage("report", "cost-vs-income table, throughput, balance, bubble and overlap pictures", "openinfra.serving.report_stage"),
)


@dataclass
class DemoContext:
    """What stages share: the data directory and every earlier stage's results."""

    data_dir: Path
    quick: bool = False
    results: dict[str, dict[str, object]] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.log_lines.append(message)
        print(f"    {message}", flush=True)


@dataclass
class StageOutcome:
    stage: Stage
    status: str  # "ok", "not built", "failed", "skipped"
    seconds: float = 0.0
    summary: dict[str, object] = field(default_factory=dict)
    error: str = ""


def run_demo(ctx: DemoContext, only: list[str] | None = None) -> list[StageOutcome]:
    """Run the stages in order; returns one outcome per stage."""
    outcomes: list[StageOutcome] = []
    failed = False
    total = len(STAGES)
    for index, stage in enumerate(STAGES, start=1):
        prefix = f"[{index}/{total}] {stage.name}"
        if failed or (only and stage.name not in only):
            outcomes.append(StageOutcome(stage, "skipped"))
            print(f"{prefix}: skipped", flush=True)
            continue
        if not stage.is_built():
            outcomes.append(StageOutcome(stage, "not built"))
            print(f"{prefix}: not built yet ({stage.description})", flush=True)
            continue
        print(f"{prefix}: {stage.description} ...", flush=True)
        start = time.perf_counter()
        try:
            summary = importlib.import_module(stage.module).run_stage(ctx)
        except Exception as exc:  # a stage failure is reported, then the demo stops
            seconds = time.perf_counter() - start
            outcomes.append(StageOutcome(stage, "failed", seconds, error=f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()
            print(f"{prefix}: FAILED after {seconds:.1f} s: {exc}", flush=True)
            failed = True
            continue
        seconds = time.perf_counter() - start
        ctx.results[stage.name] = dict(summary)
        outcomes.append(StageOutcome(stage, "ok", seconds, dict(summary)))
        print(f"{prefix}: done in {seconds:.1f} s", flush=True)
    return outcomes


def format_summary(outcomes: list[StageOutcome]) -> str:
    lines = ["", "Summary", "-------"]
    for o in outcomes:
        timing = f" ({o.seconds:.1f} s)" if o.status in ("ok", "failed") else ""
        lines.append(f"{o.stage.name:8} {o.status}{timing}")
        for key, value in o.summary.items():
            lines.append(f"         {key}: {value}")
        if o.error:
            lines.append(f"         error: {o.error}")
    built = sum(o.status == "ok" for o in outcomes)
    missing = [o.stage.name for o in outcomes if o.status == "not built"]
    lines.append(f"{built} of {len(outcomes)} stages ran" + (f"; not built yet: {', '.join(missing)}" if missing else ""))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, or a parent that cannot be created
        why = "a file, not a directory" if data_dir.is_file() else f"cannot create it ({exc.strerror or exc})"
        print(f"openinfra demo: error: --data-dir {args.data_dir}: {why}", file=sys.stderr)
        return 2
    ctx = DemoContext(data_dir=data_dir, quick=args.quick)
    print(f"openinfra demo: data directory {data_dir}", flush=True)
    outcomes = run_demo(ctx, only=args.only)
    print(format_summary(outcomes), flush=True)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the main job: 3FS cluster, data, training, serving, report",
        description="Run every built stage of the main job in order on embedded defaults.",
    )
    p.add_argument("--data-dir", default=".openinfra/demo", help="where the cluster, data and report go")
    p.add_argument("--quick", action="store_true", help="smallest sizes (what the tests run)")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    p.set_defaults(func=_run)
