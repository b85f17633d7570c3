"""Reply bytes received on a connection's socket directly, beside its asyncio transport.

An asyncio ``BufferedProtocol`` takes bytes one buffer per callback round. A reply blob bound
for many caller buffers (a batch of KV blocks: a scatter list of hundreds) is received instead
with ``recvmsg_into`` on a ``dup`` of the connection's socket, up to ``IOV_MAX`` buffers per
system call (:func:`recv_into`). The dup keeps the socket alive however the transport closes
its own descriptor, so a receive never lands on a reused descriptor number.

(A send side with ``os.sendfile`` from chunk files was measured and dropped: on loopback the
receiver, which is the bottleneck, then copies from cold page-cache pages and slowed down more
than the sender saved; see benchmarks/notes/fs.md, "Issue 9: KVCache get, third round".)
"""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["recv_into", "consume", "dup_socket", "IOV_MAX"]

# Buffers per recvmsg_into call (Linux's UIO_MAXIOV).
IOV_MAX = 1024


def dup_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A non-blocking ``socket.socket`` on a dup of ``transport``'s socket, or None when the
    transport has no socket (a test double). The caller closes it."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup


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


def consume(segs: list[memoryview], nbytes: int) -> None:
    """Drop the first ``nbytes`` (received) bytes of ``segs`` in place: filled segments leave the
    list, a partly filled one is cut to what it still expects."""
    i = 0
    while nbytes:
        head = segs[i]
        if nbytes < head.nbytes:
            segs[i] = head[nbytes:]
            break
        nbytes -= head.nbytes
        i += 1
    if i:
        del segs[:i]
