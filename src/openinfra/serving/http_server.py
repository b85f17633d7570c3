"""An OpenAI-style HTTP endpoint over the :class:`~openinfra.serving.engine.Engine`.

Routes: ``POST /v1/completions`` (``prompt`` as text or token ids, ``max_tokens``, ``temperature``,
``stream`` for server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (the
engine's totals as JSON). One background thread drives the engine; HTTP threads submit requests and
wait for their tokens, so requests that arrive together are decoded together (continuous batching).
Malformed requests get a 400 with a JSON error naming the problem; the server keeps serving.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openinfra.serving.engine import Engine, Request
from openinfra.serving.tokenizer import ByteTokenizer

__all__ = ["CompletionServer"]

_MAX_BODY = 1 << 20


class _EngineLoop(threading.Thread):
    """Owns the engine: steps it, and hands each request's tokens to its waiter (a queue).

    A request's waiter is registered under the same lock as its submission, and the loop steps
    and delivers under that lock too: whatever the engine emits or reports failed for a request
    always finds its waiter (a request registered after its submission could emit its first
    token, or fail, in between and lose it; a one-token request would then never be answered)."""

    def __init__(self, engine: Engine):
        super().__init__(daemon=True, name="engine-loop")
        self.engine = engine
        self.waiters: dict[str, queue.Queue] = {}
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def submit(self, prompt: list[int], max_tokens: int, temperature: float, stop: tuple[int, ...]) -> tuple[Request, queue.Queue]:
        out: queue.Queue = queue.Queue()
        with self.lock:  # validation errors surface in the HTTP thread
            req = self.engine.submit(prompt, max_tokens, temperature, stop)
            self.waiters[req.id] = out
        self.wakeup.set()
        return req, out

    def run(self) -> None:
        waiters = self.waiters
        while not self.stopping.is_set():
            with self.lock:
                busy = self.engine.has_work()
            if not busy:
                self.wakeup.wait(0.01)  # a submission wakes the loop at once; the timeout sees stop()
                self.wakeup.clear()
                continue
            with self.lock:
                try:
                    emitted = self.engine.step()
                except Exception as exc:  # report to every waiter rather than dying silently
                    for w in waiters.values():
                        w.put(("error", str(exc)))
                    waiters.clear()
                    continue
                # A disaggregated front also reports requests that failed before decoding (prefill errors).
                for req in getattr(self.engine, "pop_failed", list)():
                    w = waiters.pop(req.id, None)
                    if w is not None:
                        w.put(("error", req.error or "request failed"))
                for req, token in emitted:
                    w = waiters.get(req.id)
                    if w is not None:
                        w.put(("token", token))
                        if req.finished:
                            w.put(("done", req))
                            del waiters[req.id]


class CompletionServer:
    """``CompletionServer(engine, host, port).start()``; ``.url``; ``.stop()``."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "openinfra-tiny",
                 tokenizer: ByteTokenizer | None = None):
        self.loop = _EngineLoop(engine)
        self.tokenizer = tokenizer or ByteTokenizer()
        self.model_name = model_name
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="http")

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "CompletionServer":
        self.loop.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.stopping.set()
        self.loop.join(timeout=5)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: metrics carry what matters
                pass

            def _json(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str) -> None:
                kind = "invalid_request_error" if status < 500 else "server_error"
                self._json(status, {"error": {"message": message, "type": kind}})

            def do_GET(self):
                if self.path == "/health":
                    self._json(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                elif self.path == "/metrics":
                    self._json(200, server.loop.engine.stats.to_dict())
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self):
                if self.path != "/v1/completions":
                    self._error(404, f"no route {self.path}")
                    return
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    self._error(400, "Content-Length must be an integer")
                    return
                if length <= 0 or length > _MAX_BODY:
                    self._error(400 if length <= 0 else 413, f"body must be 1..{_MAX_BODY} bytes, got {length}")
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                    if not isinstance(body, dict):
                        raise ValueError("body must be a JSON object")
                    prompt = body.get("prompt")
                    if isinstance(prompt, str):
                        ids = server.tokenizer.encode(prompt)
                    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                        ids = prompt
                    else:
                        raise ValueError("prompt must be a string or a list of token ids")
                    max_tokens = body.get("max_tokens", 16)
                    temperature = float(body.get("temperature", 0.0))
                    stream = bool(body.get("stream", False))
                    req, out = server.loop.submit(ids, max_tokens, temperature, (server.tokenizer.EOS,))
                except (ValueError, TypeError) as exc:
                    self._error(400, str(exc))
                    return
                except RuntimeError as exc:  # the engine takes no requests now (a front without its prefill worker)
                    self._error(503, str(exc))
                    return
                created = int(time.time())
                cid = f"cmpl-{uuid.uuid4().hex[:12]}"
                if stream:
                    self._stream(out, cid, created)
                else:
                    self._complete(out, cid, created, len(ids))

            def _complete(self, out, cid, created, n_prompt):
                tokens = []
                while True:
                    kind, value = out.get(timeout=600)
                    if kind == "error":
                        self._error(500, value)
                        return
                    if kind == "token":
                        tokens.append(value)
                    else:
                        req: Request = value
                        break
                self._json(200, {
                    "id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": [{"index": 0, "text": server.tokenizer.decode(tokens), "token_ids": tokens,
                                 "finish_reason": req.finish_reason}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                              "total_tokens": n_prompt + len(tokens)},
                    "metrics": {"ttft_s": req.ttft_s, "decode_tokens_per_s": req.decode_tokens_per_s,
                                "reused_prompt_tokens": req.reused_tokens},
                })

            def _stream(self, out, cid, created):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: str) -> None:
                    raw = data.encode()
                    self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                    self.wfile.flush()

                while True:
                    kind, value = out.get(timeout=600)
                    if kind == "token":
                        event = {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                                 "choices": [{"index": 0, "text": server.tokenizer.decode([value]), "token_ids": [value],
                                              "finish_reason": None}]}
                        chunk(f"data: {json.dumps(event)}\n\n")
                    elif kind == "done":
                        event = {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                                 "choices": [{"index": 0, "text": "", "finish_reason": value.finish_reason}]}
                        chunk(f"data: {json.dumps(event)}\n\n")
                        break
                    else:
                        chunk(f"data: {json.dumps({'error': value})}\n\n")
                        break
                chunk("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler
