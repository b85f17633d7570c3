"""``openinfra serve``: the OpenAI-style completion server over a checkpoint (or a fresh model)."""

from __future__ import annotations

import argparse
import sys
import time

from openinfra.cli import not_a_directory

__all__ = ["register", "build_engine", "build_model"]


def build_model(config: str = "tiny", checkpoint: str | None = None, device: str = "cpu", seed: int = 0):
    """The model the CLI, the demo and the prefill worker use: a checkpoint when given, else a fresh
    model seeded with ``seed`` (the same weights in every process that builds it)."""
    import torch

    from openinfra.model import Transformer, get_config
    from openinfra.model.loader import load_checkpoint

    if checkpoint:
        model, _ = load_checkpoint(checkpoint, device=device)
        return model
    torch.manual_seed(seed)
    return Transformer(get_config(config)).to(device)


def build_engine(config: str = "tiny", checkpoint: str | None = None, num_blocks: int = 64, page_size: int = 64,
                 max_batch: int = 8, device: str = "cpu", seed: int = 0, prefix_cache_mb: int = 64, block_store=None):
    """The engine the CLI and the demo use over :func:`build_model`.

    The prefix store is ``block_store`` when given (e.g. a 3FS KVCache), else an in-memory LRU of
    ``prefix_cache_mb`` MiB (0 disables prefix reuse)."""
    from openinfra.serving.engine import Engine
    from openinfra.serving.prefix_cache import MemoryBlockStore

    model = build_model(config, checkpoint, device, seed)
    store = block_store
    if store is None and prefix_cache_mb > 0:
        store = MemoryBlockStore(prefix_cache_mb * 2**20)
    return Engine(model, num_blocks=num_blocks, page_size=page_size, max_batch=max_batch, block_store=store, seed=seed)


def _store_spec(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The KV store both processes of ``--disaggregated`` open, and a temporary directory to remove
    at exit (when no store was named)."""
    if args.kvcache_mgmtd:
        return {"kind": "3fs", "mgmtd": args.kvcache_mgmtd, "root": args.kvcache_root}, None
    if args.kv_store_dir:
        return {"kind": "dir", "path": args.kv_store_dir}, None
    import tempfile

    tmp = tempfile.mkdtemp(prefix="openinfra-kv-")
    return {"kind": "dir", "path": tmp}, tmp


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (a message naming the flag), checked before the model is built."""
    import math

    if not 0 <= args.port <= 65535:
        return f"--port: expected 0..65535 (0: any free port), got {args.port}"
    if not (args.duration >= 0 and math.isfinite(args.duration)):
        return f"--duration: expected seconds >= 0 (0: run until Ctrl-C), got {args.duration}"
    if problem := not_a_directory("--checkpoint", args.checkpoint):
        return f"{problem} (give the directory of the safetensors files)"
    if not args.disaggregated:
        for flag, value in (("--kvcache-mgmtd", args.kvcache_mgmtd), ("--kv-store-dir", args.kv_store_dir)):
            if value:
                return f"{flag} is for --disaggregated serving; add --disaggregated or leave {flag} out"
    if args.kvcache_mgmtd and args.kv_store_dir:
        return "--kvcache-mgmtd and --kv-store-dir both name the KV store; give one"
    return not_a_directory("--kv-store-dir", args.kv_store_dir) or _cannot_listen(args.host, args.port)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the HTTP server could not listen on ``host:port`` (taken, not this machine's address), found
    before the model is built; bound as ``http.server`` binds (IPv4, SO_REUSEADDR) and let go at once."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _run(args: argparse.Namespace) -> int:
    if problem := _check(args):  # before the imports below: they load PyTorch
        print(f"openinfra serve: error: {problem}", file=sys.stderr)
        return 2
    import shutil

    from openinfra.serving.http_server import CompletionServer

    front, tmp = None, None
    try:
        if args.disaggregated:
            from openinfra.serving.disaggregated import DisaggregatedServer

            store, tmp = _store_spec(args)
            if store["kind"] == "3fs":
                print(f"connecting to 3FS mgmtd {args.kvcache_mgmtd} for the KV store (retried for up to a minute)",
                      file=sys.stderr, flush=True)
            worker_threads = 0
            if args.device == "cpu":
                # Two processes each running torch's default of one thread per core oversubscribe the
                # CPU (spin-waiting threads: 15x slower decode measured on 2 cores); split the cores.
                import os

                import torch

                worker_threads = max(1, (os.cpu_count() or 2) // 2)
                torch.set_num_threads(worker_threads)
            front = DisaggregatedServer(store, config=args.config, checkpoint=args.checkpoint, device=args.device,
                                        num_blocks=args.num_blocks, page_size=args.page_size, max_batch=args.max_batch,
                                        auto_restart=True, worker_threads=worker_threads).start()
            engine = front
        else:
            engine = build_engine(args.config, args.checkpoint, args.num_blocks, args.page_size, args.max_batch, args.device)
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: the KV store or the prefill worker
        print(f"openinfra serve: error: {exc}", file=sys.stderr)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        return 2
    try:
        server = CompletionServer(engine, args.host, args.port, model_name=f"openinfra-{args.config}").start()
    except OSError as exc:  # the port is taken, the host is not an address of this machine
        print(f"openinfra serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        if front is not None:
            front.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        return 2
    mode = f" (disaggregated: prefill worker pid {front.worker.pid}, KV store {front.store_spec})" if front else ""
    print(f"serving on {server.url}/v1/completions{mode} (Ctrl-C to stop)", flush=True)
    try:
        deadline = time.monotonic() + args.duration if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if front is not None:
            front.stop()
            s = front.stats
            print(f"prefill {s.prefill_input_tokens_per_s:,.0f} input tokens/s (prefix hit rate {s.prefix_hit_rate:.1%}), "
                  f"decode {s.decode_output_tokens_per_s:,.0f} output tokens/s, {s.fallback_prefills} fallback prefills, "
                  f"{s.failed_requests} failed requests", flush=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-style HTTP endpoint (completions, streaming)")
    p.add_argument("--config", default="tiny", help="model config when no checkpoint is given (default tiny)")
    p.add_argument("--checkpoint", default=None, help="directory of DeepSeek-V3-named safetensors")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-blocks", type=int, default=64, help="pages in the paged KV cache")
    p.add_argument("--page-size", type=int, default=64, help="tokens per page")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until Ctrl-C)")
    p.add_argument("--disaggregated", action="store_true",
                   help="prefill in a separate worker process, decode here; KV goes through a shared store")
    p.add_argument("--kvcache-mgmtd", default=None,
                   help="with --disaggregated: 3FS mgmtd address; the KV store is 3FS KVCache under --kvcache-root")
    p.add_argument("--kvcache-root", default="/kvcache/serve", help="3FS directory of the KV blocks")
    p.add_argument("--kv-store-dir", default=None,
                   help="with --disaggregated and no 3FS: a local directory as the KV store (default: a temporary one)")
    p.set_defaults(func=_run)
