"""Sequential read-ahead of the native client (and through the FUSE mount), against real clusters.

A handle that reads on from where its last read ended fetches the next blocks in the background
and serves later reads from them; random reads fetch nothing ahead; a write or truncate through
the handle (FUSE: through any handle of the inode in the mount) drops what was fetched; a storage
node killed under a background fetch makes the read fall back (replicas left) or fail cleanly.
FUSE tests skip with the reason where /dev/fuse is missing or mounting is not permitted here.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from tests.fs.clients.fuse_mount import fuse_mount

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """2 storage nodes x 2 targets, replication 2, 1 MiB chunks (read-ahead blocks are chunks)."""
    from openinfra.fs import ClusterSpec, LocalCluster
    from tests.fs.conftest import FAST

    spec = ClusterSpec(str(tmp_path_factory.mktemp("fs-readahead")), storage_nodes=2, targets_per_node=2,
                       replication=2, chunk_size=MiB, **FAST)
    c = LocalCluster.start(spec, timeout=60)
    yield c
    c.stop()


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _aio(cluster, body):
    """Run ``body(client)`` with an AsyncClient of ``cluster`` on a fresh event loop."""
    from openinfra.fs import AsyncClient

    async def main():
        c = await AsyncClient(cluster.mgmtd_addresses, retry_s=20.0).connect()
        try:
            return await body(c)
        finally:
            await c.close()

    return asyncio.run(main())


def test_sequential_reads_equal_the_data_and_fetch_ahead(cluster):
    data = _data(5 * MiB + 12345, 1)

    async def body(c):
        await c.write_bytes("/seq.bin", data)
        for io in (MiB, 256 << 10, 4096 * 3 + 1, 3 * MiB):
            f = await c.open("/seq.bin", "rb")
            try:
                got, off = [], 0
                while True:
                    b = await f.read(io)
                    if not b:
                        break
                    got.append(b)
                    off += len(b)
                    if off < len(data) - 3 * MiB:  # the window runs ahead of the reader
                        assert any(k * f._ra_blk >= off for k in f._ra), (io, off, sorted(f._ra))
                    assert len(f._ra) <= (io // f._ra_blk + 2) + f._ra_ahead  # bounded
                assert b"".join(got) == data, io
            finally:
                await f.close()
            assert f._ra == {}  # close drops (and cancels) the window
        # pread_into follows the same path
        f = await c.open("/seq.bin", "rb")
        try:
            buf = bytearray(len(data))
            for off in range(0, len(data), MiB):
                n = await f.pread_into(memoryview(buf)[off:off + MiB], off)
                assert n == min(MiB, len(data) - off)
            assert bytes(buf) == data
        finally:
            await f.close()

    _aio(cluster, body)


def test_random_reads_fetch_nothing_ahead(cluster):
    data = _data(6 * MiB, 2)

    async def body(c):
        await c.write_bytes("/rand.bin", data)
        f = await c.open("/rand.bin", "rb")
        try:
            rng = random.Random(3)
            last_end = 0
            for _ in range(200):
                off = rng.randrange(1, len(data) // 4096) * 4096
                if abs(off - last_end) <= 512 << 10:  # near the last read: counts as sequential
                    continue
                assert await f.pread(4096, off) == data[off:off + 4096]
                last_end = off + 4096
                assert f._ra == {}, off
            # a sequential run after random reads starts fetching; a jump drops it
            assert await f.pread(4096, 0) == data[:4096]
            assert await f.pread(4096, 4096) == data[4096:8192]
            assert f._ra
            assert await f.pread(4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
            assert f._ra == {}
        finally:
            await f.close()

    _aio(cluster, body)


def test_write_and_truncate_through_the_handle_drop_fetched_bytes(cluster):
    data = bytearray(_data(4 * MiB, 4))

    async def body(c):
        await c.write_bytes("/rw.bin", bytes(data))
        f = await c.open("/rw.bin", "r+b")
        try:
            assert await f.pread(MiB, 0) == data[:MiB]
            await asyncio.sleep(0.2)  # the blocks ahead arrive
            assert f._ra
            new = _data(5000, 5)
            await f.pwrite(new, MiB + 100)
            data[MiB + 100:MiB + 5100] = new
            assert f._ra == {}
            assert await f.pread(MiB, MiB) == data[MiB:2 * MiB]  # sequential: from the new bytes
            await asyncio.sleep(0.2)
            await f.pwritev([(2 * MiB + 7, b"x" * 10), (3 * MiB - 1, b"yz")])
            data[2 * MiB + 7:2 * MiB + 17] = b"x" * 10
            data[3 * MiB - 1:3 * MiB + 1] = b"yz"
            assert await f.pread(MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
            await asyncio.sleep(0.2)
            assert f._ra
            await f.truncate(3 * MiB + 10)
            assert f._ra == {}
            await f.pwrite(b"\0" * 0, 0)
            await f.truncate(4 * MiB)  # regrown: the tail reads as zeros now
            expect = bytes(data[3 * MiB:3 * MiB + 10]) + bytes(MiB - 10)
            assert await f.pread(MiB, 3 * MiB) == expect
        finally:
            await f.close()

    _aio(cluster, body)


def test_write_through_another_handle_of_the_client_drops_fetched_bytes(cluster):
    data = bytearray(_data(3 * MiB, 8))

    async def body(c):
        await c.write_bytes("/two.bin", bytes(data))
        r = await c.open("/two.bin", "rb")
        w = await c.open("/two.bin", "r+b")
        try:
            assert await r.pread(MiB, 0) == data[:MiB]
            await asyncio.sleep(0.2)
            assert r._ra
            await w.pwrite(b"other handle", MiB + 5)
            data[MiB + 5:MiB + 17] = b"other handle"
            assert r._ra == {}
            assert await r.pread(MiB, MiB) == data[MiB:2 * MiB]
        finally:
            await w.close()
            await r.close()
        assert not c._reading_ahead

    _aio(cluster, body)


def test_fuse_read_after_write_on_another_handle_sees_new_bytes(cluster):
    data = bytearray(_data(4 * MiB, 6))
    with fuse_mount(cluster, prefix="openinfra-ra-") as mnt:
        path = os.path.join(mnt, "x.bin")
        with open(path, "wb") as f:
            f.write(data)
        ra = os.open(path, os.O_RDONLY)
        try:
            assert os.read(ra, MiB) == data[:MiB]  # sequential: the mount fetches the next blocks
            time.sleep(0.3)
            wfd = os.open(path, os.O_WRONLY)
            try:
                # partial pages: the kernel must ask the mount for the rest of them
                for off in (MiB + 4096 * 3 + 11, 2 * MiB - 5, 2 * MiB + 777):
                    os.pwrite(wfd, b"NEW!" * 7, off)
                    data[off:off + 28] = b"NEW!" * 7
                assert os.pread(ra, 28, MiB + 4096 * 3 + 11) == b"NEW!" * 7  # dirty in the write-back cache
                os.fsync(wfd)  # flushed: only storage holds them now
                os.posix_fadvise(ra, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's clean pages: gone
            finally:
                os.close(wfd)
            assert os.read(ra, MiB) == data[MiB:2 * MiB]
            assert os.read(ra, 2 * MiB) == data[2 * MiB:]
            # truncate through another handle
            time.sleep(0.3)
            os.truncate(path, 3 * MiB + 1)
            os.posix_fadvise(ra, 0, 0, os.POSIX_FADV_DONTNEED)
            os.lseek(ra, 0, os.SEEK_SET)
            assert os.read(ra, 8 * MiB) == data[:3 * MiB + 1]
        finally:
            os.close(ra)


def test_storage_killed_under_a_background_fetch(make_cluster):
    """Replicas left: the read falls back and returns the data; none left: it fails cleanly (an
    error, no hang) and the handle and the client keep working."""
    from openinfra.fs.errors import FsError

    cluster = make_cluster(storage_nodes=2, targets_per_node=1, replication=2, chunk_size=MiB)
    data = _data(8 * MiB, 7)

    async def body(c):
        await c.write_bytes("/k.bin", data)
        f = await c.open("/k.bin", "rb")
        try:
            assert await f.pread(MiB, 0) == data[:MiB]
            cluster.kill("storage-1")  # under the fetches of the next blocks
            off = MiB
            while off < len(data):
                assert await f.pread(MiB, off) == data[off:off + MiB], off
                off += MiB
        finally:
            await f.close()

    _aio(cluster, body)

    cluster2 = make_cluster(storage_nodes=2, targets_per_node=1, replication=1, chunk_size=MiB, stripe=2)

    async def body2(c):
        await c.write_bytes("/k.bin", data)
        f = await c.open("/k.bin", "rb")
        try:
            assert await f.pread(MiB, 0) == data[:MiB]
            cluster2.kill("storage-2")
            t0 = time.monotonic()
            failed = 0
            for off in range(MiB, len(data), MiB):
                try:
                    got = await f.pread(MiB, off)
                except (FsError, OSError):
                    failed += 1
                else:
                    assert got == data[off:off + MiB]
            assert failed, "every chunk read back with a storage node of a 1-replica cluster dead"
            assert time.monotonic() - t0 < 60
        finally:
            await f.close()

    from openinfra.fs import AsyncClient

    async def main():
        c = await AsyncClient(cluster2.mgmtd_addresses, retry_s=2.0).connect()
        try:
            await body2(c)
        finally:
            await c.close()

    asyncio.run(main())
