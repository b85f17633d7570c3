"""RPC: asyncio over TCP, length-prefixed msgpack frames, request ids, deadlines, a frame limit.

Wire format (one frame = 4-byte big-endian body length + msgpack body):

* request ``[0, request_id, method, timeout_s, args]`` (``args`` a map, ``timeout_s`` the time the
  caller still waits, so the server drops work nobody waits for)
* reply ``[1, request_id, None, result]`` or ``[1, request_id, code, message]`` on error

Binary values of 64 KiB or more travel after the msgpack body (see ``_encode``) and reach the
handler or caller as ``memoryview``s.

Several requests may be in flight on one connection; replies come back in completion order and
are matched by id. A malformed body, an unknown method or bad arguments get an error reply and
the connection stays up; a frame over the size limit gets an error reply and the connection is
closed (its remaining bytes cannot be trusted). Nothing a peer sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgpack

from openinfra.fs.errors import Code, FsError, RpcError, make_error
from openinfra.fs.rawsock import consume, dup_socket, recv_into

__all__ = [
    "RpcServer", "RpcClient", "SLOW", "BlobRef", "BlobPieces", "Placed", "DEFAULT_MAX_FRAME", "pack_frame", "parse_address", "format_address", "run_loop",
]

DEFAULT_MAX_FRAME = 72 * 2**20  # a 64 MiB chunk plus its request fields
_HEADER = struct.Struct(">I")
_REQUEST, _REPLY = 0, 1
log = logging.getLogger("openinfra.fs.rpc")

Handler = Callable[..., Awaitable[Any]]


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; raises ValueError on anything else."""
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
    elif isinstance(address, str) and address.count(":") == 1:
        host, _, port_s = address.partition(":")
        if not port_s.isdigit():
            raise ValueError(f"address: port must be a number, got {address!r}")
        port = int(port_s)
    else:
        raise ValueError(f"address: expected 'host:port', got {address!r}")
    if not isinstance(port, int) or not 0 < port < 65536 or not host:
        raise ValueError(f"address: expected 'host:port' with port 1..65535, got {address!r}")
    return str(host), port


def format_address(host: str, port: int) -> str:
    return f"{host}:{port}"


def run_loop(main: Awaitable[Any]) -> Any:
    """Run ``main`` on uvloop when it is installed (faster sockets), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# Large binary values (chunk data) travel outside the msgpack body: the body then starts with
# 0xc1 (a byte msgpack never uses), a 4-byte msgpack length, the msgpack with each blob replaced
# by ExtType(1, 4-byte length), then the blobs in order. This saves a copy on each side of every
# hop; the receiver gets the blobs as memoryviews into the frame.
_BLOB_MARK = b"\xc1"
_BLOB_EXT = 1
_BLOB_MIN = 64 * 1024


class BlobPieces:
    """One blob made of several buffers sent back to back, never joined: the receiver sees a
    single blob of ``nbytes`` (a handler's reply of many chunk reads, say). Below the blob
    threshold the pieces are joined and travel inside the msgpack body like any small bytes."""

    __slots__ = ("pieces", "nbytes")

    def __init__(self, pieces: list, nbytes: int | None = None):
        """``nbytes``: the pieces' total size when the caller knows it (saves a pass over them)."""
        self.pieces = pieces
        self.nbytes = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces) if nbytes is None else nbytes


