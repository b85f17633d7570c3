"""Batched reads (``batch_read`` on a storage node, ``StorageClient.read_chunks``) and the chunk
store's inline small-read path: same bytes as one-by-one reads, per-read errors, fallback when a
node is gone."""

from __future__ import annotations

import asyncio
import random

import pytest

from openinfra.fs import Code, FsError
from openinfra.fs.client.storage_client import chunk_chain
from openinfra.fs.cluster import call

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]

CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster

    from .conftest import FAST

    c = LocalCluster.start(ClusterSpec(str(tmp_path_factory.mktemp("batch")), storage_nodes=2, replication=2,
                                       chunk_size=CHUNK, stripe=1, **FAST), timeout=60)
    yield c
    c.stop()


def _file(fs, path: str, size: int, seed: int) -> tuple[bytes, dict]:
    data = random.Random(seed).randbytes(size)
    fs.write_bytes(path, data)

    async def node():
        f = await fs.aio.open(path, "rb")
        try:
            return {"id": f.inode, "layout": f.layout}
        finally:
            await f.close()

    return data, fs._run(node())


def test_batch_read_rpc_matches_single_reads_and_reports_per_read_errors(cluster):
    with cluster.client() as fs:
        data, node = _file(fs, "/batch-rpc.bin", 3 * CHUNK + 1000, 1)
        r = cluster.routing()
        layout, inode = node["layout"], node["id"]
        chain0 = chunk_chain(layout, 0)
        addr = r.address(r.serving(chain0)[0]["node"])
        reads = [[chain0, inode, 0, 0, 4096], [chain0, inode, 0, CHUNK - 100, 4096],   # short at the chunk end
                 [chain0, inode, 0, 5000, -1],                                          # to the end of the chunk
                 [chain0, inode, 3, 0, 4096] if chunk_chain(layout, 3) == chain0 else [chain0, inode, 0, 1, 2],
                 [chain0, inode, 99, 0, 4096],                                          # a hole
                 [chain0, -1, 0, 0, 10],                                                # bad: served as an error
                 [999, inode, 0, 0, 10]]                                                # unknown chain: an error
        out = call(addr, "batch_read", {"reads": reads})
        assert len(out) == len(reads)
        for rd, got in zip(reads[:5], out[:5]):
            single = call(addr, "read", dict(zip(["chain_id", "inode", "index", "offset", "length"], rd)))
            assert bytes(got["data"]) == bytes(single["data"])
            assert got["version"] == single["version"]
        assert bytes(out[0]["data"]) == data[:4096]
        assert bytes(out[1]["data"]) == data[CHUNK - 100:CHUNK]
        assert bytes(out[2]["data"]) == data[5000:CHUNK]
        assert out[4] == {"data": b"", "version": 0, "chunk_length": 0}
        assert out[5]["code"] == Code.RPC_BAD_ARGS and "reads[5]" in out[5]["message"]
        assert out[6]["code"] == Code.CHAIN_VERSION_MISMATCH
        with pytest.raises(FsError) as e:
            call(addr, "batch_read", {"reads": [[chain0, inode, 0, 0]]})
        assert e.value.code == Code.RPC_BAD_ARGS and "reads[0]" in str(e.value)
        with pytest.raises(FsError) as e:
            call(addr, "batch_read", {"reads": [[chain0, inode, 0, 0, 1]] * 4097})
        assert e.value.code == Code.RPC_BAD_ARGS
        # the node keeps serving after bad batches
        assert bytes(call(addr, "batch_read", {"reads": reads[:1]})[0]["data"]) == data[:4096]


