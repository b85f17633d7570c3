"""The client connection's reply parser (``_ClientProtocol``): frames cut at any byte, blobs
received straight into the caller's buffers (sinks, scatter lists), callers that stopped waiting,
and malformed replies. Fed by hand (no sockets), so every split point is exercised."""

from __future__ import annotations

import asyncio
import os
import random

import msgpack
import pytest

from openinfra.fs import rpc
from openinfra.fs.errors import Code, FsError

pytestmark = pytest.mark.unit


class _Conn:
    """What the protocol needs of a ``_Connection``: pending calls, limits, close reporting."""

    def __init__(self, max_frame: int = rpc.DEFAULT_MAX_FRAME):
        self.pending: dict[int, rpc._Pending] = {}
        self.address, self.max_frame = "test:1", max_frame
        self.error = None
        self.closed_with: list = []

    def _closed(self, error) -> None:
        self.closed_with.append(error)
        for p in self.pending.values():
            if not p.fut.done():
                p.fut.set_exception(error or FsError(Code.RPC_CONNECT, "closed"))
        self.pending.clear()


class _Transport:
    def __init__(self):
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name: str, default=None):
        return default  # no socket: the protocol receives only through buffer_updated


def _proto(conn: _Conn) -> rpc._ClientProtocol:
    p = rpc._ClientProtocol(conn)
    p.connection_made(_Transport())
    return p


def _feed(p: rpc._ClientProtocol, data: bytes, sizes) -> None:
    """Deliver ``data`` as the kernel would, in recvs of at most the next of ``sizes`` bytes."""
    pos = 0
    while pos < len(data):
        buf = p.get_buffer(-1)
        n = min(buf.nbytes, next(sizes), len(data) - pos)
        assert n > 0
        buf[:n] = data[pos:pos + n]
        pos += n
        p.buffer_updated(n)


def _reply(rid: int, result) -> bytes:
    return b"".join(bytes(x) for x in rpc._encode([1, rid, None, result]))


def _wait(loop, rid: int, conn: _Conn, sink=None) -> asyncio.Future:
    fut = loop.create_future()
    conn.pending[rid] = rpc._Pending(fut, sink)
    return fut


def _values(fut: asyncio.Future):
    code, payload = fut.result()
    assert code is None
    return payload


@pytest.mark.parametrize("split", ["bytes", "odd", "large"])
def test_frames_parse_at_any_split(split):
    """Small, large inline and blob frames, back to back, cut into recvs of 1 byte, of odd sizes
    or of up to 1 MiB: every reply reaches its caller intact, blobs as memoryviews."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        p = _proto(conn)
        rng = random.Random(1)
        # 1-byte recvs are slow in Python: smaller replies there, the same kinds of frame.
        scale = 1 if split != "bytes" else 10
        blob = os.urandom(300_000 if scale == 1 else 70_000)  # >= 64 KiB: a blob either way
        inline_big = [os.urandom(1000) for _ in range(400 // scale)]  # over the 256 KiB buffer when scale 1
        pieces = rpc.BlobPieces([blob[:30_000], blob[30_000:]])
        replies = [(1, {"x": 1}), (2, {"data": blob, "v": 7}), (3, inline_big),
                   (4, {"results": [[pieces.nbytes, 1, pieces.nbytes]], "data": pieces}), (5, "done")]
        futs = {rid: _wait(loop, rid, conn) for rid, _ in replies}
        data = b"".join(_reply(rid, r) for rid, r in replies)
        sizes = {"bytes": iter(lambda: 1, 0), "odd": iter(lambda: rng.choice([1, 3, 4, 5, 9, 777, 65536]), 0),
                 "large": iter(lambda: 1 << 20, 0)}[split]
        _feed(p, data, sizes)
        assert not conn.closed_with
        assert _values(futs[1]) == {"x": 1}
        got = _values(futs[2])
        assert got["v"] == 7 and bytes(got["data"]) == blob
        assert isinstance(got["data"], memoryview)
        assert _values(futs[3]) == inline_big
        assert bytes(_values(futs[4])["data"]) == blob
        assert _values(futs[5]) == "done"
        assert p.start == p.end == 0 and not p.fill  # nothing left half-parsed
    finally:
        loop.close()


def test_sink_places_blob_into_scatter_list():
    """A sink's scatter list (a header buffer, then a tensor-like buffer) receives the blob; the
    result holds a Placed; a blob larger than the buffers goes to scratch instead."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        p = _proto(conn)
        blob = os.urandom(128 + 65536)
        head, body = bytearray(128), bytearray(65536)
        dest = [memoryview(head), memoryview(body)]

        def sink(result):
            result["data"].dest = dest

        fut = _wait(loop, 1, conn, sink)
        small = [memoryview(bytearray(100))]
        fut2 = _wait(loop, 2, conn, lambda r: setattr(r["data"], "dest", small))
        _feed(p, _reply(1, {"data": blob}) + _reply(2, {"data": blob}), iter(lambda: 5000, 0))
        placed = _values(fut)["data"]
        assert isinstance(placed, rpc.Placed) and placed.nbytes == len(blob) and placed.dest is dest
        assert bytes(head) + bytes(body) == blob
        scratch = _values(fut2)["data"]
        assert isinstance(scratch, memoryview) and bytes(scratch) == blob
        assert bytes(small[0]) == bytes(100)  # too small: never written
    finally:
        loop.close()


