"""The demo's serve stage: batched generation with prefix reuse, measured the way the DeepSeek-V3/R1
inference overview reports it (input tokens/s in prefill, output tokens/s in decode), then the
cost-vs-income table for this run's own throughput. When the demo's 3FS cluster runs, the same
prompts also go through prefill/decode disaggregation (a prefill worker process, KV through 3FS
KVCache) and its throughput and agreement with the single-process run are reported."""

from __future__ import annotations

import json

from openinfra.serving.cli import build_engine
from openinfra.serving.cost import run_economics
from openinfra.serving.tokenizer import ByteTokenizer

__all__ = ["run_stage"]

_SYSTEM = "You are a helpful assistant that writes small Python functions. "
_ASKS = ["Sort a list.", "Reverse a string.", "Sum the squares.", "Count the words.", "Parse an int.",
         "Merge two dicts.", "Find the maximum.", "Flatten a list."]


def _mgmtd(ctx) -> str | None:
    return (ctx.results.get("cluster") or {}).get("mgmtd")


def _prefix_store(ctx):
    """3FS KVCache when the demo's cluster runs, else the in-memory LRU."""
    mgmtd = _mgmtd(ctx)
    if not mgmtd:
        return None, "in-memory LRU (no 3FS cluster)"
    from openinfra.fs.clients.kvcache import KVCache, KVCacheBlockStore

    return KVCacheBlockStore(KVCache(mgmtd, root="/kvcache/demo")), f"3FS KVCache at {mgmtd}"


def _run_disaggregated(mgmtd: str, checkpoint: str | None, prompts: list[list[int]], max_tokens: int):
    """The overview's path: the same prompts through a prefill worker process and a decode engine in
    this process, the prompt KV moving through 3FS KVCache (its own root, so the single-process
    run's pages do not count as hits). Returns (outputs, DisaggregatedStats)."""
    import torch

    from openinfra.serving.disaggregated import DisaggregatedServer

    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    torch.set_num_threads(half)  # two processes on one CPU: split the cores (both at the default oversubscribe it)
    try:
        store = {"kind": "3fs", "mgmtd": mgmtd, "root": "/kvcache/demo-disaggregated"}
        with DisaggregatedServer(store, config="tiny", checkpoint=checkpoint, num_blocks=48, page_size=16, max_batch=8,
                                 worker_threads=half) as srv:
            return srv.generate(prompts, max_tokens=max_tokens), srv.stats
    finally:
        torch.set_num_threads(threads)


def run_stage(ctx) -> dict[str, object]:
    train = ctx.results.get("train", {})
    checkpoint = train.get("checkpoint_local")
    store, store_name = _prefix_store(ctx)
    try:
        return _serve(ctx, checkpoint, store, store_name)
    finally:
        if store is not None:
            store.close()  # its 3FS client: connections closed before the cluster stage's cluster stops


def _serve(ctx, checkpoint: str | None, store, store_name: str) -> dict[str, object]:
    engine = build_engine("tiny", checkpoint, num_blocks=48, page_size=16, max_batch=8, block_store=store)
    tok = ByteTokenizer()
    if engine.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"the byte tokenizer needs vocab_size >= {tok.vocab_size}, model has {engine.cfg.vocab_size}")
    asks = _ASKS[:4] if ctx.quick else _ASKS
    prompts = [tok.encode(_SYSTEM + a) for a in asks]  # a shared system prompt: the prefix cache hits
    max_tokens = 8 if ctx.quick else 24
    outputs = engine.generate(prompts, max_tokens=max_tokens)
    s = engine.stats
    economics = run_economics(prefill_tokens_per_s=s.prefill_tokens_per_s, decode_tokens_per_s=s.decode_tokens_per_s,
                              cache_hit_share=s.prefix_hit_rate, gpus=1, gpu_hour_usd=2.0)
    record = {"stats": s.to_dict(), "economics": economics, "samples": [tok.decode(o) for o in outputs[:2]]}
    ctx.log(f"{len(prompts)} requests, {s.prompt_tokens} prompt tokens ({s.prefix_hit_rate:.0%} from the prefix cache), "
            f"{s.decode_tokens} decoded")
    disaggregated = {}
    if _mgmtd(ctx):
        d_outputs, d = _run_disaggregated(_mgmtd(ctx), checkpoint, prompts, max_tokens)
        same = sum(a == b for a, b in zip(d_outputs, outputs))
        record["disaggregated"] = {**d.to_dict(), "outputs_equal_single_process": same == len(prompts)}
        ctx.log(f"disaggregated (prefill worker process, KV through 3FS KVCache): {same} of {len(prompts)} outputs equal "
                f"the single-process run's, {d.fallback_prefills} fallback prefills")
        disaggregated = {
            "disaggregated: outputs equal single-process": f"{same} of {len(prompts)}",
            "disaggregated: prefill input tokens/s (worker)": f"{d.prefill_input_tokens_per_s:,.0f}",
            "disaggregated: prefix hit rate": f"{d.prefix_hit_rate:.1%}",
            "disaggregated: decode output tokens/s": f"{d.decode_output_tokens_per_s:,.0f}",
        }
    (ctx.data_dir / "serve.json").write_text(json.dumps(record, indent=2))
    return {
        "model": "trained checkpoint" if checkpoint else "fresh tiny model (no checkpoint from the train stage)",
        "requests": len(prompts),
        "prefix store": store_name,
        "prefix hit rate": f"{s.prefix_hit_rate:.1%}",
        "prefill input tokens/s": f"{s.prefill_tokens_per_s:,.0f}",
        "decode output tokens/s": f"{s.decode_tokens_per_s:,.0f}",
        "cost per 1M output tokens (1 GPU at $2/h)": f"${economics['cost_per_m_output_usd']:,.2f}",
        **disaggregated,
    }
