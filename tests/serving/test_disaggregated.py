"""Prefill/decode disaggregation with real processes on loopback: a prefill worker process, the
decode engine in the test process, KV through a shared store (a directory, and 3FS KVCache)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from openinfra.serving.cli import build_engine, build_model
from openinfra.serving.disaggregated import DisaggregatedServer, PrefillWorkerError
from openinfra.serving.engine import Engine, Prefilled
from openinfra.serving.http_server import CompletionServer
from openinfra.serving.prefix_cache import FileBlockStore, page_keys
from openinfra.serving.protocol import MAX_FRAME, recv_frame, send_frame, validate_prefill_reply

pytestmark = pytest.mark.service

# Short bounds: a hang fails the test in seconds, not at pytest's 300 s timeout.
_BOUNDS = dict(prefill_timeout_s=30.0, start_timeout_s=60.0, worker_threads=1)


def _prompts(page_size: int) -> list[list[int]]:
    """Shorter than a page, exactly a page, a shared prefix of 1.5 pages with different tails
    (the later ones reuse its full page), and one over two pages with a partial last page."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (page_size + page_size // 2,), generator=g).tolist()
    return [[7, 8, 9, 10, 11], torch.randint(0, 256, (page_size,), generator=g).tolist(),
            shared + [5, 6], shared + [9], torch.randint(0, 256, (2 * page_size + 3,), generator=g).tolist(), shared]


