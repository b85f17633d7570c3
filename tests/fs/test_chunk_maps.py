"""Whole small chunks served from cached read-only maps of their files (``ChunkStore.read_now``):
a view handed out never changes under its holder (a reply still in a transport's buffer), a
chunk rewritten or removed while its map is cached reads the new bytes or a clean miss, a corrupt
mapped chunk still fails its CRC32C, and a file cut short behind the store's back is never
touched through its map."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.storage import chunk_store
from openinfra.fs.storage.chunk_store import ChunkStore

pytestmark = pytest.mark.unit

KV = 128 + 65536  # a KV block's chunk: header + payload (longer than one block: in-place capable)


def _store(tmp_path) -> ChunkStore:
    return ChunkStore(tmp_path / "c", fsync=False)


async def _put(store: ChunkStore, ino: int, version: int, content: bytes, index: int = 0) -> None:
    await store.prepare(ino, index, version, "write", 0, content)
    await store.commit(ino, index, version)


def _now(store: ChunkStore, ino: int, offset: int = 0, length: int | None = None):
    meta = store.get(ino, 0)
    return store.read_now(meta, offset, meta.length if length is None else length)


def _mapped(store: ChunkStore, rel: str) -> bool:
    ent = store._files.get(rel)
    return ent is not None and type(ent) is not int


def test_whole_reads_come_from_a_cached_map_and_follow_rewrites_and_removes(tmp_path, monkeypatch):
    monkeypatch.setattr(chunk_store, "MAP_READS", True)

    async def go():
        store = _store(tmp_path)
        try:
            a, b, c = (random.Random(s).randbytes(KV) for s in (1, 2, 3))
            await _put(store, 1, 1, a)
            rel1 = store.get(1, 0).file
            held = _now(store, 1)  # a view kept, as a reply waiting in a transport would
            assert bytes(held) == a and _mapped(store, rel1)
            assert bytes(_now(store, 1, 128, 65536)) == a[128:]  # to the end: served from the map too
            assert bytes(_now(store, 1, 0, 128)) == a[:128]       # a part, from the cached map
            # a new version (a new file): the new bytes, the held view keeps the old ones
            await _put(store, 1, 2, b)
            assert bytes(_now(store, 1)) == b and bytes(held) == a
            assert rel1 not in store._files
            # removed: a clean miss; written again under the first file's name: its new bytes
            await store.remove(1, 0)
            assert store.get(1, 0) is None and not store._files
            await _put(store, 1, 1, c)
            assert store.get(1, 0).file == rel1
            assert bytes(_now(store, 1)) == c and bytes(held) == a
        finally:
            store.close()

    asyncio.run(go())


def test_inplace_update_of_a_mapped_chunk(tmp_path, monkeypatch):
    """A small update of a mapped chunk goes in place only once no view of the map is out;
    while one is, it is copied (a new file), so the held bytes stay as they were."""
    monkeypatch.setattr(chunk_store, "MAP_READS", True)

    async def go():
        store = _store(tmp_path)
        try:
            a = random.Random(4).randbytes(KV)
            await _put(store, 1, 1, a)
            rel = store.get(1, 0).file
            held = _now(store, 1)
            assert _mapped(store, rel)
            # views out: the update is copied (new file), the view still holds v1's bytes
            content, _ = await store.prepare(1, 0, 2, "write", 100, b"X" * 4096)
            assert content is not None  # copy-on-write
            assert not _mapped(store, rel)
            assert bytes(_now(store, 1)) == a  # v2 pending: v1 is served (through a descriptor)
            await store.commit(1, 0, 2)
            v2 = a[:100] + b"X" * 4096 + a[4196:]
            assert store.get(1, 0).file != rel and bytes(held) == a
            assert bytes(_now(store, 1)) == v2
            rel2 = store.get(1, 0).file
            assert _mapped(store, rel2)
            # no views out: in place (same file), then served from a fresh map
            content, _ = await store.prepare(1, 0, 3, "write", 70_000, b"Y" * 5000)  # grows the file
            assert content is None
            assert rel2 not in store._files
            assert bytes(_now(store, 1)) == v2  # v3 pending: read through a descriptor, no map
            assert not _mapped(store, rel2)
            await store.commit(1, 0, 3)
            v3 = v2 + bytes(70_000 - len(v2)) + b"Y" * 5000
            meta = store.get(1, 0)
            assert meta.file == rel2 and meta.length == len(v3)
            assert bytes(_now(store, 1)) == v3 and _mapped(store, rel2)
        finally:
            store.close()

    asyncio.run(go())


def test_views_of_maps_dropped_from_the_cache_stay_intact(tmp_path, monkeypatch):
    """Maps evicted (LRU bound) or dropped while views are out stay mapped until the views go,
    then are unmapped; an in-place update waits for none of them (copies instead)."""
    monkeypatch.setattr(chunk_store, "MAP_READS", True)

    async def go():
        store = _store(tmp_path)
        store._files_max = 16
        try:
            datas = {ino: random.Random(ino).randbytes(KV) for ino in range(1, 41)}
            for ino, d in datas.items():
                await _put(store, ino, 1, d)
            held = {ino: _now(store, ino) for ino in datas}
            assert len(store._files) <= 16 and store._exported
            for ino, d in datas.items():
                assert bytes(held[ino]) == d
            # an evicted map with a view out keeps its file copy-on-write
            content, _ = await store.prepare(1, 0, 2, "write", 0, b"Z" * 100)
            assert content is not None
            await store.commit(1, 0, 2)
            assert bytes(held[1]) == datas[1]
            held.clear()
            store._sweep_exported()
            assert not store._exported
            content, _ = await store.prepare(2, 0, 2, "write", 0, b"Z" * 100)
            assert content is None  # no views left: in place
            await store.commit(2, 0, 2)
            assert bytes(_now(store, 2)) == b"Z" * 100 + datas[2][100:]
        finally:
            store.close()

    asyncio.run(go())


def test_corrupt_or_cut_short_mapped_chunks(tmp_path, monkeypatch):
    """A byte flipped in a mapped file is seen through the map: CHECKSUM_MISMATCH. A file cut
    short behind the store's back is not touched through its map (that would be SIGBUS): the
    read goes through ``pread`` and fails its CRC32C."""
    monkeypatch.setattr(chunk_store, "MAP_READS", True)

    async def go():
        store = _store(tmp_path)
        try:
            a, b = (random.Random(s).randbytes(KV) for s in (8, 9))
            await _put(store, 1, 1, a)
            await _put(store, 2, 1, b)
            assert bytes(_now(store, 1)) == a and bytes(_now(store, 2)) == b
            p1 = tmp_path / "c" / store.get(1, 0).file
            with open(p1, "r+b") as f:
                f.seek(KV // 2)
                byte = f.read(1)
                f.seek(KV // 2)
                f.write(bytes([byte[0] ^ 0xFF]))
            for off in (0, 128):
                with pytest.raises(FsError) as e:
                    _now(store, 1, off, KV - off)
                assert e.value.code == Code.CHECKSUM_MISMATCH
            p2 = tmp_path / "c" / store.get(2, 0).file
            os.truncate(p2, 1000)
            with pytest.raises(FsError) as e:
                _now(store, 2)
            assert e.value.code == Code.CHECKSUM_MISMATCH
            assert bytes(_now(store, 2, 0, 100)) == b[:100]  # a part inside what is left
        finally:
            store.close()

    asyncio.run(go())


def test_map_reads_off_serves_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(chunk_store, "MAP_READS", False)

    async def go():
        store = _store(tmp_path)
        try:
            a = random.Random(5).randbytes(KV)
            await _put(store, 1, 1, a)
            assert bytes(_now(store, 1)) == a and bytes(_now(store, 1, 128, 65536)) == a[128:]
            assert all(type(e) is int for e in store._files.values())
        finally:
            store.close()

    asyncio.run(go())


def test_fast_batch_read_matches_the_usual_path(tmp_path):
    """``StorageNode.fast_batch_read`` (served in the read loop) returns what the usual packed
    ``batch_read`` returns for a batch of small committed reads, a corrupt chunk as a per-read
    CHECKSUM_MISMATCH, and SLOW (for the usual path) for anything that needs waiting or is
    malformed: a hole, a pending version, a target not serving, an unknown chain, bad items."""
    import time

    import msgpack

    from openinfra.fs.routing import Routing
    from openinfra.fs.rpc import SLOW, BlobPieces
    from openinfra.fs.storage.service import StorageConfig, StorageNode

    async def go():
        node = StorageNode(StorageConfig(node_id=1, targets={101: str(tmp_path / "t")}, mgmtd=["127.0.0.1:1"],
                                         fsync=False))
        node._acked_version, node._last_ok = 1, time.monotonic() + 3600  # not fenced
        node.routing = Routing({"version": 1, "nodes": {}, "tables": {},
                                "chains": {7: {"id": 7, "version": 1, "targets": [{"id": 101, "node": 1, "state": "serving"}]},
                                           8: {"id": 8, "version": 1, "targets": [{"id": 101, "node": 1, "state": "syncing"}]}}})
        store = node.stores[101]
        try:
            blocks = {ino: random.Random(ino).randbytes(KV) for ino in range(1, 6)}
            for ino, d in blocks.items():
                await _put(store, ino, 1, d)

            def flat(res):
                return b"".join(bytes(p) for p in res["data"].pieces), msgpack.unpackb(res["results"])

            reads = [[7, ino, 0, 128, 65536] for ino in blocks] + [[7, 1, 0, 0, 4096], [7, 2, 0, 0, KV]]
            fast = node.fast_batch_read(msgpack.packb(reads), packed=True)
            assert type(fast["data"]) is BlobPieces
            usual = await node.rpc_batch_read(reads, packed=True)
            assert flat(fast) == flat(usual)
            data, results = flat(fast)
            assert data == b"".join(blocks[i][128:] for i in blocks) + blocks[1][:4096] + blocks[2]
            assert results[0] == [65536, 1, KV]
            # a corrupt chunk: a per-read error, the others served, on both paths
            p = tmp_path / "t" / store.get(3, 0).file
            raw = bytearray(p.read_bytes())
            raw[1000] ^= 0xFF
            p.write_bytes(bytes(raw))
            fast = node.fast_batch_read(reads, packed=True)
            assert flat(fast) == flat(await node.rpc_batch_read(reads, packed=True))
            assert flat(fast)[1][2][0] == Code.CHECKSUM_MISMATCH
            # everything that waits or is malformed: SLOW
            await store.prepare(4, 0, 2, "write", 0, b"x" * KV)  # a pending version
            for bad in ([[7, 9, 0, 0, 10]],            # a hole
                        [[7, 4, 0, 0, 10]],            # pending version
                        [[8, 1, 0, 0, 10]],            # the target is not serving that chain
                        [[9, 1, 0, 0, 10]],            # unknown chain
                        [[7, 1, 0, -1, 10]], [[7, "1", 0, 0, 10]], [[7, 1, 0]], ["x"]):
                assert node.fast_batch_read(bad, packed=True) is SLOW
                assert node.fast_batch_read(reads[:1] + bad, packed=True) is SLOW
            assert node.fast_batch_read(b"\xc1", packed=True) is SLOW
            assert node.fast_batch_read(reads, packed=False) is SLOW
            node._last_ok = 0.0  # fenced: an error reply, as the usual path gives
            with pytest.raises(FsError) as e:
                node.fast_batch_read(reads, packed=True)
            assert e.value.code == Code.FENCED
        finally:
            for s in node.stores.values():
                s.close()

    asyncio.run(go())
