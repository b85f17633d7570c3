"""KVCache against a real cluster: batched put/get/exists/delete, reads into tensors, GC."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.service


@pytest.fixture
def kv(fs_client, workdir):
    from openinfra.fs.clients import KVCache

    return KVCache(client=fs_client, root=f"{workdir}/kv", concurrency=16)


def test_put_get_roundtrip_all_dtypes(kv):
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(4, 64, 32, generator=g), torch.randn(3, 5, generator=g).to(torch.bfloat16),
            torch.randint(-100, 100, (1000,), generator=g, dtype=torch.int64),
            torch.randn(70_000, generator=g).to(torch.float16),        # > 128 KiB, odd size
            torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn), torch.zeros(0),
            torch.randn(300_000, generator=g)]                                # > one 1 MiB chunk
    keys = [f"block-{i}".encode() for i in range(len(vals))]
    assert kv.put_batch(keys, vals) == [True] * len(vals)
    assert kv.put_batch(keys[:1], vals[:1]) == [False]               # exists: kept, not rewritten
    got = kv.get_batch(keys + [b"missing"])
    assert got[-1] is None
    for v, t in zip(vals, got):
        assert t.dtype == v.dtype and t.shape == v.shape
        assert torch.equal(t.view(torch.uint8), v.view(torch.uint8))
    outs = [torch.empty_like(v) for v in vals]
    assert kv.get_into(keys, outs) == [True] * len(vals)
    assert all(torch.equal(o.view(torch.uint8), v.view(torch.uint8)) for o, v in zip(outs, vals))
    # A second read goes through the cached location (no metadata request) and gives the same bytes.
    assert torch.equal(kv.get(keys[0]), vals[0])
    assert kv.exists_batch(keys[:2] + [b"missing"]) == [True, True, False]


def test_get_into_checks_sizes_and_types(kv):
    kv.put(b"k", torch.ones(8))
    with pytest.raises(ValueError, match="outs\\[0\\].*32 bytes"):
        kv.get_into([b"k"], [torch.empty(9)])
    with pytest.raises(ValueError, match="contiguous"):
        kv.get_into([b"k"], [torch.empty(8, 2)[:, 0]])
    with pytest.raises(ValueError, match="one per key"):
        kv.get_into([b"k", b"j"], [torch.empty(8)])
    with pytest.raises(TypeError, match="key"):
        kv.put("text key", torch.ones(1))
    with pytest.raises(ValueError, match="key"):
        kv.put(b"", torch.ones(1))
    with pytest.raises(TypeError, match="values\\[0\\]"):
        kv.put_batch([b"x"], [[1, 2]])
    # Same byte size, other dtype: allowed (the caller's buffer decides the interpretation).
    out = torch.empty(16, dtype=torch.float16)
    assert kv.get_into([b"k"], [out]) == [True]
    assert torch.equal(out.view(torch.float32), torch.ones(8))


def test_delete_and_stale_location(kv, fs_client):
    from openinfra.fs.clients import KVCache

    kv.put_batch([b"a", b"b"], [torch.arange(10.0), torch.arange(20.0)])
    assert torch.equal(kv.get(b"a"), torch.arange(10.0))            # location now cached
    other = KVCache(client=fs_client, root=kv.root)                  # another client deletes it
    assert other.delete_batch([b"a", b"zzz"]) == [True, False]
    fs_client._run(fs_client.aio._meta("gc", {}))                    # chunks reclaimed now
    assert kv.get(b"a") is None and not kv.exists(b"a")
    kv.put(b"a", torch.arange(5.0))                                  # a new block under the old key
    assert torch.equal(kv.get(b"a"), torch.arange(5.0))
    assert torch.equal(other.get(b"b"), torch.arange(20.0))


def test_gc_by_age_and_capacity(kv):
    import time

    keys = [f"g{i}".encode() for i in range(6)]
    for k in keys:  # distinct put times, oldest first
        kv.put(k, torch.full((1024,), float(len(k))))
        time.sleep(0.02)
    block = kv.stats()["bytes"] // 6
    assert kv.stats() == {"blocks": 6, "bytes": 6 * block}
    r = kv.gc(capacity_bytes=4 * block)                              # two oldest evicted
    assert (r.by_age, r.by_capacity, r.remaining_blocks, r.freed_bytes) == (0, 2, 4, 2 * block)
    assert kv.exists_batch(keys) == [False, False, True, True, True, True]
    r = kv.gc(max_age_s=3600)                                        # nothing is that old
    assert r.by_age == 0 and r.remaining_blocks == 4
    r = kv.gc(max_age_s=10, now=time.time() + 3600)                  # an hour later: all too old
    assert r.by_age == 4 and r.remaining_blocks == 0 and kv.stats()["blocks"] == 0


def test_block_store_protocol_with_prefix_keys(kv):
    from openinfra.fs.clients import KVCacheBlockStore
    from openinfra.serving.prefix_cache import page_keys

    store = KVCacheBlockStore(kv)
    keys = page_keys(list(range(256)), page_size=64)
    rows = [torch.randn(2, 64, 16) for _ in keys]
    for k, r in zip(keys, rows):
        assert not store.exists(k)
        store.put(k, r)
    assert all(store.exists(k) for k in keys)
    assert all(torch.equal(store.get(k), r) for k, r in zip(keys, rows))
    assert store.get(b"\0" * 32) is None


def test_cached_gets_read_straight_into_tensors(kv, fs_client):
    """Second gets use cached locations: one batch_read per node, payloads received straight into
    the caller's tensors (any dtype/shape, requires_grad too). A block replaced under a cached
    location by one of another size is noticed (size error), never served from the old one."""
    g = torch.Generator().manual_seed(3)
    vals = [torch.randn(8, 1024, generator=g).to(torch.bfloat16), torch.randn(3, 7, 5, generator=g),
            torch.randint(0, 255, (65536,), generator=g, dtype=torch.uint8)]
    keys = [b"fast-0", b"fast-1", b"fast-2"]
    kv.put_batch(keys, vals)
    assert all(torch.equal(a, b) for a, b in zip(kv.get_batch(keys), vals))  # cold: caches the locations
    for _ in range(2):  # warm, and warm again (header seen before)
        outs = [torch.zeros_like(v) for v in vals]
        outs[1].requires_grad_(True)
        assert kv.get_into(keys, outs) == [True, True, True]
        assert all(torch.equal(o.detach(), v) for o, v in zip(outs, vals))
        got = kv.get_batch(keys)
        assert all(t.dtype == v.dtype and t.shape == v.shape and torch.equal(t, v) for t, v in zip(got, vals))
    other = type(kv)(client=fs_client, root=kv.root)
    assert other.delete(b"fast-1")
    fs_client._run(fs_client.aio._meta("gc", {}))  # the old block's chunks go (keys name content: never reused)
    other.put(b"fast-1", torch.ones(10))
    with pytest.raises(ValueError, match="outs\\[1\\].*40 bytes"):
        kv.get_into(keys, [torch.empty_like(v) for v in vals])
    assert torch.equal(kv.get(b"fast-1"), torch.ones(10))


_EXIT_WITHOUT_CLOSE = """
import sys, torch
from openinfra.fs.clients import KVCache, KVCacheBlockStore
from openinfra.fs.client.native import Client
mgmtd, root = sys.argv[1], sys.argv[2]
kv = KVCache(mgmtd, root=root)                      # a client of its own, never closed
kv.put_batch([b"a", b"b"], [torch.arange(64.0), torch.ones(3)])
outs = [torch.empty(64), torch.empty(3)]
assert kv.get_into([b"a", b"b"], outs) == [True, True]   # locations cached: this thread's sockets
assert kv.get_into([b"a", b"b"], outs) == [True, True]
store = KVCacheBlockStore(KVCache(mgmtd, root=root))
assert store.exists(b"a")
c = Client(mgmtd)
f = c.open(root + "/readme", "wb"); f.write(b"x" * 100); f.close()
r = c.open(root + "/readme", "rb"); r.read(10)        # a read-only file left open
print("done", flush=True)
"""


def test_process_exits_cleanly_with_clients_left_open(cluster, workdir, tmp_path):
    """A program that never closes its clients (KV caches, a sync client with a file open) exits
    with status 0, and no event-loop connection or task is left for finalization: the exit hook
    closes the connections and stops the loops first. (Before, every connection was still open
    on a closed uvloop loop at exit, for finalization to free, and the demo died with SIGSEGV on
    its way out about once in ten runs; dev mode (-X dev) reports such leftovers as warnings.)
    The blocking-read sockets of a KV cache are plain sockets: their finalizers close them."""
    import subprocess
    import sys

    script = tmp_path / "exit_without_close.py"
    script.write_text(_EXIT_WITHOUT_CLOSE)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-X", "dev", str(script), cluster.address, workdir],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == "done"
        for complaint in ("Task was destroyed", "Transport", "event loop", "Traceback"):
            assert complaint not in proc.stderr, proc.stderr[-3000:]


def test_block_store_close_closes_its_cache(cluster, workdir):
    from openinfra.fs.clients import KVCache, KVCacheBlockStore

    with KVCacheBlockStore(KVCache(cluster.address, root=f"{workdir}/kv")) as store:
        store.put(b"k", torch.ones(4))
        assert store.exists(b"k")
        client = store.cache.client
    assert not client._thread.is_alive() and client._loop.is_closed()
