"""The FUSE mount's write-back cache against a real cluster (its own: the last test kills storage).

Read-your-writes through the mount, last-write-wins, sizes past EOF, flush on fsync/close/truncate/
rename and at the memory limits, and a flush failure (storage processes stopped) reported by fsync
and close. Skips with the reason where /dev/fuse is missing or mounting is not permitted here.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import time

import pytest

from tests.fs.clients.fuse_mount import fuse_mount

pytestmark = pytest.mark.service

BLOCK = 4096


def _mounted(cluster, *args):
    # --io-retry 3: a flush against dead storage fails in seconds, not the default minute.
    return fuse_mount(cluster, "--io-retry", "3", *args, prefix="openinfra-wb-")


@pytest.fixture(scope="module")
def mnt(cluster):
    with _mounted(cluster) as m:  # default limits: 64 MiB per file, 256 MiB in all
        yield m


@pytest.fixture(scope="module")
def mnt_small(cluster):
    with _mounted(cluster, "--writeback-per-file", str(96 << 10), "--writeback-total", str(128 << 10)) as m:
        yield m


def _model_writes(rng, fd, model: bytearray, n: int, span: int, size: int = BLOCK) -> None:
    for _ in range(n):
        off = rng.randrange(0, span - size)
        data = rng.randbytes(size)
        assert os.pwrite(fd, data, off) == size
        end = off + size
        if end > len(model):
            model.extend(bytes(end - len(model)))
        model[off:end] = data


def test_random_writes_read_back(mnt, fs_client, workdir):
    """Unaligned, overlapping 4 KiB writes stay in the cache until fsync, read back through the same
    and another handle, and reach storage (seen by the native client) with fsync."""
    rng = random.Random(1)
    base = rng.randbytes(3 << 20)
    fs_client.write_bytes(f"{workdir}/r", base)
    model = bytearray(base)
    fd = os.open(f"{mnt}{workdir}/r", os.O_RDWR)
    try:
        _model_writes(rng, fd, model, 300, len(base))
        assert fs_client.read_bytes(f"{workdir}/r") == base  # buffered: nothing on storage yet
        for _ in range(50):  # the same handle
            off, n = rng.randrange(len(model)), rng.randrange(1, 20000)
            assert os.pread(fd, n, off) == bytes(model[off:off + n])
        with open(f"{mnt}{workdir}/r", "rb") as other:  # another handle (its open drops the page cache)
            assert other.read() == model
        os.fsync(fd)
        assert fs_client.read_bytes(f"{workdir}/r") == model  # the native client, not the mount
    finally:
        os.close(fd)
    assert fs_client.read_bytes(f"{workdir}/r") == model


def test_overlapping_writes_last_wins(mnt, fs_client, workdir):
    p = f"{mnt}{workdir}/o"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * 100, 0)
        os.pwrite(fd, b"b" * 100, 50)   # overlaps the end of the first
        os.pwrite(fd, b"c" * 10, 120)   # inside the second
        os.pwrite(fd, b"d" * 10, 300)   # a gap before it
        os.pwrite(fd, b"e" * 400, 20)   # covers all of them
        os.pwrite(fd, b"f" * 5, 0)
        want = b"f" * 5 + b"a" * 15 + b"e" * 400
        assert os.pread(fd, 1000, 0) == want
        with open(p, "rb") as other:
            assert other.read() == want
    finally:
        os.close(fd)
    assert fs_client.read_bytes(f"{workdir}/o") == want


def test_writes_past_eof_and_size(mnt, fs_client, workdir):
    fs_client.write_bytes(f"{workdir}/e", b"x" * 1000)
    p = f"{mnt}{workdir}/e"
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * BLOCK, (5 << 20) + 10)  # past EOF, in a later chunk
        want = b"x" * 1000 + bytes((5 << 20) + 10 - 1000) + b"y" * BLOCK
        assert os.fstat(fd).st_size == len(want)
        time.sleep(0.3)  # past the kernel's attribute cache: getattr itself adds the buffered end
        assert os.stat(p).st_size == len(want)
        with open(p, "rb") as other:
            assert other.read() == want  # the hole reads as zeros
    finally:
        os.close(fd)
    assert fs_client.stat(f"{workdir}/e").size == len(want)  # exact after close
    assert fs_client.read_bytes(f"{workdir}/e") == want


def test_close_flushes(mnt, fs_client, workdir):
    rng = random.Random(2)
    model = bytearray()
    fd = os.open(f"{mnt}{workdir}/c", os.O_WRONLY | os.O_CREAT, 0o644)
    _model_writes(rng, fd, model, 100, 2 << 20)
    os.close(fd)
    assert fs_client.stat(f"{workdir}/c").size == len(model)
    assert fs_client.read_bytes(f"{workdir}/c") == model


def test_truncate_while_dirty(mnt, fs_client, workdir):
    p = f"{mnt}{workdir}/t"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"A" * BLOCK, 100)
        os.pwrite(fd, b"B" * BLOCK, 2 << 20)
        os.ftruncate(fd, (1 << 20) + 7)  # B is cut off before it was ever written
        assert os.fstat(fd).st_size == (1 << 20) + 7
        os.ftruncate(fd, 3 << 20)  # grows again: zeros, not B
        os.pwrite(fd, b"C" * 10, 50)
        want = bytearray(3 << 20)
        want[100:100 + BLOCK] = b"A" * BLOCK
        want[50:60] = b"C" * 10
        with open(p, "rb") as other:
            assert other.read() == want
    finally:
        os.close(fd)
    assert fs_client.read_bytes(f"{workdir}/t") == want
    # O_TRUNC through another handle while the first one has buffered writes: they do not come back.
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"Z" * BLOCK, 1 << 20)
        with open(p, "wb") as other:
            other.write(b"new")
    finally:
        os.close(fd)
    assert fs_client.read_bytes(f"{workdir}/t") == b"new"


def test_rename_and_unlink_flush(mnt, fs_client, workdir):
    fd = os.open(f"{mnt}{workdir}/m1", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"R" * BLOCK, 1 << 20)
        os.rename(f"{mnt}{workdir}/m1", f"{mnt}{workdir}/m2")
        # The rename flushed the data (the length becomes exact at close).
        with fs_client.open(f"{workdir}/m2", "rb") as f:
            assert f.pread(BLOCK, 1 << 20) == b"R" * BLOCK
        os.pwrite(fd, b"S" * BLOCK, 0)
    finally:
        os.close(fd)
    assert fs_client.read_bytes(f"{workdir}/m2") == b"S" * BLOCK + bytes((1 << 20) - BLOCK) + b"R" * BLOCK


def test_memory_limits_force_flushes(mnt_small, fs_client, workdir):
    """Per-file limit 96 KiB, mount limit 128 KiB: what exceeds them reaches storage before any fsync."""
    rng = random.Random(3)
    span = 4 << 20
    models, fds = {}, {}
    for name in ("a", "b"):
        fs_client.write_bytes(f"{workdir}/{name}", bytes(span))
        fds[name] = os.open(f"{mnt_small}{workdir}/{name}", os.O_RDWR)
        models[name] = bytearray(span)
    try:
        # 50 blocks (200 KiB) into a: the per-file limit flushes it at least twice.
        offsets = rng.sample(range(span // BLOCK), 50)
        for i in offsets:
            data = rng.randbytes(BLOCK)
            os.pwrite(fds["a"], data, i * BLOCK)
            models["a"][i * BLOCK:(i + 1) * BLOCK] = data
        stored = fs_client.read_bytes(f"{workdir}/a")
        on_storage = sum(stored[i * BLOCK:(i + 1) * BLOCK] == models["a"][i * BLOCK:(i + 1) * BLOCK] for i in offsets)
        assert on_storage >= 50 - (96 << 10) // BLOCK, on_storage
        assert on_storage < 50  # and some are still buffered
        # 20 blocks each into a and b (80 KiB each, under the per-file limit): together over 128 KiB.
        for name in ("a", "b"):
            for i in rng.sample(range(span // BLOCK), 20):
                data = rng.randbytes(BLOCK)
                os.pwrite(fds[name], data, i * BLOCK)
                models[name][i * BLOCK:(i + 1) * BLOCK] = data
        stale = sum(fs_client.read_bytes(f"{workdir}/{n}") != models[n] for n in ("a", "b"))
        assert stale <= 1  # the mount limit flushed the larger file
        for name in ("a", "b"):
            with open(f"{mnt_small}{workdir}/{name}", "rb") as other:
                assert other.read() == models[name]
    finally:
        for fd in fds.values():
            os.close(fd)
    for name in ("a", "b"):
        assert fs_client.read_bytes(f"{workdir}/{name}") == models[name]


def test_zz_flush_failure_is_reported(mnt, cluster, fs_client, workdir):
    """Storage stopped under dirty data: fsync and close fail with EIO (last: it kills storage)."""
    fs_client.write_bytes(f"{workdir}/f", bytes(1 << 20))
    fd = os.open(f"{mnt}{workdir}/f", os.O_RDWR)
    closed = False
    try:
        for i in range(10):
            os.pwrite(fd, b"D" * BLOCK, i * 3 * BLOCK)
        for name in cluster.names("storage"):
            cluster.kill(name, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 30
        with pytest.raises(OSError) as exc:  # still dirty: close(2) reports the failed flush too
            closed = True
            os.close(fd)
        assert exc.value.errno == errno.EIO
    finally:
        if not closed:
            os.close(fd)