def test_read_chunks_equals_read_chunk_over_many_random_reads(cluster):
    rng = random.Random(7)
    with cluster.client() as fs:
        files = [_file(fs, f"/batch-many-{i}.bin", size, 10 + i)
                 for i, size in enumerate([5 * CHUNK + 17, CHUNK, 100_000])]
        reads, want = [], []
        for _ in range(300):
            data, node = files[rng.randrange(len(files))]
            off = rng.randrange(len(data))
            index, within = divmod(off, CHUNK)
            n = rng.choice([1, 512, 4096, 65536, CHUNK])
            reads.append((node["layout"], node["id"], index, within, n))
            want.append(data[off:min(off + n, (index + 1) * CHUNK, len(data))])
        got = fs._run(fs.aio.storage.read_chunks(reads))
        assert [bytes(g) for g in got] == want
        assert fs._run(fs.aio.storage.read_chunks([])) == []
        with pytest.raises(TypeError, match="reads"):
            fs._run(fs.aio.storage.read_chunks("not a list"))


def test_read_chunks_falls_back_when_a_node_is_gone(cluster):
    """A batch sent to a killed node fails as a whole; its reads are retried one by one on the
    chain's other replica (R=2), so every read still returns the right bytes."""
    with cluster.client(retry_s=30) as fs:
        data, node = _file(fs, "/batch-kill.bin", 6 * CHUNK, 3)
        reads = [(node["layout"], node["id"], i, 123, 4096) for i in range(6)] * 4
        want = [data[i * CHUNK + 123:i * CHUNK + 123 + 4096] for i in range(6)] * 4
        cluster.kill("storage-2")
        try:
            for _ in range(3):  # random replica choice: several rounds reach the dead node
                got = fs._run(fs.aio.storage.read_chunks(reads))
                assert [bytes(g) for g in got] == want
        finally:
            cluster.restart("storage-2")
            cluster.wait_healthy(timeout=60)


def test_chunk_store_inline_and_threaded_reads_agree(tmp_path):
    from openinfra.fs.storage.chunk_store import INLINE_READ_MAX, ChunkStore

    async def go():
        store = ChunkStore(tmp_path / "t", fsync=False)
        try:
            content = random.Random(5).randbytes(2 * INLINE_READ_MAX + 3)
            await store.prepare(1, 0, 1, "write", 0, content)
            await store.commit(1, 0, 1)
            for off, n in [(0, 10), (7, INLINE_READ_MAX), (7, INLINE_READ_MAX + 1), (0, len(content)),
                           (0, 1 << 40), (len(content) - 5, 100), (len(content), 10), (3, 0)]:
                got, meta = await store.read(1, 0, off, n)
                assert got == content[off:off + n], (off, n)
                assert meta.version == 1
        finally:
            store.close()

    asyncio.run(go())


def test_read_chunks_splits_requests_by_bytes(cluster, monkeypatch):
    """A node's reads are cut into batch_read requests of at most BATCH_READ_BYTES, so a big batch
    never makes a reply over the RPC frame limit; the bytes are the same."""
    from openinfra.fs.client import storage_client

    with cluster.client() as fs:
        data, node = _file(fs, "/batch-split.bin", 4 * CHUNK, 21)
        calls = []
        real = fs.aio.storage.rpc.call

        async def counting(address, method, args=None, **kw):
            if method == "batch_read":
                calls.append(len(args["reads"]))
            return await real(address, method, args, **kw)

        monkeypatch.setattr(fs.aio.storage.rpc, "call", counting)
        monkeypatch.setattr(storage_client, "BATCH_READ_BYTES", 3 * 65536)
        reads = [(node["layout"], node["id"], i % 4, 0, 65536) for i in range(12)]
        got = fs._run(fs.aio.storage.read_chunks(reads))
        assert [bytes(g) for g in got] == [data[(i % 4) * CHUNK:(i % 4) * CHUNK + 65536] for i in range(12)]
        assert sum(calls) == 12 and max(calls) <= 3 and len(calls) >= 4