def test_caller_that_stopped_waiting_never_gets_its_buffers_written():
    """A call that timed out (its future cancelled) while its blob was half received: the rest
    goes to scratch, the caller's buffer keeps what it had, and the next reply still parses."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        p = _proto(conn)
        blob = os.urandom(200_000)
        buf = bytearray(b"\xee" * 200_000)
        fut = _wait(loop, 1, conn, lambda r: setattr(r["data"], "dest", [memoryview(buf)]))
        data = _reply(1, {"data": blob})
        cut = len(data) - 150_000  # the msgpack part and the start of the blob
        _feed(p, data[:cut], iter(lambda: 1 << 20, 0))
        written = bytes(buf)
        assert p.fill  # mid-blob, receiving into ``buf``
        conn.pending.pop(1)
        fut.cancel()  # what _Connection.call does when its deadline passes
        nxt = _wait(loop, 2, conn)
        _feed(p, data[cut:] + _reply(2, "next"), iter(lambda: 40_000, 0))
        assert bytes(buf) == written and bytes(buf[-150_000:]) == b"\xee" * 150_000
        assert _values(nxt) == "next" and not conn.closed_with
    finally:
        loop.close()


@pytest.mark.parametrize("bad", ["not_msgpack", "lengths", "not_reply", "too_large"])
def test_malformed_replies_close_the_connection_with_a_clear_error(bad):
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn(max_frame=1 << 20)
        p = _proto(conn)
        fut = _wait(loop, 1, conn)
        if bad == "not_msgpack":
            data = b"\x00\x00\x00\x03" + b"\x92\xc1\xc1"
        elif bad == "lengths":  # the blob lengths claim more than the frame holds
            body = msgpack.packb([1, 1, None, msgpack.ExtType(1, (100).to_bytes(4, "big"))])
            frame = b"\xc1" + len(body).to_bytes(4, "big") + body + bytes(50)
            data = len(frame).to_bytes(4, "big") + frame
        elif bad == "not_reply":
            data = rpc.pack_frame({"hello": 1})
        else:
            data = (2 << 20).to_bytes(4, "big") + bytes(10)
        _feed(p, data, iter(lambda: 7, 0))
        assert conn.closed_with and p.transport.aborted
        with pytest.raises(FsError) as e:
            fut.result()
        assert e.value.code == Code.RPC_MALFORMED and "bad reply from test:1" in str(e.value)
    finally:
        loop.close()