def _reference(prompts, page_size, max_tokens):
    """The single-process engine's greedy outputs (same model build, in-memory prefix store)."""
    return build_engine("tiny", page_size=page_size, num_blocks=32, max_batch=4).generate(prompts, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kvstore"))


@pytest.fixture(scope="module")
def server(store_dir):
    """A front with 64-token pages over a directory store, its worker started once for the module."""
    with DisaggregatedServer({"kind": "dir", "path": store_dir}, page_size=64, num_blocks=32, max_batch=4,
                             **_BOUNDS) as s:
        yield s


def test_outputs_equal_the_single_process_engine(server):
    prompts = _prompts(64)
    before = server.stats.to_dict()
    assert server.generate(prompts, max_tokens=6) == _reference(prompts, 64, 6)
    s = server.stats
    assert s.prefill_requests - before["prefill_requests"] == len(prompts)
    assert s.prefill_reused_tokens - before["prefill_reused_tokens"] >= 2 * 64  # later users of the shared prefix
    assert 0 < s.prefix_hit_rate < 1 and s.prefill_input_tokens_per_s > s.prefill_computed_tokens_per_s > 0
    assert s.decode.prefill_tokens == 0 and s.fallback_prefills == 0  # decode computed no prompt token
    assert s.decode.loaded_tokens >= sum(map(len, prompts)) and s.decode_output_tokens_per_s > 0
    assert server.engine.cache.allocator.num_free == 32
    # Request-specific partial pages are deleted once loaded; the shared full pages stay.
    assert len(os.listdir(server.store_spec["path"])) == len({k for p in prompts for k in page_keys(p, 64)})



def test_http_endpoint_over_the_disaggregated_front(server):
    http = CompletionServer(server, "127.0.0.1", 0).start()
    try:
        req = urllib.request.Request(http.url + "/v1/completions", data=json.dumps({"prompt": [7, 8, 9], "max_tokens": 4}).encode(),
                                     headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert body["choices"][0]["token_ids"] == _reference([[7, 8, 9]], 64, 4)[0]
        metrics = json.loads(urllib.request.urlopen(http.url + "/metrics", timeout=30).read())
        assert metrics["prefill_requests"] >= 1 and "prefill_input_tokens_per_s" in metrics
    finally:
        http.stop()


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.settimeout(30)
    return s


def test_malformed_frames_get_errors_and_the_worker_keeps_serving(server):
    port = server.worker.info["port"]
    with _raw(port) as s:
        s.sendall(struct.pack(">I", 9) + b"{not json")
        assert "JSON" in recv_frame(s)["error"]
        s.sendall(struct.pack(">I", 2) + b"[]")
        assert "object" in recv_frame(s)["error"]
        for msg, word in [({"op": "bogus"}, "unknown op"), ({"op": "prefill", "id": "x", "prompt": [1, 10**6]}, "prompt"),
                          ({"op": "prefill", "id": "", "prompt": [1]}, "id"), ({"op": "prefill", "id": "x", "prompt": []}, "prompt"),
                          ({"op": "prefill", "id": "x", "prompt": [1] * 300}, "prompt"),
                          ({"op": "prefill", "id": "x", "prompt": [1], "temperature": "hot"}, "temperature")]:
            send_frame(s, msg)
            reply = recv_frame(s)
            assert reply["ok"] is False and word in reply["error"], (msg, reply)
        send_frame(s, {"op": "ping"})
        assert recv_frame(s) == {"ok": True, "pid": server.worker.pid}  # same connection still in step
    with _raw(port) as s:
        s.sendall(struct.pack(">I", MAX_FRAME + 1))  # a length the worker must not trust
        assert "outside" in recv_frame(s)["error"]
        assert s.recv(1) == b""  # then it closes this connection: the stream cannot be resynchronized
    with _raw(port) as s:
        s.sendall(struct.pack(">I", 0))
        assert "outside" in recv_frame(s)["error"]
    assert server.generate([[1, 2, 3]], max_tokens=2) == _reference([[1, 2, 3]], 64, 2)  # still serving


def test_missing_page_falls_back_to_local_prefill(server, store_dir):
    prompt = _prompts(64)[4]  # two full pages and a partial one
    reply = server.worker.call({"op": "prefill", "id": "evict-me", "prompt": prompt}, 30)
    reply = validate_prefill_reply(reply, "evict-me", len(prompt), 64)
    assert len(reply["keys"]) == 3 and reply["partial"]
    store = FileBlockStore(store_dir)
    decode = Engine(build_model("tiny"), num_blocks=16, page_size=64, max_batch=2, block_store=store)
    assert store.delete(reply["keys"][1])  # evicted between prefill and decode
    req = decode.submit_prefilled(decode.new_request(prompt, 5), Prefilled(reply["first_token"], tuple(reply["keys"]), True))
    decode.run(max_steps=50)
    assert req.output == _reference([prompt], 64, 5)[0]
    assert decode.stats.fallback_prefills == 1 and decode.stats.loaded_tokens == 0 and decode.stats.prefill_tokens > 0


def test_submit_prefilled_checks_the_keys(server):
    with pytest.raises(ValueError, match="keys"):
        server.engine.submit_prefilled(server.engine.new_request([1] * 70, 2), Prefilled(3, (b"k" * 32,), False))


def test_killed_worker_fails_pending_requests_then_restarts(tmp_path):
    prompts = _prompts(16)[:3]
    with DisaggregatedServer({"kind": "dir", "path": str(tmp_path)}, page_size=16, num_blocks=32, max_batch=4,
                             **_BOUNDS) as srv:
        pid = srv.worker.pid
        os.kill(pid, signal.SIGSTOP)  # frozen: every request below stays pending in prefill
        try:
            reqs = [srv.submit(p, 4) for p in prompts]
            for _ in range(20):
                srv.step()
            assert all(not r.finished for r in reqs)
        finally:
            os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        srv.run(timeout_s=15)
        assert time.monotonic() - start < 15
        failed = srv.pop_failed()
        assert {r.id for r in failed} == {r.id for r in reqs}
        assert all(r.finish_reason == "error" and f"pid {pid}" in r.error and "signal 9" in r.error for r in reqs)
        with pytest.raises(PrefillWorkerError, match="restart_prefill"):
            srv.submit([1, 2], 2)
        srv.restart_prefill()
        assert srv.worker.pid != pid and srv.stats.worker_restarts == 1
        assert srv.generate(prompts, max_tokens=4) == _reference(prompts, 16, 4)
        # With auto_restart, a worker that died while idle is replaced by the next submit.
        srv.auto_restart, pid = True, srv.worker.pid
        os.kill(pid, signal.SIGKILL)
        srv.worker.proc.wait(timeout=10)
        assert srv.generate(prompts[:1], max_tokens=4) == _reference(prompts[:1], 16, 4)
        assert srv.worker.pid != pid and srv.stats.worker_restarts == 2


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_reports_a_dead_prefill_worker(tmp_path):
    with DisaggregatedServer({"kind": "dir", "path": str(tmp_path)}, page_size=16, num_blocks=16, **_BOUNDS) as srv:
        http = CompletionServer(srv, "127.0.0.1", 0).start()
        try:
            pid = srv.worker.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pending = pool.submit(_post, http.url, {"prompt": [1, 2, 3], "max_tokens": 3})
                    # Kill only once the request is queued for the frozen worker (in the server's
                    # pending set: later it would be answered 503, not 500) with its HTTP waiter
                    # registered (the loop registers it under the lock it submits under).
                    deadline = time.monotonic() + 30.0
                    while not (srv._pending and http.loop.waiters):
                        assert not pending.done(), f"the request was answered before the kill: {pending.result()}"
                        assert time.monotonic() < deadline, "the request did not reach the frozen worker within 30 s"
                        time.sleep(0.01)
                    assert not pending.done()
                    os.kill(pid, signal.SIGKILL)
                    status, body = pending.result(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):  # never leave a frozen worker behind
                    os.kill(pid, signal.SIGKILL)
            assert status == 500 and "signal 9" in body["error"]["message"]
            status, body = _post(http.url, {"prompt": [1, 2, 3], "max_tokens": 3})
            assert status == 503 and "restart_prefill" in body["error"]["message"]
            srv.restart_prefill()
            status, body = _post(http.url, {"prompt": [1, 2, 3], "max_tokens": 3})
            assert status == 200 and body["choices"][0]["token_ids"] == _reference([[1, 2, 3]], 16, 3)[0]
        finally:
            http.stop()


def test_cli_serve_disaggregated():
    out = subprocess.run([sys.executable, "-m", "openinfra", "serve", "--disaggregated", "--port", "0", "--duration", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "disaggregated: prefill worker pid" in out.stdout and "input tokens/s" in out.stdout


def test_worker_with_another_model_is_refused(tmp_path):
    srv = DisaggregatedServer({"kind": "dir", "path": str(tmp_path)}, page_size=16, num_blocks=8, **_BOUNDS)
    srv._worker_args[srv._worker_args.index("--seed") + 1] = "1"  # the worker builds different weights
    with pytest.raises(PrefillWorkerError, match="garbage"):
        srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster
    from tests.fs.conftest import FAST

    spec = ClusterSpec(str(tmp_path_factory.mktemp("kv-3fs")), storage_nodes=2, targets_per_node=2, replication=2,
                       chunk_size=1 << 20, **FAST)
    c = LocalCluster.start(spec, timeout=60)
    yield c
    c.stop()


def test_through_3fs_kvcache(cluster):
    """The overview's path: the worker writes the prompt's KV to 3FS KVCache, the decode engine reads it."""
    prompts = _prompts(16)
    store = {"kind": "3fs", "mgmtd": cluster.address, "root": f"/kvcache/disagg-{os.getpid()}"}
    with DisaggregatedServer(store, page_size=16, num_blocks=32, max_batch=4, **_BOUNDS) as srv:
        assert srv.generate(prompts, max_tokens=5) == _reference(prompts, 16, 5)
        assert srv.stats.prefix_hit_rate > 0 and srv.stats.fallback_prefills == 0
        assert srv.stats.decode.loaded_tokens == sum(map(len, prompts))
        # Only the shared full pages remain: each request's partial page was deleted once read.
        from openinfra.fs.clients.kvcache import KVCache

        with KVCache(cluster.address, root=store["root"]) as kv:
            assert kv.stats()["blocks"] == len({k for p in prompts for k in page_keys(p, 16)})
