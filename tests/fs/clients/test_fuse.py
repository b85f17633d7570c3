"""FUSE mount against a real cluster: read-after-write, concurrency, rename and permission cases.

Skips with the reason where /dev/fuse is missing or mounting is not permitted here.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.fs.clients.fuse_mount import fuse_mount

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def mnt(cluster):
    # the mount also serves ring I/O on <mountpoint>.ring; 0755: the permission tests run as another user
    with fuse_mount(cluster, "--ring-socket", "{mnt}.ring", mode=0o755) as mountpoint:
        yield mountpoint


@pytest.fixture
def mdir(mnt, workdir):
    """The test's directory as seen through the mount."""
    return mnt + workdir


def test_read_after_write_random_files(mdir, fs_client, workdir):
    rng = __import__("random").Random(0)
    sizes = [0, 1, 4095, 4096, 65537, (1 << 20) + 13, 3 * (1 << 20) + 5]
    blobs = {f"f{i}": rng.randbytes(s) for i, s in enumerate(sizes)}
    for name, data in blobs.items():
        with open(f"{mdir}/{name}", "wb") as f:
            for i in range(0, len(data), 100_000):  # many small writes: buffered into few requests
                f.write(data[i:i + 100_000])
    for name, data in blobs.items():
        assert fs_client.stat(f"{workdir}/{name}").size == len(data)  # exact after close
        assert fs_client.read_bytes(f"{workdir}/{name}") == data
        with open(f"{mdir}/{name}", "rb") as f:
            assert f.read() == data
        assert os.stat(f"{mdir}/{name}").st_size == len(data)
    # Random-offset overwrite and reads through the mount.
    p = f"{mdir}/f6"
    data = bytearray(blobs["f6"])
    with open(p, "r+b") as f:
        for _ in range(20):
            off, n = rng.randrange(len(data)), rng.randrange(1, 9000)
            chunk = rng.randbytes(n)
            f.seek(off)
            f.write(chunk)
            data[off:off + n] = chunk
            data = data[:max(len(data), off + n)] if off + n <= len(data) else data
        f.flush()
        f.seek(0)
        assert f.read() == bytes(data)  # read-your-writes on the same handle
    assert fs_client.read_bytes(f"{workdir}/f6") == bytes(data)
    with open(p, "ab") as f:
        f.write(b"tail")
    assert os.path.getsize(p) == len(data) + 4
    os.truncate(p, 10)
    assert open(p, "rb").read() == bytes(data[:10])
    assert sorted(os.listdir(mdir)) == sorted(blobs)


def test_namespace_ops(mdir, fs_client, workdir):
    os.makedirs(f"{mdir}/a/b")
    with open(f"{mdir}/a/b/x", "wb") as f:
        f.write(b"hello")
    os.symlink("b/x", f"{mdir}/a/lnk")
    assert os.readlink(f"{mdir}/a/lnk") == "b/x"
    assert fs_client.readlink(f"{workdir}/a/lnk") == "b/x"
    os.link(f"{mdir}/a/b/x", f"{mdir}/a/hard")
    assert os.stat(f"{mdir}/a/hard").st_nlink == 2 and open(f"{mdir}/a/hard", "rb").read() == b"hello"
    os.chmod(f"{mdir}/a/b/x", 0o600)
    assert fs_client.stat(f"{workdir}/a/b/x").mode & 0o777 == 0o600
    os.utime(f"{mdir}/a/b/x", (1_000_000, 2_000_000))
    assert os.stat(f"{mdir}/a/b/x").st_mtime == 2_000_000
    with pytest.raises(OSError) as e:
        os.rmdir(f"{mdir}/a")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(f"{mdir}/a/hard")
    os.unlink(f"{mdir}/a/lnk")
    assert os.listdir(f"{mdir}/a") == ["b"]
    ino = os.stat(f"{mdir}/a/b/x").st_ino
    assert os.getxattr(f"{mdir}/a/b/x", "user.3fs.inode") == str(ino).encode()
    assert b"chunk_size" in os.getxattr(f"{mdir}/a/b/x", "user.3fs.layout")
    with pytest.raises(OSError) as e:
        os.setxattr(f"{mdir}/a/b/x", "user.k", b"v")
    assert e.value.errno == errno.ENOTSUP
    sv = os.statvfs(mdir)
    assert sv.f_bsize == 4096 and sv.f_namemax == 255
    with pytest.raises(FileNotFoundError):
        os.stat(f"{mdir}/nope")