def test_kvcache_batch_get_with_stale_locations(cluster):
    """get_batch / get_into read cached locations with batch_read; a block deleted or replaced by
    another client since is read again through meta (never the old bytes)."""
    import torch

    from openinfra.fs.clients import KVCache

    with cluster.client() as fs:
        kv = KVCache(client=fs, root="/kv-batch")
        other = KVCache(client=fs, root="/kv-batch")
        keys = [b"a", b"b", b"c", b"d"]
        vals = [torch.arange(1000, dtype=torch.float32) + i for i in range(4)]
        kv.put_batch(keys, vals)
        assert all(torch.equal(g, v) for g, v in zip(kv.get_batch(keys), vals))  # locations cached
        assert other.delete_batch([b"a", b"b"]) == [True, True]
        fs._run(fs.aio._meta("gc", {}))
        other.put(b"a", torch.full((1000,), 7.0))
        got = kv.get_batch(keys)
        assert torch.equal(got[0], torch.full((1000,), 7.0)) and got[1] is None
        assert torch.equal(got[2], vals[2]) and torch.equal(got[3], vals[3])
        outs = [torch.empty(1000) for _ in keys]
        assert kv.get_into(keys, outs) == [True, False, True, True]
        assert torch.equal(outs[3], vals[3])


def test_chunk_store_row_cache_follows_commits_removes_and_cancellation(tmp_path):
    """The committed-row cache answers like SQLite after commits and removes, and after a commit
    whose caller was cancelled while the transaction ran (it may still commit)."""
    from openinfra.fs.storage.chunk_store import ChunkStore

    def db_row(store, inode, index):
        return store.db.execute("SELECT inode, idx, ver, len, crc, file FROM chunks WHERE inode = ? AND idx = ?",
                                (inode, index)).fetchone()

    def cached(store, inode, index):
        m = store.get(inode, index)
        return None if m is None or m.version == 0 else (m.inode, m.index, m.version, m.length, m.crc, m.file)

    async def go():
        store = ChunkStore(tmp_path / "c", fsync=False)
        try:
            assert store.get(3, 0) is None  # a cached "no row"
            await store.prepare(3, 0, 1, "write", 0, b"v1" * 100)
            await store.commit(3, 0, 1)
            assert cached(store, 3, 0) == db_row(store, 3, 0) and store.get(3, 0).version == 1
            assert (await store.read(3, 0, 0, 1 << 20))[0] == b"v1" * 100
            await store.prepare(3, 0, 2, "write", 0, b"v2" * 100)
            task = asyncio.ensure_future(store.commit(3, 0, 2))
            await asyncio.sleep(0)   # queued on the group-commit flusher
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):     # the transaction still runs to its end
                if not store._flushing:
                    break
                await asyncio.sleep(0.01)
            assert cached(store, 3, 0) == db_row(store, 3, 0)
            assert cached(store, 3, 0)[2] == 2
            assert await store.remove(3, 0)
            assert store.get(3, 0) is None or store.get(3, 0).version == 0
            assert db_row(store, 3, 0) is None
        finally:
            store.close()

    asyncio.run(go())


def test_read_chunks_into_buffers_matches_plain_reads(cluster):
    """``read_chunks(..., into=...)``: each read lands in its own buffer or scatter list (the
    packed reply received straight there); counts are short at a chunk's end and 0 for a hole;
    a destination too small for its read is a clear error."""
    with cluster.client() as fs:
        data, node = _file(fs, "/batch-into.bin", 3 * CHUNK + 5000, 21)
        lay, ino = node["layout"], node["id"]
        reads = [(lay, ino, 0, 0, CHUNK), (lay, ino, 1, 100, 70_000), (lay, ino, 3, 4000, 65536),  # short: 1000
                 (lay, ino, 7, 0, 4096), (lay, ino, 2, 0, 128 + 65536)]                           # a hole
        bufs = [bytearray(CHUNK), bytearray(70_000), bytearray(65536), bytearray(b"\x55" * 4096)]
        head, body = bytearray(128), bytearray(65536)
        into = [*bufs, [memoryview(head), memoryview(body)]]
        got = fs._run(fs.aio.storage.read_chunks(reads, into))
        assert got == [CHUNK, 70_000, 1000, 0, 128 + 65536]
        assert bytes(bufs[0]) == data[:CHUNK]
        assert bytes(bufs[1]) == data[CHUNK + 100:CHUNK + 70_100]
        assert bytes(bufs[2][:1000]) == data[3 * CHUNK + 4000:] and bytes(bufs[2][1000:]) == bytes(64536)
        assert bytes(bufs[3]) == b"\x55" * 4096  # a hole writes nothing
        assert bytes(head) + bytes(body) == data[2 * CHUNK:2 * CHUNK + 128 + 65536]
        with pytest.raises(ValueError, match="into"):
            fs._run(fs.aio.storage.read_chunks(reads[:2], [bytearray(CHUNK), bytearray(10)]))
        with pytest.raises(ValueError, match="one per read"):
            fs._run(fs.aio.storage.read_chunks(reads[:2], [bytearray(CHUNK)]))
        with pytest.raises(TypeError, match="writable"):
            fs._run(fs.aio.storage.read_chunks(reads[:1], [bytes(CHUNK)]))
        # single reads take the same destinations
        one = bytearray(70_000)
        assert fs._run(fs.aio.storage.read_chunk(lay, ino, 1, 100, 70_000, into=one)) == 70_000
        assert bytes(one) == data[CHUNK + 100:CHUNK + 70_100]


