"""The chunk engine: copy-on-write, CRC32C, atomic commit, crash recovery, dedup records."""

from __future__ import annotations

import asyncio
import os

import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.storage.chunk_store import ChunkStore, checksum

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(coro)


def test_cow_update_commit_and_checksums(tmp_path):
    s = ChunkStore(tmp_path, fsync=True)

    async def main():
        content, crc = await s.prepare(7, 0, 1, "write", 0, b"a" * 1000)
        assert crc == checksum(b"a" * 1000)
        meta = s.get(7, 0)
        assert meta.version == 0 and meta.pending_version == 1
        assert (await s.read(7, 0, 0, 100))[0] == b""     # nothing committed yet
        await s.commit(7, 0, 1)
        old_file = s.get(7, 0).file
        await s.prepare(7, 0, 2, "write", 500, b"b" * 10)
        # the committed file is untouched while version 2 is pending
        assert (tmp_path / old_file).read_bytes() == b"a" * 1000
        assert (await s.read(7, 0, 0, 2000))[0] == b"a" * 1000
        await s.commit(7, 0, 2, ("client", 1, 5, b"result"))
        data, meta = await s.read(7, 0, 0, 2000)
        assert data == b"a" * 500 + b"b" * 10 + b"a" * 490 and meta.version == 2
        assert not (tmp_path / old_file).exists()
        assert s.dedup_get("client", 1) == (5, b"result")
        await s.prepare(7, 0, 3, "truncate", length=10)
        await s.commit(7, 0, 3)
        assert (await s.read(7, 0, 0, 100))[0] == b"a" * 10
        assert s.last_chunk(7) == (0, 10)
        assert await s.remove(7, 0) and s.get(7, 0) is None

    run(main())


def test_crash_before_commit_recovers_to_committed(tmp_path):
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        await s.prepare(1, 3, 1, "write", 0, b"old")
        await s.commit(1, 3, 1)
        await s.prepare(1, 3, 2, "write", 0, b"new")  # "crash" here: never committed
        (tmp_path / "chunks" / "01" / "stray.9.9").write_bytes(b"orphan")  # a file no row points at

    run(main())
    s.db.close()
    s2 = ChunkStore(tmp_path, fsync=False)  # reopen = restart: recovery runs
    meta = s2.get(1, 3)
    assert meta.version == 1 and meta.pending_version is None
    assert run(s2.read(1, 3, 0, 10))[0] == b"old"
    files = sorted(p.name for p in (tmp_path / "chunks").rglob("*") if p.is_file())
    assert files == [os.path.basename(meta.file)]


def test_corruption_is_detected_by_crc(tmp_path):
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        await s.prepare(2, 0, 1, "write", 0, b"x" * 4096)
        await s.commit(2, 0, 1)
        path = tmp_path / s.get(2, 0).file
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(FsError) as ei:
            await s.read(2, 0, 0, 1 << 20)
        assert ei.value.code == Code.CHECKSUM_MISMATCH

    run(main())


def test_replace_and_abort(tmp_path):
    s = ChunkStore(tmp_path, fsync=False)

    async def main():
        await s.replace(5, 1, 4, b"synced")
        meta = s.get(5, 1)
        assert meta.version == 4 and (await s.read(5, 1, 0, 100))[0] == b"synced"
        await s.replace(5, 1, 4, b"other")  # same version, different bytes: still replaced safely
        assert (await s.read(5, 1, 0, 100))[0] == b"other"
        await s.prepare(5, 1, 5, "write", 0, b"zzz")
        s.abort(5, 1)
        assert s.get(5, 1).pending_version is None and (await s.read(5, 1, 0, 100))[0] == b"other"
        assert [m.index for m in s.list(5)] == [1]

    run(main())


def test_concurrent_commits_share_transactions(tmp_path):
    """Group commit: many updates committing at once all land, each exactly once."""
    s = ChunkStore(tmp_path, fsync=True)

    async def one(i):
        await s.prepare(9, i, 1, "write", 0, bytes([i]) * 1000)
        await s.commit(9, i, 1, ("c", i, 1, b"r"))

    async def main():
        await asyncio.gather(*(one(i) for i in range(40)))
        assert [m.index for m in s.list(9)] == list(range(40))
        for i in (0, 17, 39):
            assert (await s.read(9, i, 0, 2000))[0] == bytes([i]) * 1000
            assert s.dedup_get("c", i) == (1, b"r")

    run(main())
    s.close()