def test_rename_cases(mdir, fs_client, workdir):
    os.makedirs(f"{mdir}/d1/sub")
    with open(f"{mdir}/d1/sub/f", "wb") as f:
        f.write(b"1")
    os.rename(f"{mdir}/d1", f"{mdir}/d2")  # a directory moves with its children
    assert open(f"{mdir}/d2/sub/f", "rb").read() == b"1" and not os.path.exists(f"{mdir}/d1")
    with open(f"{mdir}/g", "wb") as f:
        f.write(b"22")
    os.rename(f"{mdir}/g", f"{mdir}/d2/sub/f")  # over an existing file
    assert open(f"{mdir}/d2/sub/f", "rb").read() == b"22" and not os.path.exists(f"{mdir}/g")
    with pytest.raises(OSError) as e:
        os.rename(f"{mdir}/d2", f"{mdir}/d2/sub/inside")
    assert e.value.errno == errno.EINVAL
    os.mkdir(f"{mdir}/empty")
    with pytest.raises(OSError):
        os.rename(f"{mdir}/empty", f"{mdir}/d2/sub/f")  # a directory over a file
    assert fs_client.listdir(f"{workdir}/d2/sub") == ["f"]
    # A file renamed while open keeps working through its handle.
    f = open(f"{mdir}/d2/sub/f", "r+b")
    os.rename(f"{mdir}/d2/sub/f", f"{mdir}/moved")
    f.write(b"AB")
    f.close()
    assert fs_client.read_bytes(f"{workdir}/moved") == b"AB"


def test_concurrent_readers_and_writers(mdir, fs_client, workdir):
    rng = __import__("random").Random(1)
    shared = rng.randbytes(2 * (1 << 20))
    fs_client.write_bytes(f"{workdir}/shared", shared)
    errors: list[BaseException] = []

    def writer(w: int):
        try:
            r = __import__("random").Random(w)
            for i in range(4):
                data = r.randbytes(r.randrange(1, 300_000))
                with open(f"{mdir}/w{w}-{i}", "wb") as f:
                    f.write(data)
                with open(f"{mdir}/w{w}-{i}", "rb") as f:
                    assert f.read() == data
        except BaseException as exc:
            errors.append(exc)

    def reader(k: int):
        try:
            r = __import__("random").Random(100 + k)
            with open(f"{mdir}/shared", "rb") as f:
                for _ in range(30):
                    off = r.randrange(len(shared) - 4096)
                    assert os.pread(f.fileno(), 4096, off) == shared[off:off + 4096]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len([n for n in os.listdir(mdir) if n.startswith("w")]) == 12


def test_permissions(mdir, fs_client, workdir):
    os.mkdir(f"{mdir}/private", 0o755)
    with open(f"{mdir}/secret", "wb") as f:
        f.write(b"s")
    os.chmod(f"{mdir}/secret", 0o600)
    os.mkdir(f"{mdir}/open", 0o777)
    os.chmod(f"{mdir}/open", 0o777)
    # A forked child as uid/gid 1000 (the venv's interpreter may not be executable by that user).
    def as_user() -> list[int]:
        def code(fn) -> int:
            try:
                fn()
                return 0
            except OSError as e:
                return e.errno

        r = [code(lambda: open(f"{mdir}/private/x", "wb").close()),
             code(lambda: open(f"{mdir}/secret", "rb").read()),
             code(lambda: os.chmod(f"{mdir}/secret", 0o644))]
        with open(f"{mdir}/open/mine", "wb") as f:
            f.write(b"mine")
        r.append(code(lambda: os.rename(f"{mdir}/open/mine", f"{mdir}/private/stolen")))
        return r

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, only system calls, then _exit
        try:
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
            os.write(wfd, repr(as_user()).encode())
            os._exit(0)
        except BaseException as exc:
            os.write(wfd, repr(exc).encode())
            os._exit(1)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(rfd) as f:
        out = f.read()
    assert os.WEXITSTATUS(status) == 0, out
    assert out == str([errno.EACCES, errno.EACCES, errno.EPERM, errno.EACCES])
    st = fs_client.stat(f"{workdir}/open/mine")
    assert (st.uid, st.gid, st.size) == (1000, 1000, 4)
    assert fs_client.listdir(f"{workdir}/private") == []


