"""The demo's train stage: the tiny model on the data stage's shards on 4 gloo ranks -- two DualPipeV
pipelines of 2 ranks, the routed experts of each pipeline stage split over 2 expert-parallel ranks
(DeepEP dispatch/combine) -- with EPLB plans from the observed expert loads and checkpoints (copied
to 3FS when the cluster runs)."""

from __future__ import annotations

import json
from pathlib import Path

from openinfra.training.data import read_token_shards
from openinfra.training.job import TrainConfig, default_corpus_tokens, train

__all__ = ["run_stage"]


def _shard_tokens(ctx):
    data = ctx.results.get("data") or {}
    shards_dir = data.get("shards_dir")
    if not shards_dir:
        return default_corpus_tokens(), "openinfra's own source (no data stage)"
    from openinfra.smallpond import storage

    fs, root = storage.filesystem(shards_dir)
    files = sorted(storage.join(shards_dir, p) for p in storage.listdir(shards_dir) if p.endswith(".parquet"))
    if not files:
        raise ValueError(f"the data stage left no .parquet shards in {shards_dir}")
    remote = storage.is_remote(shards_dir)
    tokens = read_token_shards(files, filesystem=fs if remote else None)
    return tokens, f"{len(files)} shards from {shards_dir}"


def _copy_to_3fs(ctx, local_dir: Path) -> str | None:
    cluster = ctx.results.get("cluster") or {}
    url = cluster.get("fsspec_url")
    if not url:
        return None
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    dest = url.rstrip("/") + "/checkpoints/final"
    for f in sorted(local_dir.iterdir()):
        with open(f, "rb") as src, fs.open(f"{dest}/{f.name}", "wb") as dst:
            dst.write(src.read())
    return dest


def run_stage(ctx) -> dict[str, object]:
    tokens, source = _shard_tokens(ctx)
    ckpt = ctx.data_dir / "train" / "checkpoints"
    traces = ctx.data_dir / "train" / "traces"
    cfg = TrainConfig(model="tiny", n_layers=4, steps=6 if ctx.quick else 40, batch_size=8, seq_len=64, lr=3e-3,
                      pp=2, ep=2, num_chunks=8, checkpoint_dir=str(ckpt), checkpoint_every=5 if ctx.quick else 20,
                      eplb_every=3 if ctx.quick else 10, ep_gpus=4, ep_redundant=4,
                      trace_dir=str(traces))
    ctx.log(f"training on {source}: {cfg.steps} steps, {cfg.ep} DualPipeV pipelines of {cfg.pp} ranks, experts over "
            f"{cfg.ep} EP ranks (DeepEP), {cfg.chunks()} micro-batches")
    result = train(cfg, tokens)
    (ctx.data_dir / "train.json").write_text(json.dumps(result, indent=1))
    losses = result["losses"]
    plan = result["eplb"][-1] if result["eplb"] else None
    remote = _copy_to_3fs(ctx, Path(result["final_checkpoint"]))
    for step in range(0, len(losses), max(1, len(losses) // 5)):
        ctx.log(f"step {step:3d} loss {losses[step]:.3f}")
    summary = {
        "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps",
        "parallelism": f"pp {cfg.pp} x ep {cfg.ep} gloo ranks (DualPipeV, DeepEP dispatch/combine)",
        "tokens/s": f"{result['tokens_per_s']:,.0f}",
        "checkpoint": remote or result["final_checkpoint"],
        "checkpoint_local": result["final_checkpoint"],
        "traces": str(traces),
    }
    if plan:
        summary["EPLB balancedness"] = f"{plan['balancedness_before']:.3f} -> {plan['balancedness_after']:.3f} on {plan['gpus']} GPUs"
    return summary
