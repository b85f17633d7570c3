"""KVCache ``get_into`` at cached locations (``StorageClient.read_exact``: the joined per-block
request items, one ``batch_read`` per storage node, payloads received into the tensors; by default
issued from the calling thread through ``BlockingReads``, else through the event loop): same
bytes as put, misses, stale locations, a storage node killed in the middle of batches,
corrupt chunks detected, and ``read_exact`` on its own (both versions)."""

from __future__ import annotations

import pathlib
import threading
import time

import msgpack
import pytest
import torch

from openinfra.fs import Code, FsError
from openinfra.fs.client.blocking_reads import BlockingReads
from openinfra.fs.client.storage_client import StorageClient

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster

    from .conftest import FAST

    c = LocalCluster.start(ClusterSpec(str(tmp_path_factory.mktemp("kvget")), storage_nodes=2, targets_per_node=2,
                                       replication=2, stripe=2, **FAST), timeout=60)
    yield c
    c.stop()


def _blocks(n: int, seed: int, size: int = 65536) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 255, (size,), dtype=torch.uint8, generator=g) for _ in range(n)]


def _count_read_exact(monkeypatch) -> list[list]:
    """Spy on ``read_exact`` (both versions): per call, what it returned."""
    seen: list[list] = []
    orig = StorageClient.read_exact
    orig_blocking = BlockingReads.read_exact

    async def spy(self, chains, items, dests):
        out = await orig(self, chains, items, dests)
        seen.append(list(out))
        return out

    def spy_blocking(self, chains, items, dests):
        out = orig_blocking(self, chains, items, dests)
        seen.append(list(out))
        return out

    monkeypatch.setattr(StorageClient, "read_exact", spy)
    monkeypatch.setattr(BlockingReads, "read_exact", spy_blocking)
    return seen


@pytest.fixture(params=["blocking", "loop"])
def kv_mode(request, monkeypatch):
    """Both versions of the fast path: from the calling thread (the default) and on the loop."""
    monkeypatch.setenv("OPENINFRA_FS_KV_BLOCKING", "1" if request.param == "blocking" else "0")
    return request.param


def test_fast_get_into_returns_the_put_bytes_and_misses(cluster, monkeypatch, kv_mode):
    from openinfra.fs.clients import KVCache

    seen = _count_read_exact(monkeypatch)
    with cluster.client() as fs:
        kv = KVCache(client=fs, root=f"/kvfast-data-{kv_mode}")
        assert kv._blocking_on == (kv_mode == "blocking")
        keys = [f"blk-{i}".encode() for i in range(150)]
        vals = _blocks(150, 1)
        vals[7] = torch.randn(4, 1000, dtype=torch.float32)  # other dtypes and sizes in the same batch
        vals[8] = torch.arange(300, dtype=torch.int64).reshape(3, 100)
        assert all(kv.put_batch(keys, vals))
        missing = [b"never-put-1", b"never-put-2"]
        ask = keys[:70] + missing + keys[70:]
        for rnd in range(3):  # cold (meta lookups), then warm through read_exact twice
            outs = [torch.zeros_like(v) for v in vals[:70]] + [torch.zeros(65536, dtype=torch.uint8)] * 2 \
                + [torch.zeros_like(v) for v in vals[70:]]
            hits = kv.get_into(ask, outs)
            assert hits == [True] * 70 + [False, False] + [True] * 80
            got = outs[:70] + outs[72:]
            assert all(torch.equal(o, v) for o, v in zip(got, vals))
        warm = [r for r in seen if len(r) == 150]
        assert len(warm) >= 2 and all(all(r) for r in warm)  # the warm rounds went through read_exact
        # keys as bytearray / memoryview (not hashable or not bytes): the general path, same bytes
        outs = [torch.zeros_like(v) for v in vals[:5]]
        assert kv.get_into([bytearray(k) for k in keys[:5]], outs) == [True] * 5
        assert all(torch.equal(o, v) for o, v in zip(outs, vals[:5]))
        # an empty block still goes through meta (0 bytes would not tell a deleted block)
        kv.put(b"empty", torch.empty(0))
        assert kv.get_into([b"empty", keys[0]], [torch.empty(0), torch.zeros(65536, dtype=torch.uint8)]) == [True, True]
        # a tensor of the wrong size is an error, as on the general path
        with pytest.raises(ValueError, match="outs\\[1\\]"):
            kv.get_into([keys[0], keys[1]], [torch.zeros(65536, dtype=torch.uint8), torch.zeros(10, dtype=torch.uint8)])


