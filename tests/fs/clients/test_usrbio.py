"""Ring I/O (USRBIO model) against a real cluster: reads/writes through shared memory, io_depth."""

from __future__ import annotations

import errno
import os
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def server(cluster):
    from openinfra.fs.clients.usrbio import RingServer

    s = RingServer.start(cluster.address)
    yield s
    s.close()


@pytest.fixture
def shm():
    m = SharedMemory(create=True, size=1 << 20)
    yield m
    m.close()
    m.unlink()


def test_random_reads_match_the_file(server, shm, fs_client, workdir):
    from openinfra.fs.clients.usrbio import make_ioring, make_iovec, register_fd, deregister_fd

    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 777)  # several chunks, odd tail
    fs_client.write_bytes(f"{workdir}/f", data)
    iov = make_iovec(shm, server)
    fd = register_fd(server, f"{workdir}/f")
    rng = np.random.default_rng(1)
    offsets = [int(o) for o in rng.integers(0, len(data) - 4096, 100)] + [len(data) - 100, len(data) + 10]
    with make_ioring(server, entries=128, for_read=True, io_depth=0) as ior:
        for i, off in enumerate(offsets):
            ior.prepare(iov[i * 4096:(i + 1) * 4096], True, fd, off, userdata=(i, off))
        assert ior.submit() == len(offsets)
        done = ior.wait(min_results=len(offsets), timeout=60)
        assert len(done) == len(offsets) and ior.in_flight == 0
        for r in done:
            i, off = r.userdata
            want = data[off:off + 4096]
            assert r.result == len(want)  # short at the end, 0 past it
            assert bytes(shm.buf[i * 4096:i * 4096 + r.result]) == want
    deregister_fd(server, fd)
    with pytest.raises(OSError):
        deregister_fd(server, fd)


def test_writes_then_read_back(server, shm, fs_client, workdir):
    from openinfra.fs.clients.usrbio import make_ioring, make_iovec, register_fd, deregister_fd

    iov = make_iovec(shm, server)
    payload = np.random.default_rng(2).bytes(64 * 8192)
    shm.buf[:len(payload)] = payload
    fd = register_fd(server, f"{workdir}/w", mode="wb")
    with make_ioring(server, entries=64, for_read=False, io_depth=-16) as ior:
        for i in range(64):  # out of order on purpose
            j = (i * 37) % 64
            ior.prepare(iov[j * 8192:(j + 1) * 8192], False, fd, j * 8192, userdata=j)
        ior.submit()
        got, deadline = [], time.monotonic() + 120
        while len(got) < 64:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(got)} of 64 writes completed within 120 s: {sorted(r.userdata for r in got)}"
            got += ior.wait(min_results=1, timeout=left)
        assert sorted(r.userdata for r in got) == list(range(64)) and all(r.result == 8192 for r in got)
    deregister_fd(server, fd)  # the length is exact after close
    assert fs_client.stat(f"{workdir}/w").size == len(payload)
    assert fs_client.read_bytes(f"{workdir}/w") == payload


def test_holes_read_as_zeros(server, shm, fs_client, workdir):
    from openinfra.fs.clients.usrbio import make_ioring, make_iovec, register_fd

    with fs_client.open(f"{workdir}/sparse", "wb") as f:
        f.pwrite(b"end", (2 << 20) + 5)  # chunks 0 and 1 never written
    iov = make_iovec(shm, server)
    shm.buf[:8192] = b"\xff" * 8192
    fd = register_fd(server, f"{workdir}/sparse")
    with make_ioring(server, entries=2) as ior:
        ior.prepare(iov[0:4096], True, fd, 1 << 20)
        ior.prepare(iov[4096:8192], True, fd, (2 << 20) + 4)
        ior.submit()
        assert sorted(r.result for r in ior.wait(min_results=2, timeout=30)) == [4, 4096]
    assert bytes(shm.buf[:4096]) == bytes(4096)
    assert bytes(shm.buf[4096:4100]) == b"\0end"