def _extract(obj: Any, blobs: list, size: list[int]) -> Any:
    """``obj`` with each blob replaced by its marker; the blobs' pieces go to ``blobs`` and their
    byte count is added to ``size[0]``."""
    if type(obj) is BlobPieces:
        if obj.nbytes >= _BLOB_MIN:
            blobs.extend(obj.pieces)  # consecutive on the wire: one blob for the receiver
            size[0] += obj.nbytes
            return msgpack.ExtType(_BLOB_EXT, _HEADER.pack(obj.nbytes))
        return b"".join(obj.pieces)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        n = obj.nbytes if isinstance(obj, memoryview) else len(obj)
        if n >= _BLOB_MIN:
            blobs.append(obj)
            size[0] += n
            return msgpack.ExtType(_BLOB_EXT, _HEADER.pack(n))
        return obj
    if isinstance(obj, dict):
        return {k: v if type(v) in _SCALARS else _extract(v, blobs, size) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [v if type(v) in _SCALARS else _extract(v, blobs, size) for v in obj]
    return obj


# Types that never hold a blob: the walks skip them without a call (a batch reply has many).
_SCALARS = frozenset((int, float, str, bool, type(None)))


def _has_blob(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` holds a blob (read-only scan: most messages have none and skip the copy)."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= _BLOB_MIN
    if t is memoryview:
        return obj.nbytes >= _BLOB_MIN
    if t is BlobPieces:
        return True
    if depth < 6:
        if t is dict:
            values = obj.values()
        elif t is list or t is tuple:
            values = obj
        else:
            return False
        for v in values:
            tv = type(v)
            if tv is int or tv is str or v is None:  # most of a request's fields: no call
                continue
            if _has_blob(v, depth + 1):
                return True
    return False


def _encode(obj: Any) -> list:
    """The pieces of one frame: small frames as one piece (one send), blobs as pieces of their own."""
    if not _has_blob(obj):
        body = msgpack.packb(obj, use_bin_type=True)
        return [_HEADER.pack(len(body)) + body]
    blobs: list = []
    size = [0]
    body = msgpack.packb(_extract(obj, blobs, size), use_bin_type=True)
    total = 5 + len(body) + size[0]
    return [_HEADER.pack(total) + _BLOB_MARK + _HEADER.pack(len(body)) + body, *blobs]


def _decode(body: bytes) -> Any:
    """Inverse of :func:`_encode` for one frame body; raises ValueError on malformed input."""
    if body[:1] != _BLOB_MARK:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    if len(body) < 5:
        raise ValueError("blob frame shorter than its header")
    (n,) = _HEADER.unpack_from(body, 1)
    if 5 + n > len(body):
        raise ValueError("blob frame: msgpack length past the end")
    view = memoryview(body)
    pos = [5 + n]

    def hook(code: int, data: bytes):
        if code != _BLOB_EXT or len(data) != 4:
            return msgpack.ExtType(code, data)
        (length,) = _HEADER.unpack(data)
        start, end = pos[0], pos[0] + length
        if end > len(body):
            raise ValueError("blob past the end of the frame")
        pos[0] = end
        return view[start:end]

    obj = msgpack.unpackb(view[5:5 + n], raw=False, strict_map_key=False, ext_hook=hook)
    if pos[0] != len(body):
        raise ValueError("blob frame: bytes left over after the blobs")
    return obj


def pack_frame(obj: Any) -> bytes:
    """One frame as bytes: the 4-byte big-endian length and the body (for tests and tools)."""
    return b"".join(bytes(p) for p in _encode(obj))


SLOW = object()  # a ``fast_`` handler's "not here: take the usual path"
_FAST_MAX = 4096  # bodies offered to fast handlers at most (small requests: no blobs)


class _Outbox:
    """Frames queued on one connection and written once per event-loop turn: replies (or
    requests) that are ready together share one send() system call, which costs more than the
    bytes on a busy machine. Blobs are written as they are, never copied into a joined buffer."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.pieces: list = []
        self.scheduled = False

    async def send(self, obj: Any) -> None:
        self.pieces.extend(_encode(obj))  # one frame's pieces stay together and in order
        if not self.scheduled:
            # The first frame of a loop turn goes out now (a lone request or reply waits for no
            # loop turn: ~40 us a hop on this 2-core box); frames queued after it in the same turn
            # go out together at the end of the turn.
            self.scheduled = True
            self._write()
            asyncio.get_running_loop().call_soon(self._flush)
        await self.writer.drain()

    def _flush(self) -> None:
        self.scheduled = False
        if self.pieces:
            self._write()

    def _write(self) -> None:
        pieces, self.pieces = self.pieces, []
        out: list = []
        small: list = []
        for p in pieces:
            if len(p) < _BLOB_MIN:
                small.append(p)
                continue
            if small:
                out.append(b"".join(small))
                small = []
            out.append(p)
        if small:
            out.append(b"".join(small))
        try:
            # One writelines: uvloop sends the whole list with one writev where the socket takes
            # it, where a write() per piece is a send (and a loopback wake-up of the reader) each.
            self.writer.writelines(out)
        except (ConnectionError, RuntimeError):
            pass  # the reader side notices the closed connection


async def _send(writer: asyncio.StreamWriter, obj: Any) -> None:
    """Write one frame directly (connection-level errors, before an outbox exists)."""
    for piece in _encode(obj):
        writer.write(piece)
    await writer.drain()


@dataclass
class _Method:
    fn: Handler
    params: frozenset[str]
    required: frozenset[str]
    var_kw: bool


class RpcServer:
    """Serves the ``rpc_*`` coroutine methods of the objects passed to :meth:`add_service`.

    ``rpc_stat(self, path, user=None)`` is reachable as method ``"stat"`` with args
    ``{"path": ..., "user": ...}``. Handlers raise :class:`FsError` for errors the caller should
    see; any other exception is logged and replied as ``INTERNAL``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_frame: int = DEFAULT_MAX_FRAME,
                 name: str = "rpc", on_request: Callable[[str, str, float], None] | None = None):
        if not isinstance(max_frame, int) or max_frame < 1024:
            raise ValueError(f"max_frame: expected an int >= 1024 bytes, got {max_frame!r}")
        self.host, self.port, self.max_frame, self.name = host, port, max_frame, name
        self._methods: dict[str, _Method] = {}
        self._fast: dict[str, Callable[..., Any]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self.on_request = on_request  # (method, status, seconds) for metrics

    def add_service(self, obj: Any, prefix: str = "") -> None:
        """Also registers ``fast_<name>`` plain (not async) methods: a request for ``<name>`` is
        first offered to it, right in the connection's read loop (no task, no loop turn before
        the reply is written); it returns the result, raises :class:`FsError` for an error
        reply, or returns :data:`SLOW` (having changed nothing) to hand the request to
        ``rpc_<name>`` as usual. Any other exception it raises also hands the request on."""
        for attr in dir(obj):
            if attr.startswith("fast_") and callable(getattr(obj, attr)) and hasattr(obj, "rpc_" + attr[5:]):
                self._fast[prefix + attr[5:]] = getattr(obj, attr)
                continue
            if not attr.startswith("rpc_"):
                continue
            fn = getattr(obj, attr)
            sig = inspect.signature(fn)
            params = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            required = {p.name for p in sig.parameters.values()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}
            var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            self._methods[prefix + attr[4:]] = _Method(fn, frozenset(params), frozenset(required), var_kw)

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve_conn, self.host, self.port, reuse_address=True,
                                                  limit=8 * 2**20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        outbox = _Outbox(writer)
        try:
            while True:
                try:
                    header = await reader.readexactly(4)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                (length,) = _HEADER.unpack(header)
                if length > self.max_frame:
                    await _send(writer, [_REPLY, 0, Code.RPC_TOO_LARGE,
                                         f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"])
                    return  # the rest of the stream cannot be framed any more
                try:
                    body = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if self._fast and length <= _FAST_MAX and await self._handle_fast(body, outbox):
                    continue
                task = asyncio.ensure_future(self._handle(body, outbox))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:  # never let one connection take the server down
            log.exception("connection handler failed")
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _handle_fast(self, body: bytes, outbox: _Outbox) -> bool:
        """Serve a small request with its method's ``fast_`` handler (see :meth:`add_service`);
        False when it is not one, is malformed in any way, or the handler says SLOW: the
        request then takes :meth:`_handle`, which replies to everything."""
        t0 = time.perf_counter()
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:
            return False
        if type(msg) is not list or len(msg) != 5 or msg[0] != _REQUEST:
            return False
        _, rid, method, timeout, args = msg
        fast = self._fast.get(method) if type(method) is str else None
        if (fast is None or type(rid) is not int or type(args) is not dict or not isinstance(timeout, (int, float))
                or timeout <= 0 or not all(type(k) is str for k in args)):
            return False
        m = self._methods[method]
        if (not m.var_kw and not args.keys() <= m.params) or not m.required <= args.keys():
            return False
        status = "ok"
        try:
            result = fast(**args)
        except FsError as exc:
            status = exc.code
            reply = [_REPLY, rid, exc.code, exc.message]
        except Exception:
            return False
        else:
            if result is SLOW:
                return False
            reply = [_REPLY, rid, None, result]
        await self._reply(outbox, reply, method, status, t0)
        return True

    async def _reply(self, outbox: _Outbox, reply: list, method: str, status, t0: float) -> None:
        # the request's metric (method, status, seconds), then its reply on the connection
        if self.on_request is not None:
            self.on_request(method, status, time.perf_counter() - t0)
        try:
            await outbox.send(reply)
        except (ConnectionError, RuntimeError):
            pass  # the caller went away; nothing to do
        except Exception:
            log.exception("%s: could not send reply to %s", self.name, method)

    async def _handle(self, body: bytes, outbox: _Outbox) -> None:
        t0 = time.perf_counter()
        rid, method, status = 0, "?", "ok"
        try:
            try:
                msg = _decode(body)
            except Exception as exc:
                raise make_error(Code.RPC_MALFORMED, f"body is not msgpack: {type(exc).__name__}") from None
            if (not isinstance(msg, list) or len(msg) != 5 or msg[0] != _REQUEST or not isinstance(msg[1], int)
                    or not isinstance(msg[2], str) or not isinstance(msg[3], (int, float)) or not isinstance(msg[4], dict)):
                if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], int):
                    rid = msg[1]
                raise make_error(Code.RPC_MALFORMED, "expected [0, id:int, method:str, timeout_s:number, args:map]")
            _, rid, method, timeout, args = msg
            m = self._methods.get(method)
            if m is None:
                raise make_error(Code.RPC_UNKNOWN_METHOD, f"{self.name} has no method {method!r}")
            keys = set(args)
            if not all(isinstance(k, str) for k in keys) or (not m.var_kw and not keys <= m.params) or not m.required <= keys:
                raise make_error(Code.RPC_BAD_ARGS, f"{method}: expected args {sorted(m.params)} "
                                 f"(required {sorted(m.required)}), got {sorted(map(str, keys))}")
            if timeout <= 0:
                raise make_error(Code.RPC_TIMEOUT, f"{method}: deadline already passed")
            try:
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                    result = await m.fn(**args)
            except TimeoutError:
                raise make_error(Code.RPC_TIMEOUT, f"{method}: deadline of {timeout:.3g} s passed") from None
            reply = [_REPLY, rid, None, result]
        except FsError as exc:
            status = exc.code
            reply = [_REPLY, rid, exc.code, exc.message]
        except (TypeError, ValueError) as exc:  # argument values a handler rejected
            status = Code.RPC_BAD_ARGS
            reply = [_REPLY, rid, Code.RPC_BAD_ARGS, f"{method}: {exc}"]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: handler %s failed", self.name, method)
            status = Code.INTERNAL
            reply = [_REPLY, rid, Code.INTERNAL, f"{method}: {type(exc).__name__}: {exc}"]
        await self._reply(outbox, reply, method, status, t0)


class BlobRef:
    """A blob of a reply whose bytes are still on the wire: what a ``sink`` (see
    :meth:`RpcClient.call`) sees in place of the blob. Set ``dest`` to a list of writable
    memoryviews (a scatter list) and the bytes are received straight into them, in order, when
    ``nbytes`` fits in their total size; the reply then holds a :class:`Placed` in its place."""

    __slots__ = ("nbytes", "dest")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.dest: list[memoryview] | None = None


class Placed:
    """A blob that was received into the caller's buffers: ``nbytes`` bytes written from the
    start of ``dest`` (the scatter list the sink gave)."""

    __slots__ = ("nbytes", "dest")

    def __init__(self, nbytes: int, dest: list[memoryview]):
        self.nbytes, self.dest = nbytes, dest

    def __repr__(self) -> str:
        return f"Placed({self.nbytes})"


def _swap_refs(obj: Any, done: dict) -> Any:
    """``obj`` with every :class:`BlobRef` replaced by its received value (``done[id(ref)]``)."""
    t = type(obj)
    if t is BlobRef:
        return done[id(obj)]
    if t is dict:
        return {k: v if type(v) in _SCALARS else _swap_refs(v, done) for k, v in obj.items()}
    if t is list:
        return [v if type(v) in _SCALARS else _swap_refs(v, done) for v in obj]
    return obj


class _Pending:
    __slots__ = ("fut", "sink")

    def __init__(self, fut: asyncio.Future, sink: Callable[[Any], None] | None):
        self.fut, self.sink = fut, sink


class _ClientProtocol(asyncio.BufferedProtocol):
    """The client side of one connection, reading replies with ``recv_into``.

    Small frames are parsed out of one reusable 256 KiB buffer. A frame that does not fit gets
    a buffer of its own, and each blob of a reply is received straight into where it belongs:
    the caller's buffers when its sink placed it (a KV tensor, the slice of a read buffer), else
    a fresh ``bytearray``. So blob bytes are copied once, by the kernel, against three copies
    with a ``StreamReader`` (its buffer, ``readexactly``, the caller's join). What is copied out
    of the small buffer is at most its size per frame (the start of the first blob).

    A blob with at least ``_DIRECT_MIN`` bytes still to come is received with ``recvmsg_into``
    on a dup of the socket (:func:`rawsock.recv_into`): many destination buffers per system
    call and no callback round per buffer; the transport's own reads then find the socket
    empty until the blob is in."""

    _SMALL = 256 * 1024
    _DIRECT_MIN = 256 * 1024

    def __init__(self, conn: "_Connection"):
        self.conn = conn
        self.buf = bytearray(self._SMALL)
        self.view = memoryview(self.buf)
        self.start = self.end = 0          # unparsed bytes: buf[start:end]
        self.fill: list[memoryview] = []   # when set: receive into these segments, in order
        self.fill_left = 0                 # bytes still to receive into ``fill``
        self.on_filled: Callable[[], None] | None = None
        self.fill_guard: asyncio.Future | None = None  # the caller's future while filling its buffers
        self.frame_left = 0                # bytes of the current frame still to come (blob frames)
        self.blobs: list[BlobRef] = []     # blobs of the current frame, in wire order
        self.blob_i = 0
        self.done: dict[int, Any] = {}
        self.reply: Any = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.drain_waiters: list[asyncio.Future] = []
        self.sock = None  # a dup of the transport's socket for direct receives (None: none)

    # --- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sock = dup_socket(transport)

    def connection_lost(self, exc) -> None:
        if self.sock is not None:
            self.sock.close()
        self.conn._closed(None)
        for w in self.drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self.drain_waiters.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for w in self.drain_waiters:
            if not w.done():
                w.set_result(None)
        self.drain_waiters.clear()

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if self.paused:
            w = asyncio.get_running_loop().create_future()
            self.drain_waiters.append(w)
            await w

    def _guard_fill(self) -> None:
        if self.fill_guard is not None and self.fill_guard.done():
            # The caller whose buffers these are stopped waiting (timeout, cancel): the
            # rest of its blob goes to scratch, never into memory it may reuse by now.
            self.fill = [memoryview(bytearray(self.fill_left))]
            self.fill_guard = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.fill:
            self._guard_fill()
            return self.fill[0]
        if self.end == len(self.buf):  # full: move the unparsed tail to the front
            n = self.end - self.start
            self.view[:n] = self.view[self.start:self.end]
            self.start, self.end = 0, n
        return self.view[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.fill:
                self._filled(nbytes)
            else:
                self.end += nbytes
            self._parse()
            # A big blob: take what the socket holds now straight into its buffers. Bounded:
            # every round receives bytes of the blob (at most its size) or stops.
            while self.fill and self.fill_left >= self._DIRECT_MIN and self.sock is not None:
                self._guard_fill()
                n = recv_into(self.sock, self.fill)
                if n == 0:
                    break
                self._filled(n)
                self._parse()
        except OSError as exc:  # the direct receive found the connection reset or closed
            self.conn._closed(make_error(Code.RPC_CONNECT, f"connection to {self.conn.address} lost: {exc}"))
            self.transport.abort()
        except _ProtocolError as exc:
            self.conn._closed(make_error(Code.RPC_MALFORMED, f"bad reply from {self.conn.address}: {exc}"))
            self.transport.abort()
        except Exception as exc:  # a bug here must not leave callers waiting
            log.exception("reply parsing failed")
            self.conn._closed(make_error(Code.RPC_MALFORMED, f"bad reply from {self.conn.address}: {exc!r}"))
            self.transport.abort()

    # --- frame parsing -------------------------------------------------------------------------

    def _filled(self, nbytes: int) -> None:
        """``nbytes`` were received into the front of ``fill`` (across segments)."""
        self.fill_left -= nbytes
        consume(self.fill, nbytes)
        if self.fill_left == 0:
            self.fill, self.fill_guard = [], None
            cb, self.on_filled = self.on_filled, None
            cb()

    def _receive_into(self, segments: list[memoryview], nbytes: int, then: Callable[[], None],
                      exact: bool = False) -> None:
        """Put the next ``nbytes`` of the stream into ``segments`` (first what is buffered
        already), then call ``then``; ``segments`` hold at least ``nbytes`` (``exact``: exactly
        ``nbytes``, none of them empty, so they are taken as they are)."""
        if exact:
            segs = list(segments)  # (consumed as the bytes arrive; the caller's list stays whole)
        else:
            segs = []
            left = nbytes
            for s in segments:
                if left <= 0:
                    break
                s = s[:left]
                if s.nbytes:  # an empty segment would be an empty recv buffer
                    segs.append(s)
                    left -= s.nbytes
        have = min(self.end - self.start, nbytes)
        pos = self.start
        while have and segs:  # the bytes that came with the previous recv
            s = segs[0]
            k = min(have, s.nbytes)
            s[:k] = self.view[pos:pos + k]
            pos += k
            have -= k
            if k == s.nbytes:
                segs.pop(0)
            else:
                segs[0] = s[k:]
        got = pos - self.start
        self.start = pos
        if self.start == self.end:
            self.start = self.end = 0
        if got == nbytes:
            then()
            return
        self.fill, self.fill_left, self.on_filled = segs, nbytes - got, then

    def _parse(self) -> None:
        while not self.fill:
            if self.frame_left:  # inside a blob frame: the next blob
                self._next_blob()
                continue
            avail = self.end - self.start
            if avail < 4:
                return
            (length,) = _HEADER.unpack_from(self.view, self.start)
            if length > self.conn.max_frame:
                raise _ProtocolError(f"reply of {length} bytes exceeds the limit of {self.conn.max_frame} bytes")
            if avail < 5:
                return  # not yet known whether this is a blob frame
            if avail >= 9 and self.view[self.start + 4] == _BLOB_MARK[0]:
                (n,) = _HEADER.unpack_from(self.view, self.start + 5)
                if 5 + n > length:
                    raise _ProtocolError("blob frame: msgpack length past the end")
                if 9 + n <= avail:
                    body = self.view[self.start + 9:self.start + 9 + n]
                    self.start += 9 + n
                    self._blob_frame_head(body, length - 5 - n)
                elif 9 + n > len(self.buf):
                    own = bytearray(n)
                    self.start += 9
                    self._receive_into([memoryview(own)], n,
                                       lambda own=own, rest=length - 5 - n: self._blob_frame_head(memoryview(own), rest))
                else:
                    return
            elif self.view[self.start + 4] == _BLOB_MARK[0]:
                return  # the blob header is not complete yet
            elif 4 + length <= avail:
                body = self.view[self.start + 4:self.start + 4 + length]
                self.start += 4 + length
                self._deliver(self._unpack(body))
            elif 4 + length > len(self.buf):
                own = bytearray(length)
                self.start += 4
                self._receive_into([memoryview(own)], length,
                                   lambda own=own: self._deliver(self._unpack(memoryview(own))))
            else:
                return
            if self.start == self.end:
                self.start = self.end = 0

    @staticmethod
    def _unpack(body: memoryview, hook=None) -> Any:
        try:
            if hook is None:
                return msgpack.unpackb(body, raw=False, strict_map_key=False)
            return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=hook)
        except _ProtocolError:
            raise
        except Exception as exc:
            raise _ProtocolError(f"reply is not msgpack: {type(exc).__name__}") from None

    def _blob_frame_head(self, body: memoryview, blob_bytes: int) -> None:
        blobs: list[BlobRef] = []

        def hook(code: int, data: bytes):
            if code != _BLOB_EXT or len(data) != 4:
                return msgpack.ExtType(code, data)
            ref = BlobRef(_HEADER.unpack(data)[0])
            blobs.append(ref)
            return ref

        msg = self._unpack(body, hook)
        if sum(b.nbytes for b in blobs) != blob_bytes:
            raise _ProtocolError("blob frame: blob lengths do not add up to the frame length")
        self._check(msg)
        pending = self.conn.pending.get(msg[1])
        if pending is not None and pending.sink is not None and msg[2] is None:
            try:
                pending.sink(msg[3])
            except Exception:  # a sink that fails places nothing; the caller sees plain blobs
                log.exception("reply sink failed")
                for b in blobs:
                    b.dest = None
        self.reply, self.blobs, self.blob_i, self.done = msg, blobs, 0, {}
        self.frame_left = len(blobs)
        if not blobs:
            self._end_blob_frame()

    def _next_blob(self) -> None:
        ref = self.blobs[self.blob_i]
        dest = ref.dest
        pending = self.conn.pending.get(self.reply[1])
        if dest is not None and (pending is None or pending.fut.done()):
            dest = None  # the caller stopped waiting: its buffers are not ours to write any more
        guard = None
        exact = False
        if dest is not None:
            room, empty = 0, False
            for d in dest:
                n = d.nbytes
                room += n
                empty = empty or not n
            if room < ref.nbytes:
                dest = None
            exact = room == ref.nbytes and not empty
        if dest is not None:
            value: Any = Placed(ref.nbytes, dest)
            guard = pending.fut
        else:
            own = bytearray(ref.nbytes)
            value, dest, exact = memoryview(own), [memoryview(own)], True
        self.done[id(ref)] = value
        self.blob_i += 1
        self.frame_left -= 1
        last = self.frame_left == 0
        self._receive_into(dest, ref.nbytes, self._end_blob_frame if last else _nothing, exact)
        if self.fill:
            self.fill_guard = guard

    def _end_blob_frame(self) -> None:
        msg, done = self.reply, self.done
        self.reply, self.blobs, self.done, self.frame_left = None, [], {}, 0
        if done:
            payload = msg[3]
            if type(payload) is dict:  # the usual place of blobs: values of the result map
                for k, v in payload.items():
                    if type(v) is BlobRef:
                        payload[k] = done.pop(id(v))
            if done:  # blobs deeper down: walk the whole result
                msg = _swap_refs(msg, done)
        self._deliver(msg, checked=True)

    @staticmethod
    def _check(msg: Any) -> None:
        if not isinstance(msg, list) or len(msg) != 4 or msg[0] != _REPLY or not isinstance(msg[1], int):
            raise _ProtocolError("expected [1, id, code, result]")

    def _deliver(self, msg: Any, checked: bool = False) -> None:
        if not checked:
            self._check(msg)
        _, rid, code, payload = msg
        pending = self.conn.pending.pop(rid, None)
        if pending is None:
            if rid == 0 and code is not None:  # a connection-level error (oversized frame)
                self.conn.error = make_error(code, payload)
            return
        if not pending.fut.done():
            pending.fut.set_result((code, payload))


def _nothing() -> None:
    pass


class _ProtocolError(Exception):
    pass


class _Connection:
    """One client connection: requests go out through an :class:`_Outbox`, replies are matched
    to callers by id in :class:`_ClientProtocol`."""

    def __init__(self, address: str, max_frame: int):
        self.address, self.max_frame = address, max_frame
        self.pending: dict[int, _Pending] = {}
        self.ids = itertools.count(1)
        self.closed = False
        self.error: FsError | None = None
        self.protocol = _ClientProtocol(self)
        self.outbox: _Outbox | None = None

    async def open(self, host: str, port: int) -> None:
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: self.protocol, host, port)
        self.outbox = _Outbox(_TransportWriter(transport, self.protocol))

    def _closed(self, error: FsError | None) -> None:
        self.closed = True
        err = error or self.error or make_error(Code.RPC_CONNECT, f"connection to {self.address} closed")
        self.error = err
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(err)

    async def call(self, method: str, args: dict, timeout: float, sink: Callable[[Any], None] | None = None) -> Any:
        if self.closed:
            raise self.error or make_error(Code.RPC_CONNECT, f"connection to {self.address} closed")
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = _Pending(fut, sink)
        try:
            async with asyncio.timeout(timeout):
                await self.outbox.send([_REQUEST, rid, method, timeout, args])
                code, payload = await fut
        except TimeoutError:
            raise make_error(Code.RPC_TIMEOUT, f"{method} on {self.address}: no reply within {timeout:.3g} s") from None
        except (ConnectionError, RuntimeError, OSError) as exc:
            if isinstance(exc, FsError):
                raise
            raise make_error(Code.RPC_CONNECT, f"{method} on {self.address}: {exc}") from None
        finally:
            # A reply still arriving for this id now goes to scratch buffers (see _next_blob):
            # the caller's buffers are not written after it stopped waiting.
            p = self.pending.pop(rid, None)
            if p is not None and not p.fut.done():
                p.fut.cancel()
        if code is not None:
            raise make_error(code, payload)
        return payload

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.writer.close()
        self._closed(None)


class _TransportWriter:
    """The two things :class:`_Outbox` needs from a writer, over a transport and its protocol."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol):
        self.transport, self.protocol = transport, protocol

    def writelines(self, pieces: list) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.writelines(pieces)

    async def drain(self) -> None:
        await self.protocol.drain()

    def close(self) -> None:
        self.transport.close()


class RpcClient:
    """Calls methods on RPC servers; keeps a few connections per address and multiplexes calls.

    ``await client.call("127.0.0.1:9000", "stat", {"path": "/a"}, timeout=5.0)`` returns the
    result or raises the service's error (:class:`FsError`); connection failures raise
    ``RpcError(RPC_CONNECT)`` and missed deadlines ``RpcError(RPC_TIMEOUT)``, both retriable.
    """

    def __init__(self, *, default_timeout: float = 10.0, connect_timeout: float = 2.0,
                 connections_per_address: int = 2, max_frame: int = DEFAULT_MAX_FRAME):
        if default_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("default_timeout and connect_timeout must be > 0 seconds")
        if connections_per_address < 1:
            raise ValueError(f"connections_per_address: expected >= 1, got {connections_per_address}")
        self.default_timeout, self.connect_timeout = default_timeout, connect_timeout
        self.per_address, self.max_frame = connections_per_address, max_frame
        self._conns: dict[str, list[_Connection]] = {}
        self._rr = itertools.count()
        self._connecting: dict[str, asyncio.Lock] = {}

    async def _connection(self, address: str) -> _Connection:
        conns = [c for c in self._conns.get(address, []) if not c.closed]
        self._conns[address] = conns
        if len(conns) >= self.per_address:
            return conns[next(self._rr) % len(conns)]
        lock = self._connecting.setdefault(address, asyncio.Lock())
        async with lock:
            conns = [c for c in self._conns.get(address, []) if not c.closed]
            if conns and len(conns) >= self.per_address:
                return conns[next(self._rr) % len(conns)]
            host, port = parse_address(address)
            conn = _Connection(address, self.max_frame)
            try:
                await asyncio.wait_for(conn.open(host, port), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                conn.close()
                raise make_error(Code.RPC_CONNECT, f"cannot connect to {address}: {exc or type(exc).__name__}") from None
            conns.append(conn)
            self._conns[address] = conns
            return conn

    async def call(self, address: str, method: str, args: dict | None = None, *, timeout: float | None = None,
                   sink: Callable[[Any], None] | None = None) -> Any:
        """``sink``: called with the result as soon as its msgpack part arrived, with a
        :class:`BlobRef` for each blob still to come; setting ``ref.dest`` there receives that
        blob straight into the caller's buffers (the result then holds a :class:`Placed`).
        Only for successful replies that carry blobs; after an error the contents of buffers
        given to a sink are unspecified (a reply may have been part-received)."""
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        deadline = time.monotonic() + timeout
        conn = await self._connection(address)
        return await conn.call(method, args or {}, max(1e-3, deadline - time.monotonic()), sink)

    def drop(self, address: str) -> None:
        """Close the connections to ``address`` (after its process restarted, say)."""
        for c in self._conns.pop(address, []):
            c.close()

    async def close(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.close()
        self._conns.clear()