def test_pread_into_across_chunks_with_a_hole(cluster):
    """``AsyncFile.pread_into`` / ``pread`` over chunk boundaries at unaligned offsets, through
    a hole (zeros) and past the end of the file (short count, rest of the buffer untouched)."""
    import torch

    with cluster.client() as fs:
        data = random.Random(5).randbytes(3 * CHUNK + 777)
        fs.write_bytes("/pread-into.bin", data[:CHUNK])

        async def write_tail():
            f = await fs.aio.open("/pread-into.bin", "r+b")
            try:
                await f.pwrite(data[2 * CHUNK:], 2 * CHUNK)  # chunk 1 is never written: a hole
            finally:
                await f.close()

        fs._run(write_tail())
        want = data[:CHUNK] + bytes(CHUNK) + data[2 * CHUNK:]

        async def reads():
            f = await fs.aio.open("/pread-into.bin", "rb")
            try:
                t = torch.full((2 * CHUNK + 1000,), 9, dtype=torch.uint8)  # a tensor as the destination
                n = await f.pread_into(t.numpy(), CHUNK - 500)
                assert n == 2 * CHUNK + 1000 and bytes(t.numpy()) == want[CHUNK - 500:3 * CHUNK + 500]
                tail = bytearray(b"\x07" * 5000)
                assert await f.pread_into(tail, 3 * CHUNK) == 777
                assert bytes(tail[:777]) == want[3 * CHUNK:] and bytes(tail[777:]) == b"\x07" * 4223
                assert await f.pread(3 * CHUNK, 100) == want[100:3 * CHUNK + 100]
                assert await f.pread_into(bytearray(10), 10 * CHUNK) == 0
                with pytest.raises(TypeError, match="writable"):
                    await f.pread_into(b"readonly", 0)
            finally:
                await f.close()

        fs._run(reads())


def test_read_chunks_into_falls_back_when_a_node_is_gone(cluster):
    """With destinations, a batch lost with its node is read again one by one into the same
    buffers: every count and byte is right (no bytes of the failed try reported as data)."""
    with cluster.client(retry_s=30) as fs:
        data, node = _file(fs, "/batch-into-kill.bin", 4 * CHUNK, 31)
        reads = [(node["layout"], node["id"], i, 7, 100_000) for i in range(4)] * 3
        cluster.kill("storage-1")
        try:
            for _ in range(3):
                bufs = [bytearray(100_000) for _ in reads]
                got = fs._run(fs.aio.storage.read_chunks(reads, bufs))
                assert got == [100_000] * len(reads)
                assert all(bytes(b) == data[(k % 4) * CHUNK + 7:(k % 4) * CHUNK + 100_007] for k, b in enumerate(bufs))
        finally:
            cluster.restart("storage-1")
            cluster.wait_healthy(timeout=60)