def test_mount_command_errors_are_one_line(tmp_path):
    """``mount`` (what ``openinfra fs mount`` runs): bad input -> one line on stderr, exit code 2."""
    import argparse

    from openinfra.fs.clients.fuse import register_mount

    parser = argparse.ArgumentParser()
    register_mount(parser.add_subparsers())
    args = parser.parse_args(["mount", str(tmp_path / "missing"), "--mgmtd", "127.0.0.1:1"])
    assert args.mountpoint.endswith("missing") and args.attr_timeout == 1.0
    out = subprocess.run([sys.executable, "-m", "openinfra.fs.clients.fuse", str(tmp_path / "missing"),
                          "--mgmtd", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "mountpoint" in out.stderr
    out = subprocess.run([sys.executable, "-m", "openinfra.fs.clients.fuse", str(tmp_path), "--mgmtd", "nonsense"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "address" in out.stderr


def test_consistency_with_other_clients(mdir, fs_client, workdir):
    """Attribute caching: another client's change shows after the cache lifetime (0.2 s here); our
    writes show to others once fsync or close returns; unlink of an open file defers the delete."""
    fs_client.write_bytes(f"{workdir}/c", b"x" * 100)
    assert os.stat(f"{mdir}/c").st_size == 100
    with fs_client.open(f"{workdir}/c", "ab") as f:  # another client appends
        f.write(b"y" * 100)
    deadline = time.monotonic() + 10
    while os.stat(f"{mdir}/c").st_size != 200:
        assert time.monotonic() < deadline, "the mount never saw the other client's new length"
        time.sleep(0.05)
    assert open(f"{mdir}/c", "rb").read() == b"x" * 100 + b"y" * 100
    with open(f"{mdir}/c", "r+b") as f:
        f.seek(200)
        f.write(b"z" * 50)
        f.flush()
        os.fsync(f.fileno())
        assert fs_client.stat(f"{workdir}/c").size == 250  # exact after fsync, file still open
        f.write(b"w" * (5 << 20))  # larger than the write buffer: written through
    assert fs_client.stat(f"{workdir}/c").size == 250 + (5 << 20)
    # Unlinking a file open for writing defers the delete to the last close (3FS write sessions;
    # read-only opens are not tracked, so only a writer keeps the chunks alive).
    f = open(f"{mdir}/c", "r+b")
    os.unlink(f"{mdir}/c")
    assert not os.path.exists(f"{mdir}/c")
    time.sleep(1.0)  # two meta GC passes (0.5 s each) happen meanwhile
    f.write(b"NEW")
    f.seek(0)
    assert f.read(13) == b"NEW" + b"x" * 10
    f.close()
    assert "c" not in fs_client.listdir(workdir)


def test_mount_serves_ring_io(mdir, mnt, fs_client, workdir):
    """The mount process also serves ring I/O (as 3FS's FUSE daemon serves USRBIO)."""
    from multiprocessing.shared_memory import SharedMemory

    from openinfra.fs.clients.usrbio import RingServer, make_ioring, make_iovec, register_fd

    with open(f"{mdir}/r", "wb") as f:
        f.write(bytes(range(256)) * 100)
    deadline = time.monotonic() + 10
    while not os.path.exists(mnt + ".ring"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    shm = SharedMemory(create=True, size=8192)
    try:
        with RingServer.connect(mnt + ".ring") as srv:
            iov = make_iovec(shm, srv)
            fd = register_fd(srv, f"{workdir}/r")
            with make_ioring(srv, entries=2) as ior:
                ior.prepare(iov[0:4096], True, fd, 256)
                ior.prepare(iov[4096:8192], True, fd, 25_000)
                ior.submit()
                assert sorted(r.result for r in ior.wait(min_results=2, timeout=30)) == [600, 4096]
        assert bytes(shm.buf[:4096]) == (bytes(range(256)) * 17)[:4096]
        assert bytes(shm.buf[4096:4096 + 600]) == (bytes(range(256)) * 100)[25_000:]
    finally:
        shm.close()
        shm.unlink()
