"""Prefill/decode disaggregation: a prefill worker process and a decode engine sharing a KV store.

In the style of the DeepSeek-V3/R1 inference overview, prefill and decode run on separate engines
and the prompt's KV moves between them through the KV store (3FS KVCache in a cluster, a shared
directory on one machine)::

    client --submit--> DisaggregatedServer --frame--> prefill worker (own process, own model copy)
                            |                             | reads reused prefix pages, computes the
                            |                             | rest, writes every prompt page
                            |  <--{first_token, keys}--   v
                            |                         KV store (3FS KVCache)
                            v                             |
                       decode Engine <--pages by key------+   (no prompt compute; continuous batch)

:class:`DisaggregatedServer` has the engine interface the HTTP server drives (``submit``,
``step``, ``has_work``, ``stats``, ``cfg``), plus ``pop_failed`` for requests that failed in
prefill. A dispatcher thread sends prompts to the worker one at a time while ``step`` keeps
decoding; every wait is bounded (worker start, each prefill reply, shutdown). If the worker dies,
the request in flight and every queued one fail with an error naming the worker's pid and exit
status; :meth:`DisaggregatedServer.restart_prefill` starts a new one (or ``auto_restart=True``
does it on the next submit).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from openinfra.serving.engine import Engine, EngineStats, Prefilled, Request
from openinfra.serving.prefill_worker import model_fingerprint
from openinfra.serving.prefix_cache import open_block_store
from openinfra.serving.protocol import ProtocolError, recv_frame, send_frame, validate_prefill_reply

__all__ = ["DisaggregatedServer", "DisaggregatedStats", "PrefillWorkerProcess", "PrefillWorkerError"]


class PrefillWorkerError(RuntimeError):
    """The prefill worker could not be started, died, or did not answer in time."""


class PrefillWorkerProcess:
    """One prefill worker process and the front's connection to it.

    ``start`` launches ``python -m openinfra.serving.prefill_worker`` and waits (at most
    ``start_timeout_s`` seconds) for its ready line; ``call`` sends one frame and waits at most
    ``timeout_s`` seconds for the reply. The worker's stderr goes to a temporary log whose tail is
    quoted in errors.
    """

    def __init__(self, args: list[str], start_timeout_s: float = 120.0):
        self.args = args
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.info: dict = {}
        self._log = tempfile.NamedTemporaryFile(prefix="prefill-worker-", suffix=".log", delete=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> dict:
        """Launch the worker and connect; returns its ready line (port, pid, page_size, fingerprint)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "openinfra.serving.prefill_worker", *self.args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        line = self._read_ready_line()
        try:
            info = json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise PrefillWorkerError(f"prefill worker pid {self.pid} printed {line[:200]!r} instead of its ready line"
                                     f"{self._log_tail()}") from None
        if not info.get("ready"):
            self.kill()
            raise PrefillWorkerError(f"prefill worker pid {self.pid} failed to start: {info.get('error')}{self._log_tail()}")
        self.info = info
        self.sock = socket.create_connection(("127.0.0.1", info["port"]), timeout=self.start_timeout_s)
        return info

    def _read_ready_line(self) -> str:
        deadline = time.monotonic() + self.start_timeout_s
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:  # bounded by start_timeout_s
                if sel.select(timeout=0.2):
                    line = self.proc.stdout.readline().decode(errors="replace").strip()
                    if line:
                        return line
                if self.proc.poll() is not None:
                    raise PrefillWorkerError(f"prefill worker pid {self.pid} exited with status {self.proc.returncode} "
                                             f"before it was ready{self._log_tail()}")
            self.kill()
            raise PrefillWorkerError(f"prefill worker pid {self.pid} not ready within {self.start_timeout_s:g} s"
                                     f"{self._log_tail()}")
        finally:
            sel.close()

    def call(self, msg: dict, timeout_s: float) -> dict:
        """Send ``msg`` and return the reply; PrefillWorkerError (naming pid and exit status) when
        the worker is gone, closes the connection, or does not answer within ``timeout_s``."""
        if self.sock is None:
            raise PrefillWorkerError("prefill worker is not started")
        try:
            self.sock.settimeout(timeout_s)
            send_frame(self.sock, msg)
            reply = recv_frame(self.sock, timeout_s)
            if reply is None:
                raise ConnectionError("connection closed")
            return reply
        except TimeoutError:
            raise PrefillWorkerError(f"prefill worker pid {self.pid} gave no reply within {timeout_s:g} s") from None
        except (OSError, ConnectionError, ProtocolError) as exc:
            raise PrefillWorkerError(f"prefill worker pid {self.pid} {self.describe_exit()} ({exc})") from None

    def describe_exit(self, wait_s: float = 1.0) -> str:
        """'exited with status N' / 'was killed by signal N' / 'closed the connection' (still running)."""
        if self.proc is None:
            return "was never started"
        try:  # a dead worker's connection drops a moment before the process is reaped
            code = self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return "closed the connection but is still running"
        return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, grace_s: float = 5.0) -> None:
        """Stop the worker: SIGTERM, then SIGKILL after ``grace_s`` seconds; close the connection."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def close(self) -> None:
        self.kill()
        self._log.close()
        try:
            os.unlink(self._log.name)
        except FileNotFoundError:
            pass

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self._log.name, "rb") as f:
                f.seek(max(0, os.path.getsize(self._log.name) - n))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its stderr ends with:\n{tail}" if tail else ""


@dataclass
class DisaggregatedStats:
    """The front's totals. Prefill times are measured in the worker (wall seconds of each prefill,
    store reads and writes included); decode is the decode engine's :class:`EngineStats`."""

    prefill_requests: int = 0
    prefill_prompt_tokens: int = 0
    prefill_reused_tokens: int = 0
    prefill_seconds: float = 0.0
    failed_requests: int = 0
    worker_restarts: int = 0
    decode: EngineStats | None = None

    @property
    def prefill_input_tokens_per_s(self) -> float:
        """Prompt tokens (prefix-cache hits included, as the overview counts input) per prefill second."""
        return self.prefill_prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def prefill_computed_tokens_per_s(self) -> float:
        """Prompt tokens the worker computed (hits excluded) per prefill second."""
        computed = self.prefill_prompt_tokens - self.prefill_reused_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens whose KV the worker read from the store instead of computing."""
        return self.prefill_reused_tokens / self.prefill_prompt_tokens if self.prefill_prompt_tokens else 0.0

    @property
    def decode_output_tokens_per_s(self) -> float:
        return self.decode.decode_tokens_per_s if self.decode else 0.0

    @property
    def fallback_prefills(self) -> int:
        return self.decode.fallback_prefills if self.decode else 0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "decode"}
        d.update(prefill_input_tokens_per_s=self.prefill_input_tokens_per_s,
                 prefill_computed_tokens_per_s=self.prefill_computed_tokens_per_s,
                 prefix_hit_rate=self.prefix_hit_rate, decode_output_tokens_per_s=self.decode_output_tokens_per_s,
                 fallback_prefills=self.fallback_prefills, decode=self.decode.to_dict() if self.decode else None)
        return d


class DisaggregatedServer:
    """A decode engine in this process fed by a prefill worker process through a shared KV store.

    Args:
        store: block store spec shared by both processes (:func:`~openinfra.serving.prefix_cache.open_block_store`):
            ``{"kind": "3fs", "mgmtd": ..., "root": ...}`` or ``{"kind": "dir", "path": ...}``.
        config, checkpoint, seed, device: the model, built the same way in both processes
            (:func:`~openinfra.serving.cli.build_model`); their weights are compared at start.
        num_blocks, page_size, max_batch: the decode engine's cache and batch (see :class:`Engine`).
        prefill_timeout_s: most seconds to wait for one prefill reply.
        start_timeout_s: most seconds to wait for a worker to start (model build included).
        worker_threads: torch threads in the worker (0: torch's default, one per core). On a CPU
            shared by both processes give each about half the cores (``torch.set_num_threads`` here):
            both at the default oversubscribe it and decode ran 15x slower on 2 cores.
        auto_restart: start a new worker on the next ``submit`` after one died (else submits raise
            until :meth:`restart_prefill`).
        idle_wait_s: seconds ``step`` waits for a prefill result when the decode engine is idle.
    """

    def __init__(self, store: dict, *, config: str = "tiny", checkpoint: str | None = None, seed: int = 0,
                 device: str = "cpu", num_blocks: int = 64, page_size: int = 64, max_batch: int = 8,
                 prefill_timeout_s: float = 120.0, start_timeout_s: float = 120.0, worker_threads: int = 0,
                 auto_restart: bool = False, idle_wait_s: float = 0.005):
        from openinfra.serving.cli import build_model

        if not isinstance(store, dict) or store.get("kind") not in ("3fs", "dir"):
            raise ValueError(f"store must be a spec of a store both processes can open (kind '3fs' or 'dir'), got {store!r}")
        for name, v in (("prefill_timeout_s", prefill_timeout_s), ("start_timeout_s", start_timeout_s)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        self.store_spec = store
        self.engine = Engine(build_model(config, checkpoint, device, seed), num_blocks=num_blocks, page_size=page_size,
                             max_batch=max_batch, block_store=open_block_store(store), seed=seed)
        self.cfg = self.engine.cfg
        self.fingerprint = model_fingerprint(self.engine.model)
        self._worker_args = ["--config", config, "--seed", str(seed), "--device", device, "--page-size", str(page_size),
                             "--store", json.dumps(store), "--threads", str(worker_threads)]
        if checkpoint:
            self._worker_args += ["--checkpoint", checkpoint]
        self.prefill_timeout_s, self.start_timeout_s = prefill_timeout_s, start_timeout_s
        self.auto_restart, self.idle_wait_s = auto_restart, idle_wait_s
        self.stats = DisaggregatedStats(decode=self.engine.stats)
        self.worker: PrefillWorkerProcess | None = None
        self.worker_error: str | None = None  # why the last worker is unusable (None while it serves)
        self._outbox: queue.Queue = queue.Queue()  # (request, worker) to prefill, or None to stop
        self._results: queue.Queue = queue.Queue()  # (request, reply dict | None, error | None)
        self._pending: dict[str, Request] = {}  # submitted, not yet handed to the decode engine
        self._failed: list[Request] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._dispatcher: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "DisaggregatedServer":
        """Start the prefill worker (bounded by ``start_timeout_s``) and the dispatcher thread."""
        self._start_worker()
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="prefill-dispatch")
        self._dispatcher.start()
        return self

    def _start_worker(self) -> None:
        worker = PrefillWorkerProcess(self._worker_args, self.start_timeout_s)
        try:
            info = worker.start()
            if info.get("fingerprint") != self.fingerprint or info.get("page_size") != self.engine.page_size:
                raise PrefillWorkerError(f"prefill worker pid {worker.pid} has model {info.get('fingerprint')} and "
                                         f"page_size {info.get('page_size')}; the decode engine has {self.fingerprint} "
                                         f"and {self.engine.page_size} (its KV would decode into garbage)")
        except BaseException:
            worker.close()
            raise
        with self._lock:
            self.worker, self.worker_error = worker, None

    def restart_prefill(self) -> None:
        """Replace the prefill worker with a fresh process (requests in flight on the old one fail)."""
        with self._lock:
            old, self.worker = self.worker, None
            self.worker_error = "prefill worker is restarting"
        if old is not None:
            old.close()
        try:
            self._start_worker()
        except Exception as exc:
            self.worker_error = f"prefill worker restart failed: {exc}"
            raise
        self.stats.worker_restarts += 1

    def stop(self) -> None:
        """Stop the worker and the dispatcher; requests not yet decoded fail with 'server stopped'.
        The block store this server opened is closed: a stopped server is not started again."""
        with self._lock:
            worker, self.worker = self.worker, None
            self.worker_error = "server stopped"
        self._outbox.put(None)
        if worker is not None:
            worker.close()  # a prefill in flight fails at once instead of running to the end
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=self.prefill_timeout_s + 5)
        self._drain_results(0.0)
        with self._lock:
            for req in list(self._pending.values()):
                self._fail(req, "server stopped before the request was prefilled")
        close = getattr(self.engine.block_store, "close", None)  # (a "dir" store holds nothing open)
        if close is not None:
            close()

    def __enter__(self) -> "DisaggregatedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- requests (the Engine interface the HTTP server drives) ----------------------------------

    def submit(self, prompt: list[int], max_tokens: int = 16, temperature: float = 0.0,
               stop_tokens: tuple[int, ...] | frozenset[int] = (), request_id: str | None = None) -> Request:
        """Validate and queue a request for the prefill worker; returns at once. Raises ValueError for
        bad input, PrefillWorkerError when no worker serves (and ``auto_restart`` is off)."""
        req = self.engine.new_request(prompt, max_tokens, temperature, stop_tokens,
                                      request_id or f"dreq-{next(self._ids)}")
        with self._lock:
            if self.worker is not None and self.worker_error is None and not self.worker.alive():
                # Died while idle: notice now, rather than when this request's send fails.
                self.worker_error = f"prefill worker pid {self.worker.pid} {self.worker.describe_exit(0.0)}"
        if self.worker_error is not None and self.auto_restart:
            self.restart_prefill()
        with self._lock:
            if self.worker is None or self.worker_error is not None:
                raise PrefillWorkerError(f"no prefill worker serves: {self.worker_error or 'not started'}; "
                                         "call restart_prefill() (or start())")
            if req.id in self._pending:
                raise ValueError(f"request id {req.id!r} is already pending")
            self._pending[req.id] = req
            self._outbox.put((req, self.worker))
        return req

    def has_work(self) -> bool:
        return bool(self._pending) or self.engine.has_work()

    def step(self) -> list[tuple[Request, int]]:
        """Hand finished prefills to the decode engine, then one decode step (when it has work;
        otherwise wait up to ``idle_wait_s`` seconds for a prefill, so an idle loop does not spin)."""
        self._drain_results(0.0 if self.engine.has_work() else self.idle_wait_s)
        return self.engine.step() if self.engine.has_work() else []

    def pop_failed(self) -> list[Request]:
        """Requests that failed since the last call (``finish_reason == "error"``, ``error`` says why)."""
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def run(self, timeout_s: float = 600.0) -> None:
        """Step until every submitted request finished or failed (at most ``timeout_s`` seconds)."""
        deadline = time.monotonic() + timeout_s
        while self.has_work():
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still running after {timeout_s:g} s")
            self.step()

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, temperature: float = 0.0,
                 timeout_s: float = 600.0) -> list[list[int]]:
        """Submit ``prompts``, run to completion, return each one's output tokens; raises
        PrefillWorkerError naming the failed requests if any failed."""
        reqs = [self.submit(p, max_tokens, temperature) for p in prompts]
        self.run(timeout_s)
        failed = [r for r in reqs if r.error is not None]
        if failed:
            raise PrefillWorkerError("; ".join(f"{r.id}: {r.error}" for r in failed))
        return [r.output for r in reqs]

    # --- internals -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """The dispatcher thread: one prefill at a time on the worker the request was queued for."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            req, worker = item
            if worker is not self.worker or self.worker_error is not None:  # it died, was replaced or stopped
                self._results.put((req, None, self.worker_error or "the prefill worker was replaced"))
                continue
            msg = {"op": "prefill", "id": req.id, "prompt": req.prompt, "temperature": req.temperature}
            try:
                reply = worker.call(msg, self.prefill_timeout_s)
                reply = validate_prefill_reply(reply, req.id, len(req.prompt), self.engine.page_size)
            except ProtocolError as exc:  # the worker refused this request: it still serves
                self._results.put((req, None, str(exc)))
                continue
            except PrefillWorkerError as exc:
                # The connection is unusable (dead, hung or out of step): retire this worker so the
                # requests queued behind it fail at once instead of each waiting out a timeout.
                with self._lock:
                    if self.worker is worker:
                        self.worker_error = str(exc)
                worker.kill(grace_s=1.0)
                self._results.put((req, None, f"{exc} while prefilling request {req.id!r}"))
                continue
            except Exception as exc:  # fail this request, never the dispatcher thread (its waiters would hang)
                self._results.put((req, None, f"prefill dispatch failed: {type(exc).__name__}: {exc}"))
                continue
            self._results.put((req, reply, None))

    def _drain_results(self, wait_s: float) -> None:
        try:
            item = self._results.get(timeout=wait_s) if wait_s > 0 else self._results.get_nowait()
        except queue.Empty:
            return
        while True:  # bounded: the queue holds at most one result per pending request
            req, reply, error = item
            with self._lock:
                self._pending.pop(req.id, None)
                if error is not None:
                    self._fail(req, error)
                else:
                    self._hand_to_decode(req, reply)
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return

    def _hand_to_decode(self, req: Request, reply: dict) -> None:
        self.stats.prefill_requests += 1
        self.stats.prefill_prompt_tokens += reply["n_prompt_tokens"]
        self.stats.prefill_reused_tokens += reply["reused_tokens"]
        self.stats.prefill_seconds += reply["prefill_s"]
        req.reused_tokens = reply["reused_tokens"]
        try:
            self.engine.submit_prefilled(req, Prefilled(reply["first_token"], tuple(reply["keys"]), reply["partial"]))
        except ValueError as exc:
            self._fail(req, f"prefill reply does not fit the decode engine: {exc}")

    def _fail(self, req: Request, error: str) -> None:
        self._pending.pop(req.id, None)
        req.error, req.finish_reason, req.finished_at = error, "error", time.perf_counter()
        self._failed.append(req)
        self.stats.failed_requests += 1
