"""The prefill worker: a separate process that prefills prompts and leaves their KV in the block store.

Started by :class:`~openinfra.serving.disaggregated.DisaggregatedServer` as
``python -m openinfra.serving.prefill_worker --store '{"kind": "3fs", ...}' ...``; it builds its own
copy of the model (same config + seed, or the same checkpoint, as the decode side), listens on
loopback TCP and prints one JSON line on stdout when ready::

    {"ready": true, "port": 40123, "pid": 4242, "page_size": 64, "fingerprint": "..."}

Each ``prefill`` request (see :mod:`openinfra.serving.protocol`) runs
:meth:`Engine.prefill_export`: prompt pages already in the store are read (prefix reuse), the rest
are computed, every full page is written under its shared prefix key and the last partial page
under a request-specific key. One prefill runs at a time (a lock around the engine); each
connection has its own thread so a stalled or malformed client never blocks the others. The worker
exits when its parent process goes away.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid

import torch

from openinfra.serving.engine import Engine
from openinfra.serving.protocol import FrameTooLarge, ProtocolError, recv_frame, send_frame, validate_prefill

__all__ = ["PrefillWorker", "model_fingerprint", "main"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of the model's weights (names, shapes, float64 sums), so the front can refuse a
    worker whose model differs from the decode side's (its KV would decode into garbage)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e};".encode())
    return h.hexdigest()[:16]


class PrefillWorker:
    """Serves ``engine.prefill_export`` over TCP on ``host:port`` (0: any free port).

    Args:
        engine: an engine with a block store shared with the decode side.
        max_connections: connections served at once; more are answered with an error and closed.
        body_timeout_s: seconds a client may stall in the middle of a frame before it is dropped.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, max_connections: int = 8,
                 body_timeout_s: float = 30.0):
        if engine.block_store is None:
            raise ValueError("the prefill worker's engine needs a block_store shared with the decode side")
        self.engine = engine
        self.max_prompt = engine.cfg.max_seq_len - 1  # the decode side needs room for >= 1 output token
        self.body_timeout_s = body_timeout_s
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock = socket.create_server((host, port))
        self.port = self._sock.getsockname()[1]

    def handle(self, msg: dict) -> dict:
        """The reply to one decoded frame (never raises for bad input: the reply names it)."""
        op = msg.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op != "prefill":
            return {"ok": False, "id": None, "error": f"unknown op {op!r} (expected 'prefill' or 'ping')"}
        rid = msg.get("id") if isinstance(msg.get("id"), str) else None
        try:
            rid, prompt, temperature = validate_prefill(msg, self.engine.cfg.vocab_size, self.max_prompt)
            with self._lock:
                out = self.engine.prefill_export(prompt, temperature, nonce=uuid.uuid4().bytes)
        except (ProtocolError, ValueError) as exc:
            return {"ok": False, "id": rid, "error": str(exc)}
        except Exception as exc:  # a store or model failure: report it, keep serving
            return {"ok": False, "id": rid, "error": f"prefill failed: {type(exc).__name__}: {exc}"}
        p = out.prefilled
        return {"ok": True, "id": rid, "first_token": p.first_token, "n_prompt_tokens": out.n_prompt_tokens,
                "keys": [k.hex() for k in p.keys], "partial": p.partial, "reused_tokens": out.reused_tokens,
                "prefill_s": out.seconds}

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            while True:
                conn.settimeout(None)  # between frames a client may idle (the front keeps one connection)
                try:
                    msg = recv_frame(conn, self.body_timeout_s)
                except FrameTooLarge as exc:
                    self._try_send(conn, {"ok": False, "id": None, "error": str(exc)})
                    return  # the stream cannot be resynchronized after a bad length
                except ProtocolError as exc:
                    if not self._try_send(conn, {"ok": False, "id": None, "error": str(exc)}):
                        return
                    continue
                except (OSError, ConnectionError):
                    return  # closed or stalled mid-frame
                if msg is None:
                    return
                conn.settimeout(self.body_timeout_s)
                if not self._try_send(conn, self.handle(msg)):
                    return

    @staticmethod
    def _try_send(conn: socket.socket, reply: dict) -> bool:
        try:
            send_frame(conn, reply)
            return True
        except OSError:
            return False

    def _run_connection(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        finally:
            self._slots.release()

    def serve_forever(self) -> None:
        while True:
            conn, _ = self._sock.accept()
            if not self._slots.acquire(blocking=False):
                self._try_send(conn, {"ok": False, "id": None, "error": "too many connections to the prefill worker"})
                conn.close()
                continue
            threading.Thread(target=self._run_connection, args=(conn,), daemon=True, name="prefill-conn").start()


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Exit when the process that started us is gone (re-parented), so no worker outlives its front."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    from openinfra.serving.cli import build_model
    from openinfra.serving.prefix_cache import open_block_store

    p = argparse.ArgumentParser(prog="python -m openinfra.serving.prefill_worker", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--seed", type=int, default=0, help="weights seed when no checkpoint (and sampling seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--store", required=True, help="block store spec as JSON (see prefix_cache.open_block_store)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        model = build_model(args.config, args.checkpoint, args.device, args.seed)
        pages = -(-model.cfg.max_seq_len // args.page_size)  # room for the longest prompt
        engine = Engine(model, num_blocks=pages, page_size=args.page_size, max_batch=1,
                        block_store=open_block_store(json.loads(args.store)), seed=args.seed)
        worker = PrefillWorker(engine, args.host, args.port)
    except Exception as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(json.dumps({"ready": True, "port": worker.port, "pid": os.getpid(), "page_size": args.page_size,
                      "fingerprint": model_fingerprint(model)}), flush=True)
    # Nobody reads our stdout after the ready line: send anything printed later to stderr (the
    # front's log file) rather than let it fill the pipe and block the worker.
    os.dup2(2, 1)
    worker.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