def test_chunk_store_checks_crc_of_reads_to_the_end_of_small_chunks(tmp_path):
    """A read that runs to the end of a small chunk (a KV payload after its header) is checked
    against the chunk's CRC32C like a whole read: a corrupted file fails it, it is never served."""
    from openinfra.fs.storage.chunk_store import INLINE_READ_MAX, ChunkStore

    async def go():
        store = ChunkStore(tmp_path / "c", fsync=False)
        try:
            small = random.Random(6).randbytes(128 + 65536)
            big = random.Random(7).randbytes(INLINE_READ_MAX + 4096)
            for ino, content in ((1, small), (2, big)):
                await store.prepare(ino, 0, 1, "write", 0, content)
                await store.commit(ino, 0, 1)
            got, _ = await store.read(1, 0, 128, 65536)
            assert bytes(got) == small[128:]
            for ino, content in ((1, small), (2, big)):  # flip one byte in the middle of each file
                path = tmp_path / "c" / store.get(ino, 0).file
                raw = bytearray(path.read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                path.write_bytes(bytes(raw))
            with pytest.raises(FsError) as e:
                await store.read(1, 0, 128, 65536)
            assert e.value.code == Code.CHECKSUM_MISMATCH
            # a part of a small chunk that stops short of its end, and parts of big chunks, are
            # not checked (reading the whole chunk for them would cost more than the read)
            got, _ = await store.read(1, 0, 0, 128)
            assert bytes(got) == small[:128]
            got, _ = await store.read(2, 0, 4096, INLINE_READ_MAX)
            assert len(got) == INLINE_READ_MAX
        finally:
            store.close()

    asyncio.run(go())



def test_chunk_store_open_files_follow_rewrites_and_removes(tmp_path):
    """The cached chunk descriptors behind ``read_now`` never serve a file that was replaced: a
    new version is a new file, and a chunk removed and written again (the same file name,
    ``<ino>.<idx>.1``) is opened afresh. Bounded by ``OPEN_FILES_MAX``."""
    from openinfra.fs.storage import chunk_store
    from openinfra.fs.storage.chunk_store import ChunkStore

    async def go():
        store = ChunkStore(tmp_path / "c", fsync=False)
        try:
            def now(inode):
                meta = store.get(inode, 0)
                return bytes(store.read_now(meta, 0, meta.length)), meta.version

            a, b, c = (random.Random(s).randbytes(70_000) for s in (1, 2, 3))
            await store.prepare(1, 0, 1, "write", 0, a)
            await store.commit(1, 0, 1)
            assert now(1) == (a, 1)
            await store.prepare(1, 0, 2, "write", 0, b)
            assert now(1) == (a, 1)  # v2 pending: v1 is what is committed
            await store.commit(1, 0, 2)
            assert now(1) == (b, 2)
            await store.remove(1, 0)
            assert store.get(1, 0) is None and not store._files
            await store.prepare(1, 0, 1, "write", 0, c)  # same file name as the first version
            await store.commit(1, 0, 1)
            assert now(1) == (c, 1)
            for ino in range(2, 2 + chunk_store.OPEN_FILES_MAX + 10):
                await store.prepare(ino, 0, 1, "write", 0, b"x")
                await store.commit(ino, 0, 1)
                assert now(ino) == (b"x", 1)
            assert len(store._files) <= chunk_store.OPEN_FILES_MAX
        finally:
            store.close()
        assert not store._files

    asyncio.run(go())


def test_corrupt_small_chunk_is_never_served_by_batched_reads(cluster):
    """Whole-chunk and to-the-end reads of a small chunk through ``read_chunks`` (the KV path)
    are checked against the chunk's CRC32C by storage, also through its cached descriptors."""
    import pathlib

    with cluster.client(retry_s=5) as fs:
        data, node = _file(fs, "/batch-crc.bin", 100_000, 41)
        layout, inode = node["layout"], node["id"]
        reads = [(layout, inode, 0, 0, 100_000), (layout, inode, 0, 128, 100_000 - 128)]
        bufs = [bytearray(100_000), bytearray(100_000 - 128)]
        assert fs._run(fs.aio.storage.read_chunks(reads, bufs)) == [100_000, 100_000 - 128]
        assert bytes(bufs[0]) == data and bytes(bufs[1]) == data[128:]
        files = list(pathlib.Path(cluster.spec.data_dir).glob(f"**/chunks/*/{inode:x}.0.*"))
        assert len(files) == 2  # one per replica
        for p in files:  # flip a byte in place: the open descriptors see it too
            with open(p, "r+b") as f:
                f.seek(50_000)
                byte = f.read(1)
                f.seek(50_000)
                f.write(bytes([byte[0] ^ 0xFF]))
        for one, buf in zip(reads, bufs):
            for into in (None, [buf]):
                with pytest.raises(FsError) as e:
                    fs._run(fs.aio.storage.read_chunks([one], into))
                assert e.value.code == Code.CHECKSUM_MISMATCH


def test_read_rpc_fast_path_and_its_fallbacks(cluster):
    """``read`` is served by ``fast_read`` in the server's read loop for a small committed read
    and by ``rpc_read`` otherwise: the same bytes, versions and errors either way (holes, reads
    past the chunk end, whole-chunk reads, bad arguments, an unknown chain, a corrupt small
    chunk's CRC32C on every replica), and the node serves on after the errors."""
    import pathlib

    with cluster.client(retry_s=5) as fs:
        data, node = _file(fs, "/fast-read.bin", 2 * CHUNK + 5000, 43)
        r = cluster.routing()
        layout, inode = node["layout"], node["id"]
        chain0 = chunk_chain(layout, 0)
        addr = r.address(r.serving(chain0)[0]["node"])

        def rd(**kw):
            return call(addr, "read", {"chain_id": chain0, "inode": inode, **kw})

        for off in (0, 4096, 12345, CHUNK - 4096):  # fast: small reads of a committed chunk
            got = rd(index=0, offset=off, length=4096)
            assert bytes(got["data"]) == data[off:off + 4096] and got["version"] >= 1 and got["chunk_length"] == CHUNK
        assert bytes(rd(index=0, offset=CHUNK - 100, length=4096)["data"]) == data[CHUNK - 100:CHUNK]
        assert bytes(rd(index=0)["data"]) == data[:CHUNK]  # whole chunk (CRC checked)
        assert rd(index=0, offset=CHUNK + 10, length=10)["data"] == b""  # past the chunk end: rpc_read
        assert rd(index=50, offset=0, length=10) == {"data": b"", "version": 0, "chunk_length": 0}  # a hole
        for bad in ({"index": 0, "offset": -1, "length": 10}, {"index": "0", "offset": 0, "length": 10},
                    {"index": 0, "offset": 0, "length": 10, "nope": 1}):
            with pytest.raises(FsError) as e:
                rd(**bad)
            assert e.value.code == Code.RPC_BAD_ARGS
        with pytest.raises(FsError) as e:
            call(addr, "read", {"chain_id": 999, "inode": inode, "index": 0, "offset": 0, "length": 10})
        assert e.value.code == Code.CHAIN_VERSION_MISMATCH
        # A small chunk (the file's last, 5000 bytes) read to its end is CRC-checked on the fast path too.
        last = 2
        chain2 = chunk_chain(layout, last)
        addr2 = r.address(r.serving(chain2)[0]["node"])
        assert bytes(call(addr2, "read", {"chain_id": chain2, "inode": inode, "index": last, "offset": 100,
                                          "length": 4900})["data"]) == data[2 * CHUNK + 100:]
        for p in pathlib.Path(cluster.spec.data_dir).glob(f"**/chunks/*/{inode:x}.{last}.*"):
            with open(p, "r+b") as f:
                f.seek(2000)
                byte = f.read(1)
                f.seek(2000)
                f.write(bytes([byte[0] ^ 0xFF]))
        for t in r.serving(chain2):
            with pytest.raises(FsError) as e:
                call(r.address(t["node"]), "read", {"chain_id": chain2, "inode": inode, "index": last,
                                                    "offset": 100, "length": 4900})
            assert e.value.code == Code.CHECKSUM_MISMATCH
        assert bytes(rd(index=0, offset=0, length=4096)["data"]) == data[:4096]  # still serving
