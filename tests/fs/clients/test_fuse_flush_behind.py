"""The FUSE mount's background flush of sequential runs (write-back cache): a run of
``write_buffer`` bytes goes to storage while the writer goes on; reads, sizes, truncates and
fsync see it in order; a failed background flush keeps the bytes (under newer writes) and the
next fsync reports it. Real clusters on loopback; the unit tests cover the range moves."""

from __future__ import annotations

import errno
import os
import random
import signal
import time

import pytest

from openinfra.fs.clients.writeback import DirtyRanges

from tests.fs.clients.fuse_mount import fuse_mount
from tests.fs.conftest import FAST

MiB = 1 << 20


def _model(r: DirtyRanges) -> dict[int, int]:
    return {s + k: b[k] for s, b in r.ranges() for k in range(len(b))}


@pytest.mark.unit
def test_take_and_add_under_keep_newer_bytes():
    """``take`` moves exactly the bytes of a span out; ``add_under`` puts older bytes back only
    where nothing newer is dirty (random cases against a byte model)."""
    rng = random.Random(7)
    for _ in range(300):
        r = DirtyRanges()
        for _ in range(rng.randrange(1, 8)):
            r.add(rng.randrange(0, 400), bytes([rng.randrange(1, 250)]) * rng.randrange(1, 60))
        before = _model(r)
        lo, hi = sorted(rng.sample(range(0, 480), 2))
        taken = r.take(lo, hi)
        assert _model(taken) == {k: v for k, v in before.items() if lo <= k < hi}
        assert _model(r) == {k: v for k, v in before.items() if not lo <= k < hi}
        assert taken.nbytes == len(_model(taken)) and r.nbytes == len(_model(r))
        newer = {}
        for _ in range(rng.randrange(0, 4)):  # writes made while the span was in flight
            off, n = rng.randrange(0, 480), rng.randrange(1, 40)
            r.add(off, b"\xff" * n)
            newer.update({off + k: 0xFF for k in range(n)})
        want = {**_model(taken), **_model(r)}
        for off, b in taken.ranges():
            r.add_under(off, b)
        assert _model(r) == want
        assert r.nbytes == len(want)
        starts = r.starts
        assert all(starts[i] + len(r.bufs[i]) < starts[i + 1] for i in range(len(starts) - 1))  # merged


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster

    spec = ClusterSpec(str(tmp_path_factory.mktemp("fs-flush-behind")), storage_nodes=2, targets_per_node=2,
                       replication=2, chunk_size=MiB, **FAST)
    c = LocalCluster.start(spec, timeout=60)
    yield c
    c.stop()


@pytest.mark.service
@pytest.mark.timeout(240)
def test_sequential_runs_flush_behind_and_read_back(cluster, tmp_path):
    """A 20 MiB file written in 256 KiB pieces (background flushes every 4 MiB run), with reads
    of just-written and in-flight bytes, a size check and an overwrite of an in-flight span
    between the writes: the mount reads its writes at once, and after close the native client
    reads the same bytes."""
    rng = random.Random(3)
    data = bytearray(rng.randbytes(20 * MiB))
    with cluster.client() as fs, fuse_mount(cluster, "--io-retry", "10", prefix="openinfra-fb-") as mnt:
        fd = os.open(f"{mnt}/seq", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            piece = 256 << 10
            for off in range(0, len(data), piece):
                assert os.pwrite(fd, data[off:off + piece], off) == piece
                end = off + piece
                if off % (3 * MiB) == 0 and off:
                    back = off - 2 * MiB + 1000
                    assert os.pread(fd, 70_000, back) == bytes(data[back:back + 70_000])
                    assert os.fstat(fd).st_size == end
                if off == 9 * MiB:  # rewrite bytes of the run most likely in flight now
                    patch = rng.randbytes(5000)
                    at = 4 * MiB + 123
                    assert os.pwrite(fd, patch, at) == len(patch)
                    data[at:at + len(patch)] = patch
            assert os.pread(fd, len(data), 0) == bytes(data)
            os.fsync(fd)
            assert fs.read_bytes("/seq") == bytes(data)
            os.ftruncate(fd, 7 * MiB + 5)  # a truncate right after more sequential writes
            del data[7 * MiB + 5:]
        finally:
            os.close(fd)
        assert fs.read_bytes("/seq") == bytes(data)
        assert os.stat(f"{mnt}/seq").st_size == len(data)


@pytest.mark.service
@pytest.mark.timeout(240)
def test_failed_background_flush_keeps_the_bytes_and_fsync_reports_it(make_cluster):
    """Storage killed under a sequential writer: the writes are buffered (their background
    flushes fail), reads through the mount still return them, fsync and close fail with EIO
    (nothing is dropped silently)."""
    cluster = make_cluster(storage_nodes=2, replication=2)
    rng = random.Random(5)
    data = rng.randbytes(9 * MiB)
    with fuse_mount(cluster, "--io-retry", "2", prefix="openinfra-fbx-") as mnt:
        fd = os.open(f"{mnt}/f", os.O_RDWR | os.O_CREAT, 0o644)
        closed = False
        try:
            os.pwrite(fd, data[:MiB], 0)
            os.fsync(fd)
            for name in cluster.names("storage"):
                cluster.kill(name, signal.SIGKILL)
            t0 = time.monotonic()
            for off in range(MiB, len(data), MiB):  # two 4 MiB runs go to the background and fail
                assert os.pwrite(fd, data[off:off + MiB], off) == MiB
            assert time.monotonic() - t0 < 60
            time.sleep(0.5)
            # read-your-writes from the cache (past the stored first MiB: no storage read)
            assert os.pread(fd, 5 * MiB, 2 * MiB) == data[2 * MiB:7 * MiB]
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
            assert time.monotonic() - t0 < 90
            with pytest.raises(OSError) as exc:
                closed = True
                os.close(fd)
            assert exc.value.errno == errno.EIO
        finally:
            if not closed:
                os.close(fd)
