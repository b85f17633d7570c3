"""Block-granular in-place chunk updates: per-block CRC32Cs, a redo record committed with the row,
the ranges written into the committed file only after the commit; crash replay, corruption
detection, concurrent writers and a replica killed mid-update (then resynced)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.storage import chunk_store
from openinfra.fs.storage.chunk_store import BLOCK_SIZE, ChunkStore, checksum, crc_combine

from .conftest import chain_dumps_equal, storage_node_name

KiB, MiB = 1 << 10, 1 << 20


def run(coro):
    return asyncio.run(coro)


def _redo_count(s: ChunkStore) -> int:
    return s.db.execute("SELECT count(*) FROM redo").fetchone()[0]


def _apply(ref: bytearray, ranges) -> None:
    for off, d in ranges:
        if off > len(ref):
            ref += bytes(off - len(ref))
        ref[off:off + len(d)] = d


@pytest.mark.unit
def test_crc_combine_matches_crc32c():
    rng = random.Random(3)
    for _ in range(300):
        a = rng.randbytes(rng.randrange(0, 5000))
        b = rng.randbytes(rng.choice([0, 1, 7, 4096, BLOCK_SIZE, rng.randrange(0, 200_000)]))
        assert crc_combine(checksum(a), checksum(b), len(b)) == checksum(a + b)


@pytest.mark.unit
def test_partial_and_cross_block_writes_in_place(tmp_path):
    """Partial-block, cross-block, overlapping multi-range and growing updates of a 5-block
    chunk: applied in place (same file, a redo record per update), invisible until commit, the
    chunk CRC equal to the CRC32C of the whole new content."""
    s = ChunkStore(tmp_path, fsync=True)
    rng = random.Random(1)

    async def main():
        ref = bytearray(rng.randbytes(5 * BLOCK_SIZE - 1000))
        await s.prepare(4, 0, 1, "write", 0, bytes(ref))
        await s.commit(4, 0, 1)
        rel = s.get(4, 0).file
        cases = [
            [(100, b"a" * 10)],                                             # inside one block
            [(BLOCK_SIZE - 5, b"b" * 10)],                                  # across a block boundary
            [(3 * BLOCK_SIZE - 100, rng.randbytes(BLOCK_SIZE + 200))],      # spans three blocks
            [(10, b"c" * 100), (50, b"d" * 100), (2 * BLOCK_SIZE, b"e")],   # overlapping: in order
            [(len(ref) - 3, b"f" * 10)],                                    # grows the last block
            [(len(ref) + 7 + 70_000, b"g" * 4096)],                        # past the end: a zero gap
        ]
        version = 1
        for ranges in cases:
            version += 1
            old = bytes(ref)
            content, crc = await s.prepare(4, 0, version, "writev", ranges=ranges)
            assert content is None  # in place: nothing copied
            _apply(ref, ranges)
            assert crc == checksum(bytes(ref))
            assert await s.pending_content(4, 0) == bytes(ref)
            assert (await s.read(4, 0, 0, 2 * MiB))[0] == old  # not visible before commit
            assert (tmp_path / rel).read_bytes() == old        # the file is untouched until commit
            await s.commit(4, 0, version)
            data, meta = await s.read(4, 0, 0, 2 * MiB)        # a whole read: CRC-checked
            assert data == bytes(ref) and meta.version == version and meta.file == rel
            assert meta.length == len(ref) and meta.crc == checksum(bytes(ref))
        assert _redo_count(s) == len(cases)
        # A single "write" op goes in place too; a full overwrite and a truncate are copied.
        version += 1
        content, _ = await s.prepare(4, 0, version, "write", 5000, b"h" * 3000)
        assert content is None
        await s.commit(4, 0, version)
        _apply(ref, [(5000, b"h" * 3000)])
        version += 1
        content, _ = await s.prepare(4, 0, version, "truncate", length=100_000)
        assert content == bytes(ref[:100_000])
        await s.commit(4, 0, version)
        assert s.get(4, 0).file != rel and not (tmp_path / rel).exists()
        assert _redo_count(s) == 0  # the copy holds everything: its commit dropped the records
        assert (await s.read(4, 0, 0, MiB))[0] == bytes(ref[:100_000])

    run(main())
    s.close()


@pytest.mark.unit
def test_small_chunks_stay_copy_on_write(tmp_path):
    """A chunk of at most one block is one block: updates copy it (as before)."""
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        await s.prepare(1, 0, 1, "write", 0, b"x" * BLOCK_SIZE)
        await s.commit(1, 0, 1)
        content, _ = await s.prepare(1, 0, 2, "write", 10, b"y")
        assert content is not None
        await s.commit(1, 0, 2)
        assert s.get(1, 0).file.endswith(".2") and _redo_count(s) == 0

    run(main())
    s.close()


@pytest.mark.unit
def test_crash_after_commit_replays_redo_and_before_commit_keeps_old(tmp_path):
    """A crash after the commit but before the in-place bytes reached the disk (simulated by
    putting the old bytes back) replays the redo record on open; a crash before the commit
    leaves the old version. Either way the chunk is whole and passes its CRC."""
    s = ChunkStore(tmp_path, fsync=False)
    rng = random.Random(2)
    base = rng.randbytes(3 * BLOCK_SIZE)
    new1 = [(1000, rng.randbytes(4096)), (2 * BLOCK_SIZE - 10, rng.randbytes(30))]
    new2 = [(500, rng.randbytes(8192))]

    async def main():
        await s.prepare(8, 2, 1, "write", 0, base)
        await s.commit(8, 2, 1)
        await s.prepare(8, 2, 2, "writev", ranges=new1)
        await s.commit(8, 2, 2)
        await s.prepare(8, 2, 3, "writev", ranges=new2)  # "crash" here: never committed

    run(main())
    rel = s.get(8, 2).file
    # the page cache "lost" the in-place bytes of version 2 (the checkpoint never ran)
    raw = bytearray((tmp_path / rel).read_bytes())
    for off, d in new1:
        raw[off:off + len(d)] = base[off:off + len(d)]
    (tmp_path / rel).write_bytes(bytes(raw))
    s._applied.clear()
    s._executor.shutdown()
    s._wdb.close()
    s.db.close()

    s2 = ChunkStore(tmp_path, fsync=False)  # reopen = restart: recovery replays the redo records
    want = bytearray(base)
    _apply(want, new1)
    meta = s2.get(8, 2)
    assert meta.version == 2 and meta.pending_version is None
    assert run(s2.read(8, 2, 0, MiB))[0] == bytes(want)
    assert _redo_count(s2) == 0
    s2.close()


@pytest.mark.unit
def test_corruption_of_one_block_is_detected(tmp_path):
    """A flipped byte in one block: an update touching that block fails with CHECKSUM_MISMATCH
    (its CRC would otherwise cover the bad byte); an update elsewhere succeeds and whole reads
    still fail (the chunk CRC is combined from the stored block CRCs, not re-read)."""
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        await s.prepare(3, 0, 1, "write", 0, random.Random(4).randbytes(4 * BLOCK_SIZE))
        await s.commit(3, 0, 1)
        path = tmp_path / s.get(3, 0).file
        with open(path, "r+b") as f:
            f.seek(2 * BLOCK_SIZE + 77)
            b = f.read(1)
            f.seek(2 * BLOCK_SIZE + 77)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(FsError) as ei:
            await s.prepare(3, 0, 2, "write", 2 * BLOCK_SIZE + 10, b"z" * 10)
        assert ei.value.code == Code.CHECKSUM_MISMATCH
        assert s.get(3, 0).pending_version is None
        content, _ = await s.prepare(3, 0, 2, "write", 10, b"z" * 10)  # block 0: fine
        assert content is None
        await s.commit(3, 0, 2)
        with pytest.raises(FsError) as ei:
            await s.read(3, 0, 0, MiB)
        assert ei.value.code == Code.CHECKSUM_MISMATCH

    run(main())
    s.close()


@pytest.mark.unit
def test_checkpoint_drops_redo_records(tmp_path, monkeypatch):
    """Applied records are synced and deleted in batches (by count, or after CHECKPOINT_S)."""
    monkeypatch.setattr(chunk_store, "CHECKPOINT_RECORDS", 4)
    monkeypatch.setattr(chunk_store, "CHECKPOINT_S", 0.05)
    s = ChunkStore(tmp_path, fsync=True)

    async def main():
        await s.prepare(6, 0, 1, "write", 0, bytes(2 * BLOCK_SIZE))
        await s.commit(6, 0, 1)
        for v in range(2, 12):
            await s.prepare(6, 0, v, "write", v * 100, bytes([v]) * 50)
            await s.commit(6, 0, v)
        for _ in range(200):  # bounded wait for the timer's checkpoint
            if _redo_count(s) == 0:
                break
            await asyncio.sleep(0.02)
        assert _redo_count(s) == 0 and not s._applied

    run(main())
    s.close()


@pytest.mark.unit
def test_commit_waits_for_threaded_reads_of_the_file(tmp_path):
    """A big (worker-thread) read in flight when an in-place update commits returns the old bytes
    whole: the update waits for it."""
    s = ChunkStore(tmp_path, fsync=False)
    old = random.Random(5).randbytes(MiB)

    async def main():
        await s.prepare(2, 0, 1, "write", 0, old)
        await s.commit(2, 0, 1)
        for v in range(2, 8):
            reader = asyncio.ensure_future(s.read(2, 0, 0, MiB))
            await asyncio.sleep(0)  # the read is in its worker thread now
            await s.prepare(2, 0, v, "write", 4096 * v, b"n" * 4096)
            await s.commit(2, 0, v)
            data, meta = await reader
            assert meta.version == v - 1 and checksum(data) == meta.crc

    run(main())
    s.close()


@pytest.mark.unit
def test_threaded_read_started_during_the_commit_transaction_sees_old_bytes(tmp_path, monkeypatch):
    """A big read that starts while an in-place update's transaction is being committed (the row
    cache still shows the old version) must not see the ranges written into the file: the flusher
    writes them only after the file's threaded reads (and a resync's whole-file read) finished."""
    s = ChunkStore(tmp_path, fsync=False)
    old = random.Random(6).randbytes(MiB)
    apply, read_file = s._apply, s._read_file

    def slow_apply(stmts):
        time.sleep(0.2)
        return apply(stmts)

    def slow_read(rel, offset=0, length=-1):
        time.sleep(0.3)  # the transaction has committed by now
        return read_file(rel, offset, length)

    async def main():
        await s.prepare(2, 0, 1, "write", 0, old)
        await s.commit(2, 0, 1)
        monkeypatch.setattr(s, "_apply", slow_apply)
        monkeypatch.setattr(s, "_read_file", slow_read)
        for v, reading in ((2, lambda: s.read(2, 0, 0, MiB)), (3, lambda: s.committed_content(2, 0))):
            await s.prepare(2, 0, v, "write", 4096, bytes([v]) * 4096)
            commit = asyncio.ensure_future(s.commit(2, 0, v))
            await asyncio.sleep(0.05)  # inside the slow transaction
            data, meta = await reading()
            await commit
            assert meta.version == v - 1 and checksum(data) == meta.crc
            assert bytes(data[4096:8192]) == (old[4096:8192] if v == 2 else bytes([2]) * 4096)
        data, meta = await s.read(2, 0, 0, MiB)
        assert meta.version == 3 and bytes(data[4096:8192]) == bytes([3]) * 4096

    run(main())
    s.close()


# --- through a cluster -----------------------------------------------------------------------------


@pytest.mark.service
@pytest.mark.timeout(240)
def test_concurrent_small_writers_read_after_write(make_cluster):
    """Four threads write 4 KiB pieces (some crossing 64 KiB blocks) into the same chunks at once;
    every write reads back right after it returned, all land, and the replicas agree."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    size = 2 * MiB
    with cluster.client(retry_s=30) as fs:
        base = random.Random(9).randbytes(size)
        fs.write_bytes("/conc", base)
        # disjoint 4 KiB pieces: inside blocks, and across every 64 KiB block boundary
        pieces = [j * BLOCK_SIZE + 4 * KiB + 8 * KiB * i for j in range(size // BLOCK_SIZE) for i in range(7)]
        pieces += [j * BLOCK_SIZE - 2 * KiB for j in range(1, size // BLOCK_SIZE)]
        random.Random(10).shuffle(pieces)
        mine = [pieces[i::4][:40] for i in range(4)]
        errors: list[BaseException] = []

        def writer(w: int):
            try:
                with fs.open("/conc", "r+b") as f:
                    for off in mine[w]:
                        piece = bytes([w + 1]) * 4096
                        f.pwrite(piece, off)
                        if f.pread(4096, off) != piece:
                            raise AssertionError(f"writer {w}: read-after-write at {off} differs")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        want = bytearray(base)
        for w in range(4):
            for off in mine[w]:
                want[off:off + 4096] = bytes([w + 1]) * 4096
        assert fs.read_bytes("/conc") == bytes(want)
        chain_dumps_equal(cluster, fs.stat("/conc").layout["chains"][0])


@pytest.mark.service
@pytest.mark.timeout(240)
def test_replica_killed_mid_inplace_updates_is_resynced(make_cluster):
    """SIGKILL of the middle replica while small in-place updates stream in: every acknowledged
    update survives, the restarted replica (which replays its redo records on open) is resynced,
    and all replicas end equal."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    size = 3 * MiB
    with cluster.client(retry_s=60) as fs:
        want = bytearray(random.Random(11).randbytes(size))
        fs.write_bytes("/inplace", bytes(want))
        st = fs.stat("/inplace")
        chain_id = st.layout["chains"][0]
        from openinfra.fs import TargetState

        r0 = cluster.routing()
        middle = r0.chain(chain_id)["targets"][1]
        middle_name = storage_node_name(cluster, middle["node"])
        rng = random.Random(12)
        # 600 updates: the kill lands after 20 acks, with seconds of updates still to go
        updates = [(rng.randrange(0, size - 5000), rng.randbytes(rng.choice([1, 512, 4096, 5000])))
                   for _ in range(600)]
        acked: list[int] = []
        errors: list[BaseException] = []
        f = fs.open("/inplace", "r+b")

        def writer():
            try:
                for i, (off, d) in enumerate(updates):
                    f.pwrite(d, off)
                    acked.append(i)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 20 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.kill(middle_name)
        acked_at_kill = len(acked)                         # read once the process is gone
        assert 20 <= acked_at_kill < len(updates), (
            f"{acked_at_kill} of {len(updates)} updates acknowledged when the kill landed: not mid-write ({errors})")
        cluster.wait_for(lambda r: any(x["id"] == middle["id"] and x["state"] == TargetState.OFFLINE
                                       for x in r.chain(chain_id)["targets"]), 30, "middle target offline")
        t.join(120)
        assert not errors, errors
        f.close()
        assert acked == list(range(len(updates)))
        for off, d in updates:
            want[off:off + len(d)] = d
        assert fs.read_bytes("/inplace") == bytes(want)
        cluster.restart(middle_name)
        cluster.wait_healthy(60)
        chain_dumps_equal(cluster, chain_id)
        assert fs.read_bytes("/inplace") == bytes(want)
        # and it keeps taking in-place updates on every replica after the resync
        with fs.open("/inplace", "r+b") as g:
            g.pwrite(b"after" * 100, 123_456)
        want[123_456:123_456 + 500] = b"after" * 100
        assert fs.read_bytes("/inplace") == bytes(want)
        chain_dumps_equal(cluster, chain_id)


@pytest.mark.unit
def test_checkpoint_deletes_only_the_records_it_synced(tmp_path):
    """A chunk removed and written again reuses (inode, index, version): a checkpoint that synced
    the old incarnation's record must not delete the new one's (each record has its own token)."""
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        for _ in range(2):
            await s.prepare(5, 0, 1, "write", 0, bytes(2 * BLOCK_SIZE))
            await s.commit(5, 0, 1)
            await s.prepare(5, 0, 2, "write", 100, b"x" * 100)
            await s.commit(5, 0, 2)
            if _ == 0:
                synced, s._applied = list(s._applied), []  # a checkpoint's batch, its sync "running"
                await s.remove(5, 0)
        assert _redo_count(s) == 1
        await s._write([(chunk_store._DELETE_REDO, a[:4]) for a in synced], [])  # that batch's delete
        assert _redo_count(s) == 1  # the new incarnation's record is still there

    run(main())
    s.close()


@pytest.mark.unit
def test_overlapped_copy_write_commit_abort_and_failure(tmp_path, monkeypatch):
    """``prepare(overlap=True)`` (a chain member forwarding while its copy is written): commit
    waits for the file, an abort during the write removes it once written (no orphan, no race
    with a retry of the same version), and a failed write fails the commit, leaving the old
    version committed."""
    s = ChunkStore(tmp_path, fsync=True)

    def files():
        return sorted(p.name for p in (tmp_path / "chunks").rglob("*") if p.is_file())

    async def main():
        content, crc = await s.prepare(9, 0, 1, "write", 0, b"a" * 300_000, overlap=True)
        assert crc == checksum(b"a" * 300_000)
        await s.commit(9, 0, 1)
        assert (await s.read(9, 0, 0, MiB))[0] == b"a" * 300_000
        await s.prepare(9, 0, 2, "write", 0, b"b" * 300_000, overlap=True)
        s.abort(9, 0)  # the write may still be running: the file goes once it is done
        await s.prepare(9, 0, 2, "write", 0, b"c" * 300_000, overlap=True)  # a retry, same file name
        await s.commit(9, 0, 2)
        assert (await s.read(9, 0, 0, MiB))[0] == b"c" * 300_000
        for _ in range(100):  # bounded: the aborted write's cleanup callback
            if not s._writing:
                break
            await asyncio.sleep(0.01)
        assert files() == [os.path.basename(s.get(9, 0).file)]

        def broken(rel, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(s, "_write_file", broken)
        await s.prepare(9, 0, 3, "write", 0, b"d" * 300_000, overlap=True)
        with pytest.raises(OSError):
            await s.commit(9, 0, 3)
        s.abort(9, 0)
        meta = s.get(9, 0)
        assert meta.version == 2 and meta.pending_version is None
        assert (await s.read(9, 0, 0, MiB))[0] == b"c" * 300_000

    run(main())
    s.close()


@pytest.mark.unit
def test_whole_4k_pieces_need_no_old_bytes(tmp_path):
    """CRCs are kept per 4 KiB piece: an update covering whole pieces reads nothing of the old
    file (no cold read for aligned 4 KiB writes), and the chunk CRC is still exact; a partly
    covered piece is read (and checked)."""
    s = ChunkStore(tmp_path, fsync=False)
    reads: list[list] = []
    orig = s._read_old

    async def counting(rel, spans):
        reads.append(list(spans))
        return await orig(rel, spans)

    s._read_old = counting
    rng = random.Random(13)

    async def main():
        ref = bytearray(rng.randbytes(MiB))
        await s.prepare(2, 1, 1, "write", 0, bytes(ref))
        await s.commit(2, 1, 1)
        ranges = [(4096 * k, rng.randbytes(4096)) for k in (3, 17, 18, 200)]
        _, crc = await s.prepare(2, 1, 2, "writev", ranges=ranges)
        await s.commit(2, 1, 2)
        _apply(ref, ranges)
        assert crc == checksum(bytes(ref)) and reads == [[]]
        _, crc = await s.prepare(2, 1, 3, "write", 4096 * 5 + 100, b"p" * 5000)  # partly covers 2 pieces
        await s.commit(2, 1, 3)
        _apply(ref, [(4096 * 5 + 100, b"p" * 5000)])
        assert crc == checksum(bytes(ref)) and reads[-1] == [(4096 * 5, 4096 * 6), (4096 * 6, 4096 * 7)]
        assert (await s.read(2, 1, 0, MiB))[0] == bytes(ref)

    run(main())
    s.close()
