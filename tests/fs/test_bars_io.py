"""Bars 1, 6 and 9 of storage.md on one shared cluster (real processes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct

import pytest

from openinfra.fs import Code, FsError, InvalidPath, User
from openinfra.fs.cluster import call
from openinfra.fs.rpc import parse_address

from .conftest import replica_metas

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from openinfra.fs import ClusterSpec, LocalCluster

    from .conftest import FAST

    c = LocalCluster.start(ClusterSpec(str(tmp_path_factory.mktemp("io")), storage_nodes=3, replication=3,
                                       chunk_size=1 << 20, stripe=4, session_timeout_s=3.0, **FAST), timeout=60)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fs(cluster):
    with cluster.client(retry_s=30, length_report_s=0.5) as client:  # reports well within the 3 s session timeout
        yield client


def test_bar1_read_after_write_and_replicas_equal(cluster, fs):
    """Random files up to 32 MiB: read back equal; every replica has the same CRC and version,
    and no replica keeps a pending (uncommitted) version."""
    rng = random.Random(1)
    fs.mkdir("/bar1", exist_ok=True)
    sizes = [0, 1, 4095, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5_000_003, 32 << 20]
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        path = f"/bar1/f{i}"
        fs.write_bytes(path, data)
        st = fs.stat(path)
        assert st.size == size
        got = fs.read_bytes(path)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), f"{path} ({size} bytes) differs"
        # partial reads at odd offsets, and past EOF
        with fs.open(path) as f:
            if size > 10:
                off = rng.randrange(size - 5)
                assert f.pread(1 << 20, off) == data[off:off + (1 << 20)]
            assert f.pread(10, size) == b""
            assert f.pread(10, size + 12345) == b""
    # overwrite in the middle (copy-on-write update of partial chunks) through the asyncio API
    path, data = "/bar1/f6", bytearray(fs.read_bytes("/bar1/f6"))

    async def patch():
        f = await fs.aio.open(path, "r+b")
        await f.pwrite(b"Z" * 300_000, 1_000_000)
        await f.close()

    fs._run(patch())
    data[1_000_000:1_300_000] = b"Z" * 300_000
    assert fs.read_bytes(path) == bytes(data)
    st = fs.stat(path)
    for index in range((st.size + st.layout["chunk_size"] - 1) // st.layout["chunk_size"]):
        metas = replica_metas(cluster, st.layout, st.inode, index)
        assert all(m is not None for m in metas), f"chunk {index} missing on a replica"
        assert len({(m["version"], m["crc"], m["length"]) for m in metas}) == 1, metas
        assert all(m["pending_version"] is None for m in metas), "commit version != update version somewhere"


def test_write_modes_truncate_and_holes(fs):
    fs.mkdir("/modes", exist_ok=True)
    with fs.open("/modes/a", "wb") as f:
        f.write(b"hello ")
        f.write(b"world")
        assert f.tell() == 11
    with fs.open("/modes/a", "ab") as f:
        f.write(b"!")
    assert fs.read_bytes("/modes/a") == b"hello world!"
    with pytest.raises(FileExistsError):
        fs.open("/modes/a", "xb")
    # a hole: bytes never written read as zeros
    with fs.open("/modes/sparse", "wb") as f:
        f.pwrite(b"end", 3 * (1 << 20) + 10)
    data = fs.read_bytes("/modes/sparse")
    assert len(data) == 3 * (1 << 20) + 13 and data[:100] == bytes(100) and data[-3:] == b"end"
    fs.truncate("/modes/sparse", 5)
    assert fs.stat("/modes/sparse").size == 5 and fs.read_bytes("/modes/sparse") == bytes(5)
    fs.truncate("/modes/sparse", 2 << 20)  # extend: zeros, not the old bytes
    assert fs.read_bytes("/modes/sparse") == bytes(2 << 20)
    with fs.open("/modes/a", "wb") as f:  # O_TRUNC
        f.write(b"x")
    assert fs.read_bytes("/modes/a") == b"x"


def test_length_is_reported_while_writing_and_exact_after_fsync(fs):
    f = fs.open("/len", "wb")
    try:
        f.pwrite(b"a" * 1000, 0)
        f.fsync()
        assert fs.stat("/len").size == 1000
        f.pwrite(b"b" * 10, 5000)
        f.fsync()
        assert fs.stat("/len").size == 5010
    finally:
        f.close()
    assert fs.stat("/len").size == 5010


def test_namespace_ops(fs):
    fs.mkdir("/ns/a/b", parents=True)
    fs.write_bytes("/ns/a/b/file", b"data")
    fs.symlink("/ns/link", "/ns/a/b")
    assert fs.read_bytes("/ns/link/file") == b"data"
    assert fs.readlink("/ns/link") == "/ns/a/b"
    fs.link("/ns/a/b/file", "/ns/hard")
    assert fs.stat("/ns/hard").nlink == 2
    assert fs.stat_inode(fs.stat("/ns/hard").inode).nlink == 2
    with pytest.raises(ValueError, match="inode"):
        fs.stat_inode(0)
    fs.remove("/ns/a/b/file")
    assert fs.read_bytes("/ns/hard") == b"data" and fs.stat("/ns/hard").nlink == 1
    fs.rename("/ns/hard", "/ns/renamed")
    assert sorted(fs.listdir("/ns")) == ["a", "link", "renamed"]
    with pytest.raises(OSError) as ei:
        fs.rename("/ns/a", "/ns/a/b/inside")
    assert ei.value.code == Code.EINVAL
    with pytest.raises(OSError) as ei:
        fs.remove("/ns/a")
    assert ei.value.code == Code.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        fs.stat("/ns/nope")
    with pytest.raises(NotADirectoryError):
        fs.listdir("/ns/renamed")
    with pytest.raises(IsADirectoryError):
        fs.open("/ns/a", "wb")
    names = [n for n, st in fs.listdir("/ns", detail=True) if st.is_dir]
    assert names == ["a"]
    fs.remove("/ns", recursive=True)
    assert not fs.exists("/ns")


def test_deleted_file_chunks_are_collected(cluster, fs):
    """Deferred delete: chunks go when the file is removed (or at last close if open)."""
    fs.write_bytes("/gc1", b"x" * (3 << 20))
    st = fs.stat("/gc1")
    f = fs.open("/gc2", "wb")
    f.write(b"y" * (1 << 20))
    st2 = f.stat()
    fs.remove("/gc1")
    fs.remove("/gc2")  # still open for writing: its chunks stay until close
    meta = cluster.services["meta-1"]["address"]
    call(meta, "gc", timeout=30)
    assert all(m is None for m in replica_metas(cluster, st.layout, st.inode, 0))
    assert all(m is not None for m in replica_metas(cluster, st2.layout, st2.inode, 0))
    f.close()
    call(meta, "gc", timeout=30)
    assert all(m is None for m in replica_metas(cluster, st2.layout, st2.inode, 0))


def test_bar6_duplicate_sequence_numbers_applied_once(cluster, fs):
    """A retried write (same client, channel, seq) returns the first result and is not applied
    again, even with different bytes; a lost remove reply retried returns the first result."""
    fs.write_bytes("/dup", b"a" * 100)
    st = fs.stat("/dup")
    r = cluster.routing()
    chain_id = st.layout["chains"][0]
    chain = r.chain(chain_id)
    head = r.address(chain["targets"][0]["node"])
    args = dict(chain_id=chain_id, chain_version=chain["version"], inode=st.inode, index=0, offset=0,
                data=b"b" * 100, client="dup-test", channel=1, seq=7)
    first = call(head, "write", args)
    again = call(head, "write", dict(args, data=b"c" * 100))
    assert again == first
    assert fs.read_bytes("/dup") == b"b" * 100
    assert {m["version"] for m in replica_metas(cluster, st.layout, st.inode, 0)} == {first["version"]}
    with pytest.raises(OSError) as ei:
        call(head, "write", dict(args, seq=6))
    assert ei.value.code == Code.EINVAL
    # Idempotent remove: the same request id twice (first reply "lost") -> same result, no ENOENT.
    meta = cluster.services["meta-1"]["address"]
    req = dict(path="/dup", client="dup-test", req="remove-1")
    r1 = call(meta, "remove", req)
    r2 = call(meta, "remove", req)
    assert r1 == r2 and r1["inode"] == st.inode
    with pytest.raises(FileNotFoundError):
        call(meta, "remove", dict(req, req="remove-2"))


def _raw(address: str, data: bytes) -> bytes:
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(data)
        s.settimeout(1.0)
        buf = b""
        try:  # one reply frame: its header, then as many bytes as it announces
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            pass
        return buf


def test_bar9_bad_input_gets_clear_errors_and_services_keep_serving(cluster, fs):
    for bad, code in [("/a/../b", Code.EINVAL), ("/a\x00b", Code.EINVAL), ("/" + "n" * 256, Code.ENAMETOOLONG),
                      ("relative", Code.EINVAL), ("/./x", Code.EINVAL)]:
        with pytest.raises(InvalidPath) as ei:
            fs.stat(bad)
        assert ei.value.code == code and isinstance(ei.value, ValueError)
        # the same path sent to meta directly (a client that skipped the checks): same answer
        with pytest.raises(FsError) as ei:
            call(cluster.services["meta-1"]["address"], "stat", {"path": bad})
        assert ei.value.code == code
    with pytest.raises(TypeError, match="path"):
        fs.stat(b"/bytes")
    fs.write_bytes("/bad", b"0123456789")
    with fs.open("/bad") as f:
        with pytest.raises(ValueError, match="offset"):
            f.pread(5, -1)
        with pytest.raises(ValueError, match="size"):
            f.pread(-5, 0)
        assert f.pread(5, 10) == b"" and f.pread(5, 10**12) == b""
        with pytest.raises(OSError) as ei:
            f.write(b"x")
        assert ei.value.code == Code.EBADF
    with pytest.raises(ValueError, match="mode"):
        fs.open("/bad", "rw")
    # permissions: a non-root user
    fs.mkdir("/private", mode=0o700, exist_ok=True)
    fs.write_bytes("/private/secret", b"s")
    fs.chmod("/bad", 0o600)
    with fs.__class__(cluster.mgmtd_addresses, user=User(uid=1000, gid=1000), retry_s=5) as alice:
        with pytest.raises(PermissionError):
            alice.stat("/private/secret")
        with pytest.raises(PermissionError):
            alice.open("/bad", "rb")
        with pytest.raises(PermissionError):
            alice.write_bytes("/private/new", b"x")
        with pytest.raises(PermissionError):
            alice.chmod("/bad", 0o777)
        fs.mkdir("/home-alice", exist_ok=True)
        fs.chown("/home-alice", uid=1000, gid=1000)
        alice.write_bytes("/home-alice/mine", b"ok")
        assert alice.read_bytes("/home-alice/mine") == b"ok"
        assert alice.stat("/home-alice/mine").uid == 1000
    # malformed and oversized frames at every service: error reply, service keeps serving
    for name, svc in cluster.services.items():
        reply = _raw(svc["address"], struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        assert b"RPC_MALFORMED" in reply, name
        reply = _raw(svc["address"], struct.pack(">I", 2**31))
        assert b"RPC_TOO_LARGE" in reply, name
        with pytest.raises(FsError) as ei:
            call(svc["address"], "no_such_method")
        assert ei.value.code == Code.RPC_UNKNOWN_METHOD
    with pytest.raises(FsError) as ei:
        call(cluster.services["storage-1"]["address"], "read", {"chain_id": 1, "inode": -1, "index": 0})
    assert ei.value.code == Code.RPC_BAD_ARGS
    assert fs.read_bytes("/bad") == b"0123456789"


def test_sessions_of_dead_clients_are_pruned(cluster, fs):
    """A writer that stops reporting loses its session after session_timeout_s; a file it had
    open and that was removed is then collected. A live writer's session survives."""
    import time

    meta = cluster.services["meta-1"]["address"]
    node = call(meta, "open", {"path": "/ghost", "create": True, "write": True, "client": "ghost-client",
                               "session": b"g" * 16})
    call(meta, "remove", {"path": "/ghost"})
    live = fs.open("/alive", "wb")
    live.write(b"x" * 1000)
    fs.remove("/alive")                        # removed while open: collected only at close
    time.sleep(3.5)
    call(meta, "gc", timeout=30)
    with pytest.raises(FileNotFoundError):
        fs.stat_inode(node["id"])              # ghost session pruned, inode collected
    assert fs.stat_inode(live.inode).nlink == 0  # the live writer's session survived the pass
    live.write(b"y" * 1000)
    live.close()
    call(meta, "gc", timeout=30)
    with pytest.raises(FileNotFoundError):
        fs.stat_inode(live.inode)