def test_io_depth_batches_exactly(server, shm, fs_client, workdir):
    from openinfra.fs.clients.usrbio import make_ioring, make_iovec, register_fd

    fs_client.write_bytes(f"{workdir}/d", bytes(range(256)) * 64)
    iov = make_iovec(shm, server)
    fd = register_fd(server, f"{workdir}/d")
    with make_ioring(server, entries=16, for_read=True, io_depth=4) as ior:
        for i in range(3):
            ior.prepare(iov[i * 16:(i + 1) * 16], True, fd, i * 16, userdata=i)
        ior.submit()
        assert ior.wait(min_results=1, timeout=0.5) == []  # 3 < io_depth: the server waits for a full batch
        ior.prepare(iov[48:64], True, fd, 48, userdata=3)
        ior.submit()
        done = ior.wait(min_results=4, timeout=30)
        assert sorted(r.userdata for r in done) == [0, 1, 2, 3]
        assert bytes(shm.buf[:64]) == bytes(range(64))


def test_errors_and_bad_input(server, shm, fs_client, workdir):
    from openinfra.fs.clients.usrbio import make_ioring, make_iovec, register_fd

    iov = make_iovec(shm, server)
    with pytest.raises(FileNotFoundError):
        register_fd(server, f"{workdir}/missing")
    with pytest.raises(ValueError, match="mode"):
        register_fd(server, f"{workdir}/x", mode="rw")
    with pytest.raises(TypeError, match="shm"):
        make_iovec(b"not shm", server)
    with pytest.raises(ValueError, match="entries"):
        make_ioring(server, entries=0)
    with pytest.raises(ValueError, match="io_depth"):
        make_ioring(server, entries=4, io_depth=8)
    fs_client.write_bytes(f"{workdir}/e", b"abc")
    fd = register_fd(server, f"{workdir}/e")
    with make_ioring(server, entries=2, for_read=True) as ior:
        with pytest.raises(ValueError, match="read"):
            ior.prepare(iov[0:1], False, fd, 0)
        with pytest.raises(ValueError, match="offset"):
            ior.prepare(iov[0:1], True, fd, -1)
        with pytest.raises(TypeError, match="slice"):
            iov[3]
        ior.prepare(iov[0:3], True, 999_999, 0, userdata="badfd")
        ior.prepare(iov[0:3], True, fd, 0, userdata="ok")
        with pytest.raises(RuntimeError, match="ring full"):
            ior.prepare(iov[0:3], True, fd, 0)
        with pytest.raises(ValueError, match="min_results"):
            ior.wait(min_results=1)  # nothing submitted yet
        ior.submit()
        res = {r.userdata: r.result for r in ior.wait(min_results=2, timeout=30)}
        assert res == {"badfd": -errno.EBADF, "ok": 3}
        assert bytes(shm.buf[:3]) == b"abc"


def test_two_rings_from_two_processes(server, cluster, fs_client, workdir):
    """The server drains several rings at once; a second application process attaches by socket path."""
    import multiprocessing as mp

    data = os.urandom(1 << 20)
    fs_client.write_bytes(f"{workdir}/shared", data)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        res = pool.apply_async(_reader, (server.socket_path, f"{workdir}/shared"))
        assert _reader(server.socket_path, f"{workdir}/shared") == data[:64 * 4096]
        assert res.get(120) == data[:64 * 4096]


def _reader(socket_path: str, path: str) -> bytes:
    from openinfra.fs.clients.usrbio import RingServer, make_ioring, make_iovec, register_fd

    m = SharedMemory(create=True, size=64 * 4096)
    try:
        with RingServer.connect(socket_path) as srv:
            iov = make_iovec(m, srv)
            fd = register_fd(srv, path)
            with make_ioring(srv, entries=64, io_depth=0) as ior:
                for i in range(64):
                    ior.prepare(iov[i * 4096:(i + 1) * 4096], True, fd, i * 4096)
                ior.submit()
                assert len(ior.wait(min_results=64, timeout=60)) == 64
            return bytes(m.buf[:64 * 4096])
    finally:
        m.close()
        m.unlink()