def test_fast_get_into_forgets_stale_locations(cluster, kv_mode):
    """A block deleted (and its chunks removed) since its location was cached reads short through
    the fast path; it is looked up again and reported missing, or read anew when put again."""
    from openinfra.fs.clients import KVCache

    with cluster.client() as fs:
        kv = KVCache(client=fs, root=f"/kvfast-stale-{kv_mode}")
        other = KVCache(client=fs, root=f"/kvfast-stale-{kv_mode}")
        keys = [f"s-{i}".encode() for i in range(6)]
        vals = _blocks(6, 2)
        kv.put_batch(keys, vals)
        outs = [torch.zeros_like(v) for v in vals]
        assert kv.get_into(keys, outs) == [True] * 6
        assert kv.get_into(keys, outs) == [True] * 6  # warm
        assert other.delete_batch(keys[:2]) == [True, True]
        fs._run(fs.aio._meta("gc", {}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the chunks go in the background
            outs = [torch.zeros_like(v) for v in vals]
            if kv.get_into(keys, outs)[:2] == [False, False]:
                break
            time.sleep(0.2)
        assert kv.get_into(keys, outs) == [False, False, True, True, True, True]
        assert all(torch.equal(o, v) for o, v in zip(outs[2:], vals[2:]))
        new = _blocks(1, 3)[0]
        other.put(keys[0], new)
        out = torch.zeros_like(new)
        assert kv.get_into(keys[:1], [out]) == [True] and torch.equal(out, new)


def test_fast_get_into_survives_a_storage_node_killed_mid_batch(cluster, kv_mode):
    """R=2: a storage node is killed while batches are being read through the fast path; the
    reads that went to it are retried on the other replica, every batch returns the put bytes."""
    from openinfra.fs.clients import KVCache

    with cluster.client(retry_s=30) as fs:
        kv = KVCache(client=fs, root=f"/kvfast-kill-{kv_mode}")
        keys = [f"k-{i}".encode() for i in range(128)]
        vals = _blocks(128, 4)
        kv.put_batch(keys, vals)
        outs = [torch.zeros_like(v) for v in vals]
        assert kv.get_into(keys, outs) == [True] * 128  # locations cached
        errors: list = []
        rounds = [0]
        stop = threading.Event()

        def reader():
            try:
                for _ in range(400):  # bounded; stopped once the node is back
                    if stop.is_set():
                        return
                    mine = [torch.zeros_like(v) for v in vals]
                    hits = kv.get_into(keys, mine)
                    if hits != [True] * 128 or not all(torch.equal(o, v) for o, v in zip(mine, vals)):
                        errors.append(f"round {rounds[0]}: {hits.count(True)} hits or wrong bytes")
                        return
                    rounds[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        t = threading.Thread(target=reader)
        t.start()
        try:
            deadline = time.monotonic() + 60.0  # at least one whole batch before the kill
            while rounds[0] < 1 and not errors and t.is_alive():
                assert time.monotonic() < deadline, "no get_into batch finished within 60 s before the kill"
                time.sleep(0.01)
            assert not errors, errors
            before = rounds[0]
            assert before >= 1, "the reader stopped before finishing a batch"
            cluster.kill("storage-2")
            time.sleep(4.0)  # past the failure timeout: routing drops the node
            after_kill = rounds[0]
        finally:
            stop.set()
            t.join(120)
            cluster.restart("storage-2")
            cluster.wait_healthy(timeout=60)
        assert not t.is_alive()
        assert not errors, errors
        assert before >= 1 and after_kill > before  # batches completed across the kill


def test_fast_get_into_detects_corrupt_blocks(cluster, kv_mode):
    """A flipped byte in a block's chunk file (every replica) fails the storage's CRC32C check:
    the fast path raises CHECKSUM_MISMATCH, never returns the bad bytes as a hit."""
    from openinfra.fs.clients import KVCache
    from openinfra.fs.clients.kvcache import _digest

    with cluster.client(retry_s=5) as fs:
        kv = KVCache(client=fs, root=f"/kvfast-crc-{kv_mode}")
        keys = [f"c-{i}".encode() for i in range(4)]
        vals = _blocks(4, 5)
        kv.put_batch(keys, vals)
        outs = [torch.zeros_like(v) for v in vals]
        assert kv.get_into(keys, outs) == [True] * 4
        inode = kv._where[_digest(keys[2])]["id"]
        files = list(pathlib.Path(cluster.spec.data_dir).glob(f"**/chunks/*/{inode:x}.0.*"))
        assert len(files) == 2  # one per replica
        for p in files:
            with open(p, "r+b") as f:
                f.seek(30_000)
                b = f.read(1)
                f.seek(30_000)
                f.write(bytes([b[0] ^ 0x5A]))
        with pytest.raises(FsError) as e:
            kv.get_into(keys, [torch.zeros_like(v) for v in vals])
        assert e.value.code == Code.CHECKSUM_MISMATCH
        # the other blocks are still served
        outs = [torch.zeros_like(v) for v in vals[:2]]
        assert kv.get_into(keys[:2], outs) == [True, True]
        assert all(torch.equal(o, v) for o, v in zip(outs, vals[:2]))


@pytest.mark.parametrize("mode", ["loop", "blocking"])
def test_read_exact_sizes_holes_and_errors(cluster, mode):
    """``read_exact`` on its own: True where the read filled its destination exactly, False for
    another byte count (a hole, a destination of the wrong size: never written past), and a
    per-read error that is not retriable raised. The same from the calling thread."""
    with cluster.client() as fs:
        if mode == "loop":
            def read_exact(chains, items, dests):
                return fs._run(fs.aio.storage.read_exact(chains, items, dests))
        else:
            blocking = BlockingReads(fs.aio.storage)
            read_exact = blocking.read_exact
        data = bytes(range(256)) * 400  # 102,400 bytes: one chunk
        fs.write_bytes("/read-exact.bin", data)

        async def node():
            f = await fs.aio.open("/read-exact.bin", "rb")
            try:
                return f.inode, f.layout
            finally:
                await f.close()

        inode, layout = fs._run(node())
        cid = layout["chains"][0]

        def item(index, off, n):
            return msgpack.packb([cid, inode, index, off, n])

        bufs = [bytearray(1000), bytearray(len(data) - 128), bytearray(10), bytearray(50), bytearray(1000)]
        guard = bytearray(b"\xee" * 10)
        items = [item(0, 5, 1000), item(0, 128, len(data) - 128), item(7, 0, 10),  # chunk 7: a hole
                 item(0, len(data) - 20, 50),  # 20 bytes at the end: not the 50 asked for
                 item(0, 0, 1000)]
        views = [memoryview(b) for b in bufs]
        got = read_exact([cid] * 5, items, views)
        assert got == [True, True, False, False, True]
        assert bytes(bufs[0]) == data[5:1005] and bytes(bufs[1]) == data[128:] and bytes(bufs[4]) == data[:1000]
        assert bytes(bufs[3]) == bytes(50)  # the 20 bytes went to scratch, not into a short destination
        assert bytes(guard) == b"\xee" * 10
        assert read_exact([], [], []) == []
        with pytest.raises(ValueError):
            read_exact([cid], [], [])
        bad = msgpack.packb([cid, inode, 0, -5, 10])  # a bad read: served as a per-read error
        with pytest.raises(FsError) as e:
            read_exact([cid], [bad], [memoryview(bytearray(10))])
        assert e.value.code == Code.RPC_BAD_ARGS
        # after a per-read error the sockets are still in step: the next call reads right
        bufs2 = [bytearray(1000)]
        assert read_exact([cid], [item(0, 5, 1000)], [memoryview(bufs2[0])]) == [True]
        assert bytes(bufs2[0]) == data[5:1005]
        if mode == "blocking":
            blocking.close()
            assert read_exact([cid], [item(0, 5, 1000)], [memoryview(bytearray(1000))]) == [None]


def test_keep_heap_takes_on_glibc():
    """The storage process's malloc settings (``server.keep_heap``) apply on this platform."""
    import platform

    from openinfra.fs.server import keep_heap

    ok = keep_heap()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ok


def test_fast_get_into_destination_views_follow_the_tensors(cluster, kv_mode):
    """The remembered byte views of destination tensors never outlive or outgrow them: a tensor
    whose storage was replaced (``set_``, ``resize_``) is written in its new memory, a dead
    tensor is not kept alive by the cache, and another tensor that gets the dead one's id gets a
    view of its own."""
    import gc
    import weakref

    from openinfra.fs.clients import KVCache

    with cluster.client() as fs:
        kv = KVCache(client=fs, root=f"/kvfast-views-{kv_mode}")
        keys = [f"v-{i}".encode() for i in range(3)]
        vals = _blocks(2, 9) + [torch.randn(8, 2048, dtype=torch.float32)]  # 64 KiB as float32 too
        kv.put_batch(keys, vals)
        outs = [torch.zeros_like(v) for v in vals]
        assert kv.get_into(keys, outs) == [True] * 3  # cold: locations cached
        for _ in range(2):
            outs = [o.zero_() for o in outs]
            assert kv.get_into(keys, outs) == [True] * 3
            assert all(torch.equal(o, v) for o, v in zip(outs, vals))
        old_ptr = outs[0].data_ptr()
        outs[0].set_(torch.zeros(65536, dtype=torch.uint8))  # new storage, same tensor object
        keep = torch.zeros(65536, dtype=torch.uint8)
        outs[1].resize_(0)
        outs[1].resize_(65536)
        outs[1].zero_()
        assert outs[0].data_ptr() != old_ptr
        assert kv.get_into(keys, outs) == [True] * 3
        assert all(torch.equal(o, v) for o, v in zip(outs, vals)) and not keep.any()
        ref = weakref.ref(outs[2])
        del outs
        gc.collect()
        assert ref() is None  # not kept alive by the view cache
        for _ in range(20):  # new tensors (some may get a dead one's id): right bytes every time
            outs = [torch.zeros_like(v) for v in vals]
            assert kv.get_into(keys, outs) == [True] * 3
            assert all(torch.equal(o, v) for o, v in zip(outs, vals))
            del outs
