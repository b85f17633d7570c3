"""Blob bytes moved on a connection's socket directly, beside its asyncio transport.

An asyncio transport hands bytes to Python one buffer per callback and takes them from Python
objects only. Two bulk paths skip that, each on a ``dup`` of the connection's socket (the dup
keeps the socket alive however the transport closes its own descriptor, and the event loop may
watch it: loops refuse to watch a descriptor a transport owns):

* sending (storage): :class:`FileRange` pieces of a reply go from a chunk file's page cache to
  the socket with ``os.sendfile`` (one kernel copy; the bytes never become a Python object),
  :func:`send_direct`. The transport must have nothing buffered, and nothing else may be
  written on the connection until it returns (``rpc._Outbox`` holds later frames back).
* receiving (client): :func:`recv_into` fills a scatter list of caller buffers with
  ``recvmsg_into``, up to ``IOV_MAX`` buffers per system call, where a ``BufferedProtocol``
  costs one callback round per buffer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

__all__ = ["FileRange", "OpenFile", "send_direct", "recv_into", "dup_socket", "reset", "IOV_MAX", "STALL_S"]

# Buffers per recvmsg_into / writev call (Linux's UIO_MAXIOV).
IOV_MAX = 1024
# Seconds a direct send may wait for the peer to take more bytes before the connection is dropped
# (a peer that stopped reading must not hold a reply's file descriptors forever).
STALL_S = 30.0


class OpenFile:
    """A read-only file descriptor closed when the last reference to it goes: a cache may drop
    it while a :class:`FileRange` that is still being sent keeps it open (CPython's reference
    counting closes it right then; no descriptor number is reused under a pending send)."""

    __slots__ = ("fd",)

    def __init__(self, path: str):
        self.fd = -1  # so __del__ of a failed open closes nothing
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def __del__(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileRange:
    """``nbytes`` bytes of ``file`` (an :class:`OpenFile`) from byte ``offset``: a piece of a
    reply blob (inside ``rpc.BlobPieces``) that is sent with ``os.sendfile``. ``len()`` is
    ``nbytes``; :meth:`read` returns the bytes (for a blob too small to travel on its own)."""

    __slots__ = ("file", "offset", "nbytes")

    def __init__(self, file: OpenFile, offset: int, nbytes: int):
        if offset < 0 or nbytes < 0:
            raise ValueError(f"FileRange: offset and nbytes must be >= 0, got {offset}, {nbytes}")
        self.file, self.offset, self.nbytes = file, offset, nbytes

    def __len__(self) -> int:
        return self.nbytes

    def read(self) -> bytes:
        parts, got = [], 0
        while got < self.nbytes:
            more = os.pread(self.file.fd, self.nbytes - got, self.offset + got)
            if not more:
                raise EOFError(f"file ended {self.nbytes - got} bytes before the end of its range")
            parts.append(more)
            got += len(more)
        return b"".join(parts)


def dup_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A non-blocking ``socket.socket`` on a dup of ``transport``'s socket, or None when the
    transport has no socket (a test double). The caller closes it."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup


def reset(transport: asyncio.BaseTransport) -> None:
    """Drop the connection with a reset: bytes the kernel still queues for the peer are
    discarded (a plain close would keep sending them to a peer that may never read them)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # closed already
    transport.abort()


async def _writable(sock: socket.socket, stall_s: float) -> None:
    """Until ``sock`` takes more bytes; TimeoutError after ``stall_s`` seconds."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        async with asyncio.timeout(stall_s):
            await fut
    finally:
        loop.remove_writer(sock.fileno())


async def send_direct(transport: asyncio.Transport, pieces: list, stall_s: float = STALL_S) -> None:
    """Send ``pieces`` (bytes-like objects and :class:`FileRange`\\ s, in order) on
    ``transport``'s socket, after whatever the transport still buffers. Raises
    ``ConnectionError`` when the transport closes meanwhile, ``TimeoutError`` when the peer
    takes nothing for ``stall_s`` seconds, ``OSError`` from the system calls, ``EOFError`` when a
    file is shorter than its range: the frame is then cut short and the caller must drop the
    connection (its byte stream cannot be framed any more)."""
    # Bytes the transport buffered go first; it flushes them itself when the socket drains.
    # Rare (our replies go out whole unless the peer is slow), so a bounded poll is enough.
    waits = int(stall_s / 0.001)
    while transport.get_write_buffer_size():
        if transport.is_closing() or waits <= 0:
            raise ConnectionResetError("connection closed, or its buffered bytes never went out")
        waits -= 1
        await asyncio.sleep(0.001)
    sock = dup_socket(transport)
    if sock is None:
        raise ConnectionResetError("transport has no socket")
    with sock:
        fd = sock.fileno()
        small: list = []
        for p in pieces:
            if type(p) is not FileRange:
                small.append(p)
                continue
            if small:
                await _send_buffers(transport, sock, small, stall_s)
                small = []
            off, left = p.offset, p.nbytes
            while left:
                try:
                    n = os.sendfile(fd, p.file.fd, off, left)
                except BlockingIOError:
                    await _writable(sock, stall_s)
                    if transport.is_closing():
                        raise ConnectionResetError("connection closed during a direct send") from None
                    continue
                if n == 0:
                    raise EOFError(f"file ended {left} bytes before the end of its range")
                off += n
                left -= n
        if small:
            await _send_buffers(transport, sock, small, stall_s)


async def _send_buffers(transport: asyncio.Transport, sock: socket.socket, bufs: list, stall_s: float) -> None:
    """All of ``bufs`` on ``sock`` (one ``sendmsg`` each round, like a writev)."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        try:
            n = sock.sendmsg(views[:IOV_MAX])
        except BlockingIOError:
            await _writable(sock, stall_s)
            if transport.is_closing():
                raise ConnectionResetError("connection closed during a direct send") from None
            continue
        while n:
            head = views[0]
            if n >= head.nbytes:
                n -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[n:]
                n = 0


def recv_into(sock: socket.socket, segs: list[memoryview]) -> int:
    """Receive what ``sock`` holds now into ``segs`` (in order; one ``recvmsg_into`` of up to
    ``IOV_MAX`` of them). Returns the byte count, 0 when nothing is there now (EAGAIN); raises
    ``ConnectionResetError`` at end of stream (a reply's bytes were still expected)."""
    try:
        n = sock.recvmsg_into(segs[:IOV_MAX])[0]
    except (BlockingIOError, InterruptedError):
        return 0
    if n == 0:
        raise ConnectionResetError("connection closed in the middle of a reply")
    return n