def test_same_version_with_other_bytes_is_repaired(cluster, fs):
    """An update that committed at the tail but was aborted upstream (its acknowledgement lost)
    must not make the tail keep different bytes under the version the next write reuses."""
    from openinfra.fs.storage.chunk_store import checksum

    fs.write_bytes("/diverge", b"a" * 1000)
    st = fs.stat("/diverge")
    chain_id = st.layout["chains"][0]
    r = cluster.routing()
    chain = r.chain(chain_id)
    tail = r.address(chain["targets"][-1]["node"])
    current = replica_metas(cluster, st.layout, st.inode, 0)[-1]["version"]
    orphan = b"X" * 1000  # committed at the tail only, as if the head had aborted it
    call(tail, "write", dict(chain_id=chain_id, chain_version=chain["version"], inode=st.inode, index=0,
                             offset=0, data=orphan, update_version=current + 1, crc=checksum(orphan)))
    with fs.open("/diverge", "r+b") as f:    # the head hands out the same version number again
        f.pwrite(b"b" * 1000, 0)
    metas = replica_metas(cluster, st.layout, st.inode, 0)
    assert len({(m["version"], m["crc"]) for m in metas}) == 1, metas
    assert metas[0]["crc"] == checksum(b"b" * 1000)
    for _ in range(6):  # whichever replica serves the read
        assert fs.read_bytes("/diverge") == b"b" * 1000
