"""Batched exact-size reads (``StorageClient.read_exact``'s contract) issued from the calling
thread over blocking sockets of its own, for synchronous callers (``KVCache.get_into``).

A synchronous call otherwise hands its work to the client's event-loop thread and waits for it:
two cross-CPU wake-ups per call (~170 us a round trip on the 2-vCPU VM of the benchmarks, where
the whole batch of 128 KV blocks takes ~5 ms), plus the loop's per-callback work for every piece
of every reply. Here the caller builds the ``batch_read`` requests, writes them, and receives each
reply's blob straight into the destinations with ``recvmsg_into`` (many buffers per call), all
on its own thread. The wire format is the RPC layer's (``rpc._encode`` frames, packed results).

Sockets are per thread (a thread never waits on another's socket) and per address, one request
in flight on each (replies on a socket come in request order). Anything unexpected on a socket
(a timeout, a reset, a frame that does not parse, a reply to another request) closes that socket
and leaves its reads to the caller's retrying path (None), exactly as a retriable RPC failure
does in the event-loop version; a per-read error that is not retriable (a chunk failing its
CRC32C on storage) is raised as there.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time

import msgpack

from openinfra.fs.errors import Code, make_error
from openinfra.fs.rawsock import IOV_MAX, consume
from openinfra.fs.rpc import _BLOB_EXT, _BLOB_MARK, _REPLY, _REQUEST, _encode, parse_address

__all__ = ["BlockingReads"]

_HEADER = struct.Struct(">I")


class _Broken(Exception):
    """This socket can no longer be trusted: close it, leave its reads to the caller."""


class BlockingReads:
    """``read_exact`` from the calling thread (never the client's event-loop thread)."""

    def __init__(self, storage, *, connect_timeout: float = 2.0, max_frame: int = 72 * 2**20):
        self.storage = storage  # a StorageClient: routing (addresses), io_timeout_s, request grouping
        self.connect_timeout, self.max_frame = connect_timeout, max_frame
        self._local = threading.local()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()  # every open socket of every thread (for close)
        self._ids = itertools.count(1)
        self.closed = False

    # --- sockets -------------------------------------------------------------------------------

    def _socket(self, addr: str, j: int) -> socket.socket:
        """This thread's ``j``-th socket to ``addr`` (a call's ``j``-th request to that node)."""
        mine = getattr(self._local, "socks", None)
        if mine is None:
            mine = self._local.socks = {}
        s = mine.get((addr, j))
        if s is not None and s.fileno() >= 0:
            return s
        if self.closed:
            raise _Broken("closed")
        host, port = parse_address(addr)
        try:
            s = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as exc:
            raise _Broken(str(exc)) from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Non-blocking, waited for with poll only when nothing is there (a socket with a timeout
        # would poll before every receive: two system calls each).
        s.setblocking(False)
        with self._lock:
            if self.closed:
                s.close()
                raise _Broken("closed")
            self._socks.add(s)
        mine[(addr, j)] = s
        return s

    def _drop(self, key: tuple[str, int], s: socket.socket) -> None:
        mine = getattr(self._local, "socks", None)
        if mine is not None and mine.get(key) is s:
            del mine[key]
        with self._lock:
            self._socks.discard(s)
        s.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            socks, self._socks = self._socks, set()
        for s in socks:
            s.close()

    # --- receiving -----------------------------------------------------------------------------

    @staticmethod
    def _wait(s: socket.socket, deadline: float, events: int = select.POLLIN) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Broken("deadline passed")
        p = select.poll()
        p.register(s, events)
        if not p.poll(max(1, int(left * 1000))):
            raise _Broken("deadline passed")

    def _send(self, s: socket.socket, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[s.send(view):]
            except (BlockingIOError, InterruptedError):
                self._wait(s, deadline, select.POLLOUT)

    def _receive(self, s: socket.socket, recv, deadline: float) -> int:
        """``recv()`` (a receive call on ``s``) once something is there: at least one byte, waited
        for up to the deadline; a reset or the end of the stream breaks the socket."""
        while True:
            try:
                got = recv()
            except (BlockingIOError, InterruptedError):
                self._wait(s, deadline)
                continue
            except OSError as exc:
                raise _Broken(str(exc) or type(exc).__name__) from None
            if not got:
                raise _Broken("connection closed in the middle of a reply")
            return got

    def _recv_some(self, s: socket.socket, buf: memoryview, deadline: float) -> int:
        """What ``s`` holds now into ``buf`` (at least one byte; waits for it)."""
        return self._receive(s, lambda: s.recv_into(buf), deadline)

    def _recv_into(self, s: socket.socket, segs: list[memoryview], n: int, deadline: float) -> None:
        """Exactly ``n`` bytes into ``segs`` (which hold exactly ``n``, none empty)."""
        segs = list(segs)
        while n:
            got = self._receive(s, lambda: s.recvmsg_into(segs[:IOV_MAX])[0], deadline)
            n -= got
            consume(segs, got)

    def _reply(self, s: socket.socket, rid: int, deadline: float):
        """The next reply on ``s`` up to its blob: ``(code, payload, blob sizes, blob bytes
        received with the head)``. The head is taken with one receive where it fits in 4 KiB
        (a batch_read reply's head is a few hundred bytes); bytes past it are the blob's first."""
        head = bytearray(4096)
        view = memoryview(head)
        have = 0
        while have < 9:
            have += self._recv_some(s, view[have:], deadline)
        (length,) = _HEADER.unpack_from(head, 0)
        if length > self.max_frame or length < 1:
            raise _Broken(f"reply frame of {length} bytes")
        blob_frame = head[4] == _BLOB_MARK[0]
        if blob_frame:
            if length < 5:
                raise _Broken("blob frame shorter than its header")
            (n,) = _HEADER.unpack_from(head, 5)
            if 5 + n > length:
                raise _Broken("blob frame: msgpack length past the end")
            start, end = 9, 9 + n
        else:
            start, end = 4, 4 + length
        if end > len(head):  # a big head: a buffer of its own, filled up to the head's end only
            big = bytearray(end)
            big[:have] = view[:have]
            head, view = big, memoryview(big)
        while have < end:
            have += self._recv_some(s, view[have:], deadline)
        sizes: list[int] = []

        def hook(code: int, data: bytes):
            if code != _BLOB_EXT or len(data) != 4:
                return msgpack.ExtType(code, data)
            sizes.append(_HEADER.unpack(data)[0])
            return None  # (the blob's place in the result; the caller knows it is "data")

        try:
            msg = msgpack.unpackb(view[start:end], raw=False, strict_map_key=False,
                                  **({"ext_hook": hook} if blob_frame else {}))
        except Exception:
            raise _Broken("reply is not msgpack") from None
        if blob_frame and sum(sizes) != length - 5 - n:
            raise _Broken("blob frame: blob lengths do not add up to the frame length")
        if type(msg) is not list or len(msg) != 4 or msg[0] != _REPLY or msg[1] != rid:
            raise _Broken("not the reply to this request")
        extra = view[end:have]
        if extra.nbytes > sum(sizes):
            raise _Broken("bytes past the end of the reply")
        return msg[2], msg[3], sizes, extra

    def _recv_blob(self, s: socket.socket, segs: list[memoryview], n: int, extra: memoryview,
                   deadline: float) -> None:
        """The blob of ``n`` bytes into ``segs`` (exactly ``n``): first ``extra`` (its bytes that
        came with the reply's head), then from the socket."""
        segs = list(segs)
        pos, k = 0, extra.nbytes
        while pos < k:
            d = segs[0]
            m = min(d.nbytes, k - pos)
            d[:m] = extra[pos:pos + m]
            pos += m
            if m == d.nbytes:
                segs.pop(0)
            else:
                segs[0] = d[m:]
        if n > k:
            self._recv_into(s, segs, n - k, deadline)

    # --- reads ---------------------------------------------------------------------------------

    def read_exact(self, chains: list[int], items: list[bytes], dests: list[memoryview]) -> list[bool | None]:
        """:meth:`StorageClient.read_exact` (same arguments, results and errors) on this thread."""
        from openinfra.fs.client.storage_client import _reply_results, _result_size

        n = len(items)
        if len(chains) != n or len(dests) != n:
            raise ValueError(f"read_exact: {n} items, {len(chains)} chains, {len(dests)} destinations")
        out: list[bool | None] = [None] * n
        timeout = self.storage.io_timeout_s
        deadline = time.monotonic() + timeout
        sent = []
        per_addr: dict[str, int] = {}
        for addr, idxs, want in self.storage.exact_requests(chains, dests):
            k = len(idxs)
            head = bytes((0x90 | k,)) if k < 16 else b"\xdc" + k.to_bytes(2, "big")
            rid = next(self._ids)
            frame = _encode([_REQUEST, rid, "batch_read", timeout,
                             {"reads": head + b"".join([items[i] for i in idxs]), "packed": True}])
            key = (addr, per_addr.get(addr, 0))  # one request in flight per socket
            per_addr[addr] = key[1] + 1
            try:
                s = self._socket(*key)
            except _Broken:
                continue  # not connected: left to the caller's retrying path
            try:
                self._send(s, frame[0] if len(frame) == 1 else b"".join(frame), deadline)
            except (_Broken, OSError):
                self._drop(key, s)
                continue
            sent.append((key, s, rid, idxs, want))
        error = None
        for key, s, rid, idxs, want in sent:
            try:
                self._one_reply(key[0], s, rid, idxs, want, dests, out, deadline, _reply_results, _result_size)
            except _Broken:
                self._drop(key, s)
                for i in idxs:
                    out[i] = None
            except Exception as exc:  # a per-read error that is not retriable: raised after the rest
                # (the socket stays in step: the whole reply was read before the results were looked at)
                for i in idxs:
                    out[i] = None
                error = error or exc
        if error is not None:
            raise error
        return out

    def _one_reply(self, addr, s, rid, idxs, want, dests, out, deadline, _reply_results, _result_size) -> None:
        code, payload, sizes, extra = self._reply(s, rid, deadline)
        k = len(idxs)
        if code is not None:
            if len(sizes):
                raise _Broken("an error reply with blobs")
            err = make_error(code, payload)
            if err.retriable:
                return  # the whole request is left to the caller's retrying path
            raise err
        if type(payload) is not dict or len(sizes) > 1:
            raise _Broken("batch_read reply: unexpected shape")
        try:
            results = _reply_results(payload, [], k, addr)
        except Exception:
            raise _Broken("batch_read reply: bad results") from None
        blob = sizes[0] if sizes else None
        got = [one[0] if type(one) is list and len(one) == 3 else None for one in results]
        if blob is not None and got == want and sum(want) == blob:
            self._recv_blob(s, [dests[i] for i in idxs], blob, extra, deadline)  # the common case: all whole
            for i in idxs:
                out[i] = True
            return
        if blob is not None:
            buf = bytearray(blob)
            if blob:
                self._recv_blob(s, [memoryview(buf)], blob, extra, deadline)
            data = memoryview(buf)
        else:
            data = payload.get("data", b"")
            if not isinstance(data, (bytes, bytearray)):
                raise _Broken("batch_read reply: bad data")
            data = memoryview(data)
        # (the reply is all in: the socket is in step for the next request whatever follows)
        pos = 0
        for i, one in zip(idxs, results):
            m = _result_size(one, addr)  # raises a non-retriable per-read error
            if m is None:
                continue
            if pos + m > data.nbytes:
                raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results add up past the data")
            d = dests[i]
            ok = m == d.nbytes
            if ok:
                d[:] = data[pos:pos + m]
            out[i] = ok
            pos += m
        if pos != data.nbytes:
            raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results do not add up to the data")
