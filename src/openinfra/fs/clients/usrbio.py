"""Ring I/O in 3FS's USRBIO model: shared-memory buffers and submission/completion rings.

A *ring server* is a client process of the cluster (one native client, many files). Applications
hand it work without a request/reply per I/O: data lives in a shared-memory buffer (an *iovec*)
that both processes map, and requests go through a submission ring in shared memory; the server
drains it in batches, issues the reads/writes to the storage chains concurrently, writes the
bytes straight into (or out of) the buffer and posts completions to the completion ring. One
doorbell message per ``submit`` and one per completed batch cross the control socket, whatever
the batch size::

    from multiprocessing.shared_memory import SharedMemory
    from openinfra.fs.clients.usrbio import RingServer, make_iovec, make_ioring, register_fd
    server = RingServer.start("127.0.0.1:8000")          # or RingServer.connect(socket_path)
    shm = SharedMemory(create=True, size=1 << 20)
    iov = make_iovec(shm, server)
    ior = make_ioring(server, entries=256, for_read=True, io_depth=0)
    fd = register_fd(server, "/data/file.bin")
    for i in range(256):
        ior.prepare(iov[i * 4096:(i + 1) * 4096], True, fd, offset=i * 65536, userdata=i)
    ior.submit()
    done = ior.wait(min_results=256)                      # [IoResult(result=4096, userdata=...)]

``io_depth`` as in 3FS: ``> 0`` the server takes exactly ``io_depth`` entries per batch (waiting
until that many are submitted), ``0`` takes all submitted entries, ``< 0`` takes at most
``-io_depth`` without waiting. A result is the byte count (short at end of file) or ``-errno``.

Ring layout (one shared-memory segment): 64-byte header (sq_head, sq_tail, cq_head, cq_tail as
u64; each written by one side only), ``entries`` submission entries of 48 bytes, ``entries``
completion entries of 16 bytes. A producer fills entries before it advances its tail, the
consumer reads the tail before the entries (x86 keeps stores in order; the doorbell message on
the socket orders them everywhere else).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import itertools
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["RingServer", "IoVec", "IoRing", "IoResult", "make_iovec", "make_ioring", "register_fd",
           "deregister_fd", "serve"]

_HDR = struct.Struct("<QQQQ")
_HDR_BYTES = 64
_SQE = struct.Struct("<IIIIqQQQ")  # iov id, op, fd, pad, file offset, buffer offset, length, userdata slot
_CQE = struct.Struct("<qQ")        # result, userdata slot
_READ, _WRITE = 1, 2
_FRAME = struct.Struct(">I")


def _send(sock: socket.socket, obj: Any) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_FRAME.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("ring server closed the connection")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return msgpack.unpackb(_recv_exact(sock, n), raw=False)


def _attach_shm(name: str) -> SharedMemory:
    """Map a segment another process owns, without our resource tracker unlinking it at exit."""
    shm = SharedMemory(name=name)
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return shm


def _call(sock: socket.socket, **req) -> Any:
    _send(sock, req)
    rep = _recv(sock)
    if rep.get("error"):
        code = rep.get("errno")
        if code:
            raise OSError(code, rep["error"])
        raise ValueError(rep["error"])
    return rep.get("result")


# --- the application side ----------------------------------------------------------------------

class RingServer:
    """A handle on a ring-server process (started here with :meth:`start`, or :meth:`connect`)."""

    def __init__(self, socket_path: str, proc: subprocess.Popen | None = None):
        self.socket_path, self._proc = socket_path, proc
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctl.connect(socket_path)

    @classmethod
    def start(cls, mgmtd: str | list[str] | None = None, *, socket_path: str | None = None,
              timeout: float = 30.0) -> "RingServer":
        """Spawn a ring-server process for the cluster at ``mgmtd`` and connect to it."""
        from openinfra.fs.clients.common import resolve_mgmtd

        addrs = resolve_mgmtd(mgmtd)
        path = socket_path or os.path.join(tempfile.gettempdir(), f"openinfra-ring-{uuid.uuid4().hex[:12]}.sock")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "openinfra.fs.clients.usrbio", ",".join(addrs), path],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(f"ring server exited with code {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"ring server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return cls(path, proc)

    @classmethod
    def connect(cls, socket_path: str) -> "RingServer":
        """Attach to a running ring server (e.g. one started by another process)."""
        if not os.path.exists(socket_path):
            raise FileNotFoundError(f"socket_path: no ring server at {socket_path}")
        return cls(socket_path)

    def call(self, **req) -> Any:
        return _call(self._ctl, **req)

    def close(self) -> None:
        """Disconnect; a server started by :meth:`start` is stopped too."""
        try:
            self._ctl.close()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
                if self._proc.stderr:
                    self._proc.stderr.close()
                Path(self.socket_path).unlink(missing_ok=True)

    def __enter__(self) -> "RingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class IoVec:
    """A shared-memory buffer registered with a ring server; slice it (``iov[a:b]``) for I/O."""

    shm: SharedMemory
    iov_id: int
    offset: int = 0
    length: int = -1

    def __post_init__(self):
        if self.length < 0:
            object.__setattr__(self, "length", self.shm.size - self.offset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> "IoVec":
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("iov: index with a contiguous slice, e.g. iov[0:4096]")
        start, stop, _ = s.indices(self.length)
        return IoVec(self.shm, self.iov_id, self.offset + start, max(0, stop - start))

    @property
    def buf(self) -> memoryview:
        """The bytes of this (sliced) buffer."""
        return self.shm.buf[self.offset:self.offset + self.length]


@dataclass(frozen=True)
class IoResult:
    """A completion: ``result`` = bytes transferred (short at end of file) or ``-errno``."""

    result: int
    userdata: Any


def make_iovec(shm: SharedMemory, server: RingServer, block_size: int = 0, numa: int = -1) -> IoVec:
    """Register ``shm`` with ``server`` (it maps the same pages). ``block_size``/``numa`` are
    accepted for 3FS compatibility; with no RDMA registration here they change nothing."""
    if not isinstance(shm, SharedMemory):
        raise TypeError(f"shm: expected multiprocessing.shared_memory.SharedMemory, got {type(shm).__name__}")
    if not isinstance(server, RingServer):
        raise TypeError(f"server: expected a RingServer, got {type(server).__name__}")
    return IoVec(shm, server.call(op="iovec", name=shm.name))


def register_fd(server: RingServer, path: str, mode: str = "rb") -> int:
    """Open ``path`` in the ring server (``mode`` ``rb`` or ``r+b``/``wb``); returns its fd."""
    if mode not in ("rb", "r+b", "wb", "ab"):
        raise ValueError(f"mode: expected 'rb', 'r+b', 'wb' or 'ab', got {mode!r}")
    return server.call(op="open", path=path, mode=mode)


def deregister_fd(server: RingServer, fd: int) -> None:
    """Close an fd of :func:`register_fd` (a writer's length becomes exact)."""
    server.call(op="close", fd=fd)


def make_ioring(server: RingServer, entries: int, for_read: bool = True, io_depth: int = 0,
                timeout: float = 0.0) -> "IoRing":
    """A submission/completion ring of ``entries`` slots served by ``server``. ``timeout`` is
    accepted for 3FS compatibility (its ring timeout); pass timeouts to :meth:`IoRing.wait`."""
    return IoRing(server, entries, for_read, io_depth)


class IoRing:
    """``prepare`` I/Os, ``submit`` them, ``wait`` for completions. Not thread-safe (one ring per thread)."""

    def __init__(self, server: RingServer, entries: int, for_read: bool = True, io_depth: int = 0):
        if isinstance(entries, bool) or not isinstance(entries, int) or not 1 <= entries <= 1 << 20:
            raise ValueError(f"entries: expected an int in 1..{1 << 20}, got {entries!r}")
        if isinstance(io_depth, bool) or not isinstance(io_depth, int) or abs(io_depth) > entries:
            raise ValueError(f"io_depth: expected an int with |io_depth| <= entries ({entries}), got {io_depth!r}")
        self.entries, self.for_read, self.io_depth = entries, bool(for_read), io_depth
        size = _HDR_BYTES + entries * (_SQE.size + _CQE.size)
        self.shm = SharedMemory(create=True, size=size)
        self.shm.buf[:_HDR_BYTES] = bytes(_HDR_BYTES)
        self._sq0, self._cq0 = _HDR_BYTES, _HDR_BYTES + entries * _SQE.size
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(server.socket_path)
        _call(self._sock, op="ring", name=self.shm.name, entries=entries, io_depth=io_depth)
        self._tail = 0          # sq tail (ours)
        self._cq_head = 0       # cq head (ours)
        self._submitted = 0     # tail published to the server
        self._slots = itertools.count()
        self._userdata: dict[int, Any] = {}

    def _u64(self, index: int) -> int:
        return struct.unpack_from("<Q", self.shm.buf, index * 8)[0]

    def _set_u64(self, index: int, value: int) -> None:
        struct.pack_into("<Q", self.shm.buf, index * 8, value)

    @property
    def in_flight(self) -> int:
        """Prepared entries whose completions were not reaped yet."""
        return self._tail - self._cq_head

    def prepare(self, iov: IoVec, read: bool, fd: int, offset: int, userdata: Any = None) -> int:
        """Queue one I/O of ``len(iov)`` bytes at file ``offset``; returns its index in the ring."""
        if not isinstance(iov, IoVec):
            raise TypeError(f"iov: expected an IoVec (slice of make_iovec), got {type(iov).__name__}")
        if bool(read) != self.for_read:
            raise ValueError(f"read: this ring was made for_read={self.for_read}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"fd: expected a registered fd (int >= 0), got {fd!r}")
        if self.in_flight >= self.entries:
            raise RuntimeError(f"ring full: {self.entries} entries in flight; wait() for completions first")
        slot = next(self._slots) & 0xFFFFFFFFFFFFFFFF
        self._userdata[slot] = userdata
        pos = self._sq0 + (self._tail % self.entries) * _SQE.size
        _SQE.pack_into(self.shm.buf, pos, iov.iov_id, _READ if read else _WRITE, fd, 0, offset, iov.offset,
                       iov.length, slot)
        self._tail += 1
        return self._tail - 1

    def submit(self) -> int:
        """Publish the prepared entries and ring the doorbell; returns how many were published."""
        n = self._tail - self._submitted
        if n:
            self._set_u64(1, self._tail)  # sq_tail: entries are written before the tail moves
            self._submitted = self._tail
            _send(self._sock, {"op": "submit"})
        return n

    def wait(self, min_results: int = 1, max_results: int | None = None, timeout: float | None = None) -> list[IoResult]:
        """Reap completions: block until ``min_results`` are ready (or ``timeout`` seconds pass),
        return at most ``max_results``."""
        if min_results > self._submitted - self._cq_head:
            raise ValueError(f"min_results: only {self._submitted - self._cq_head} submitted I/Os are outstanding, "
                             f"asked to wait for {min_results}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._u64(3) - self._cq_head < min_results:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._sock.settimeout(left)
            try:
                msg = _recv(self._sock)  # a "done" doorbell from the server
            except socket.timeout:
                break
            finally:
                self._sock.settimeout(None)
            if msg.get("error"):
                raise OSError(_errno.EIO, f"ring server: {msg['error']}")
        ready = self._u64(3) - self._cq_head
        n = ready if max_results is None else min(ready, max_results)
        out = []
        for i in range(n):
            res, slot = _CQE.unpack_from(self.shm.buf, self._cq0 + ((self._cq_head + i) % self.entries) * _CQE.size)
            out.append(IoResult(res, self._userdata.pop(slot, None)))
        self._cq_head += n
        self._set_u64(2, self._cq_head)
        return out

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            self.shm.close()
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IoRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the server side ---------------------------------------------------------------------------

class _Ring:
    def __init__(self, name: str, entries: int, io_depth: int):
        self.shm = _attach_shm(name)
        self.entries, self.io_depth = entries, io_depth
        self.sq0, self.cq0 = _HDR_BYTES, _HDR_BYTES + entries * _SQE.size
        self.head = 0
        self.cq_tail = 0
        self.lock = asyncio.Lock()

    def sq_tail(self) -> int:
        return struct.unpack_from("<Q", self.shm.buf, 8)[0]


class _Server:
    def __init__(self, mgmtd: list[str]):
        from openinfra.fs.client.native import AsyncClient
        from openinfra.fs.clients.common import pread_fast

        self._pread = pread_fast

        self.fs = AsyncClient(mgmtd)
        self.iovecs: dict[int, SharedMemory] = {}
        self.files: dict[int, Any] = {}
        self._ids = itertools.count(1)

    async def _io(self, ring: _Ring, sqe: tuple) -> tuple[int, int]:
        iov_id, op, fd, _, offset, buf_off, length, slot = sqe
        try:
            shm = self.iovecs.get(iov_id)
            f = self.files.get(fd)
            if shm is None or f is None:
                return -_errno.EBADF, slot
            if buf_off + length > shm.size:
                return -_errno.EFAULT, slot
            if op == _READ:
                data = await self._pread(f, length, offset)
                shm.buf[buf_off:buf_off + len(data)] = data  # straight into the caller's buffer
                return len(data), slot
            return await f.pwrite(bytes(shm.buf[buf_off:buf_off + length]), offset), slot
        except OSError as exc:
            return -(exc.errno or _errno.EIO), slot
        except Exception:
            return -_errno.EIO, slot

    async def _batch(self, ring: _Ring, sqes: list[tuple]) -> list[tuple[int, int]]:
        """Complete a batch: the reads that lie inside one chunk and the file's known length go
        to storage as one ``batch_read`` request per storage node (the point of a ring: many
        small reads for the price of a few requests); the rest run one by one."""
        results: list = [None] * len(sqes)
        batched: list[int] = []
        for i, (iov_id, op, fd, _, offset, buf_off, length, slot) in enumerate(sqes):
            f = self.files.get(fd)
            shm = self.iovecs.get(iov_id)
            if (op == _READ and f is not None and shm is not None and not f.closed and 0 < length
                    and buf_off + length <= shm.size and offset + length <= f.length
                    and offset % f.chunk_size + length <= f.chunk_size):
                batched.append(i)
        if len(batched) > 1:
            reads = []
            for i in batched:
                f = self.files[sqes[i][2]]
                index, within = divmod(sqes[i][4], f.chunk_size)
                reads.append((f.layout, f.inode, index, within, sqes[i][6]))
            try:
                datas = await self.fs.storage.read_chunks(reads)
            except OSError as exc:
                datas = [-(exc.errno or _errno.EIO)] * len(batched)
            except Exception:
                datas = [-_errno.EIO] * len(batched)
            for i, data in zip(batched, datas):
                iov_id, _, _, _, _, buf_off, length, slot = sqes[i]
                if isinstance(data, int):
                    results[i] = (data, slot)
                    continue
                buf = self.iovecs[iov_id].buf
                buf[buf_off:buf_off + len(data)] = data  # straight into the caller's buffer
                if len(data) < length:  # a hole inside the file reads as zeros, as in pread
                    buf[buf_off + len(data):buf_off + length] = bytes(length - len(data))
                results[i] = (length, slot)
        rest = [i for i, r in enumerate(results) if r is None]
        for i, res in zip(rest, await asyncio.gather(*(self._io(ring, sqes[i]) for i in rest))):
            results[i] = res
        return results

    async def _drain(self, ring: _Ring, writer: asyncio.StreamWriter) -> None:
        async with ring.lock:
            while True:
                avail = ring.sq_tail() - ring.head
                if ring.io_depth > 0:
                    if avail < ring.io_depth:
                        return  # exactly io_depth per batch: wait for more submissions
                    n = ring.io_depth
                elif ring.io_depth < 0:
                    n = min(avail, -ring.io_depth)
                else:
                    n = avail
                if n <= 0:
                    return
                sqes = [_SQE.unpack_from(ring.shm.buf, ring.sq0 + ((ring.head + i) % ring.entries) * _SQE.size)
                        for i in range(n)]
                ring.head += n
                results = await self._batch(ring, sqes)
                for res, slot in results:
                    _CQE.pack_into(ring.shm.buf, ring.cq0 + (ring.cq_tail % ring.entries) * _CQE.size, res, slot)
                    ring.cq_tail += 1
                struct.pack_into("<Q", ring.shm.buf, 24, ring.cq_tail)
                body = msgpack.packb({"op": "done", "n": n})
                writer.write(_FRAME.pack(len(body)) + body)
                await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ring: _Ring | None = None
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                (n,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                req = msgpack.unpackb(await reader.readexactly(n), raw=False)
                op = req.get("op")
                if op == "submit" and ring is not None:
                    t = asyncio.ensure_future(self._drain(ring, writer))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    continue
                try:
                    result = await self._control(op, req)
                    if op == "ring":
                        ring = result
                        result = True
                    rep = {"result": result}
                except OSError as exc:
                    rep = {"error": str(exc), "errno": exc.errno}
                except Exception as exc:
                    rep = {"error": f"{type(exc).__name__}: {exc}"}
                body = msgpack.packb(rep, use_bin_type=True)
                writer.write(_FRAME.pack(len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            if ring is not None:
                ring.shm.close()
            writer.close()

    async def _control(self, op: str, req: dict) -> Any:
        if op == "iovec":
            i = next(self._ids)
            self.iovecs[i] = _attach_shm(req["name"])
            return i
        if op == "open":
            f = await self.fs.open(req["path"], req.get("mode", "rb"))
            fd = next(self._ids)
            self.files[fd] = f
            return fd
        if op == "close":
            f = self.files.pop(req["fd"], None)
            if f is None:
                raise OSError(_errno.EBADF, f"fd {req['fd']} is not registered")
            await f.close()
            return True
        if op == "ring":
            entries, io_depth = req["entries"], req["io_depth"]
            if not isinstance(entries, int) or entries < 1:
                raise ValueError(f"entries: expected an int >= 1, got {entries!r}")
            return _Ring(req["name"], entries, io_depth)
        raise ValueError(f"op: unknown control operation {op!r}")


async def serve(mgmtd: list[str], socket_path: str) -> None:
    """Run a ring server on the Unix socket ``socket_path`` until cancelled."""
    srv = _Server(mgmtd)
    await srv.fs.connect()
    tmp = socket_path + ".tmp"
    Path(tmp).unlink(missing_ok=True)
    server = await asyncio.start_unix_server(srv.handle, path=tmp)
    os.rename(tmp, socket_path)  # the path appears only once the server listens
    try:
        async with server:
            await server.serve_forever()
    finally:
        for f in srv.files.values():
            try:
                await f.close()
            except Exception:
                pass
        await srv.fs.close()
        Path(socket_path).unlink(missing_ok=True)


def _main(argv: list[str]) -> int:
    import signal

    if len(argv) != 2:
        print("usage: python -m openinfra.fs.clients.usrbio MGMTD[,MGMTD] SOCKET_PATH", file=sys.stderr)
        return 2
    from openinfra.fs.rpc import run_loop

    async def main():
        task = asyncio.ensure_future(serve(argv[0].split(","), argv[1]))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    run_loop(main())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
