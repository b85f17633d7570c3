"""The native client: the file API every other client (fsspec, FUSE, ring I/O, KVCache) builds on.

``AsyncClient`` is the asyncio API; ``Client`` wraps it for synchronous code (its event loop runs
in a helper thread). Metadata goes to a meta service; file data goes straight to the storage
chains, placed by arithmetic on the file's layout (metadata is off the data path after open), in
parallel per chunk. Writes are acknowledged once every replica of the chunk committed them.
A file read sequentially (each read starting where the last one ended) has the next blocks
fetched in the background (``OPENINFRA_FS_READAHEAD`` bytes ahead, 4 MiB; 0 turns it off).

Example::

    from openinfra.fs import Client
    with Client("127.0.0.1:8000") as fs:        # any mgmtd address of the cluster
        fs.mkdir("/data", parents=True)
        with fs.open("/data/a.bin", "wb") as f:
            f.write(b"hello" * 1000)
        assert fs.stat("/data/a.bin").size == 5000
        print(fs.listdir("/data"), fs.read_bytes("/data/a.bin")[:5])
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import stat as _stat
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from openinfra.fs.client.storage_client import RoutingCache, StorageClient, retrying
from openinfra.fs.errors import Code, FsError
from openinfra.fs.meta.paths import split_path
from openinfra.fs.meta.store import User
from openinfra.fs.rpc import RpcClient, parse_address
from openinfra.fs.storage.service import MgmtdLink

__all__ = ["AsyncClient", "AsyncFile", "Client", "File", "FileStat", "User"]

# Sequential read-ahead window per open file (bytes ahead of the current read; 0: off), and the
# largest block fetched in one request. Override with OPENINFRA_FS_READAHEAD (bytes).
_RA_BYTES = int(os.environ.get("OPENINFRA_FS_READAHEAD", 4 << 20))
_RA_BLOCK_MAX = 4 << 20
_RA_SLACK = 256 << 10

_TYPES = {"file": _stat.S_IFREG, "dir": _stat.S_IFDIR, "symlink": _stat.S_IFLNK}


@dataclass(frozen=True)
class FileStat:
    """``stat`` result. ``size`` in bytes; times in seconds since the epoch; ``mode`` includes the
    file-type bits like ``os.stat``'s."""

    inode: int
    type: str          # "file", "dir" or "symlink"
    size: int
    mode: int
    uid: int
    gid: int
    nlink: int
    atime: float
    mtime: float
    ctime: float
    layout: dict | None = None
    target: str | None = None

    @classmethod
    def from_inode(cls, n: dict) -> "FileStat":
        return cls(n["id"], n["type"], n.get("length", 0), _TYPES[n["type"]] | n["mode"], n["uid"], n["gid"],
                   n["nlink"], n["atime"], n["mtime"], n["ctime"], n.get("layout"), n.get("target"))

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"


_MODES = {  # mode -> (read, write, create, exclusive, truncate, append)
    "rb": (True, False, False, False, False, False), "r": (True, False, False, False, False, False),
    "wb": (False, True, True, False, True, False), "w": (False, True, True, False, True, False),
    "ab": (False, True, True, False, False, True), "a": (False, True, True, False, False, True),
    "xb": (False, True, True, True, False, False), "x": (False, True, True, True, False, False),
    "r+b": (True, True, False, False, False, False), "rb+": (True, True, False, False, False, False),
    "w+b": (True, True, True, False, True, False), "wb+": (True, True, True, False, True, False),
}


def _check_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def _ra_reap(t: asyncio.Task) -> None:
    """Retrieve a read-ahead fetch's error (it surfaces, if at all, on the read that needs it)."""
    if not t.cancelled():
        t.exception()


class AsyncClient:
    """Asyncio client. ``mgmtd``: one address or a list (all mgmtd instances of the cluster).

    ``user`` is who the requests run as (uid/gid for permission checks; default root).
    ``retry_s`` bounds how long an operation keeps retrying through failovers.
    """

    def __init__(self, mgmtd: str | list[str], *, user: User | None = None, retry_s: float = 60.0,
                 io_timeout_s: float = 10.0, parallel_chunks: int = 16, length_report_s: float = 5.0):
        addrs = [mgmtd] if isinstance(mgmtd, str) else list(mgmtd)
        if not addrs:
            raise ValueError("mgmtd: expected at least one address")
        for a in addrs:
            parse_address(a)
        if parallel_chunks < 1:
            raise ValueError(f"parallel_chunks: expected >= 1, got {parallel_chunks}")
        self.user = user or User()
        self.retry_s, self.parallel_chunks, self.length_report_s = retry_s, parallel_chunks, length_report_s
        self.client_id = uuid.uuid4().hex
        self.rpc = RpcClient(default_timeout=io_timeout_s, connections_per_address=2)
        self.routing = RoutingCache(MgmtdLink(self.rpc, addrs))
        self.storage = StorageClient(self.rpc, self.routing, client_id=self.client_id, retry_s=retry_s,
                                     io_timeout_s=io_timeout_s)
        self._meta_rr = itertools.count()
        self._open_writes: dict[bytes, "AsyncFile"] = {}
        self._reading_ahead: dict[int, set["AsyncFile"]] = {}  # inode -> its files with a read-ahead window
        self._reporter: asyncio.Task | None = None
        self._req = itertools.count(1)

    async def connect(self) -> "AsyncClient":
        await retrying(self.routing.refresh, self.routing, self.retry_s, "get routing")
        self._reporter = asyncio.ensure_future(self._report_loop())
        return self

    async def close(self) -> None:
        for f in list(self._open_writes.values()):
            try:
                await f.close()
            except FsError:
                pass
        for files in list(self._reading_ahead.values()):  # read-only files left open: stop their fetches
            for f in list(files):
                f.drop_readahead()
        if self._reporter:
            self._reporter.cancel()
        await self.rpc.close()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- meta calls ----------------------------------------------------------------------------

    async def _meta(self, method: str, args: dict, *, idempotent: bool = True) -> Any:
        args = dict(args)
        if method not in ("stat_inode", "close", "sync", "report", "gc", "trash_pending"):
            args["user"] = self.user.wire()
        if not idempotent:
            # One request id for every retry: meta returns the first result after a lost reply.
            args.update(client=self.client_id, req=f"{next(self._req)}-{uuid.uuid4().hex[:8]}")

        async def attempt():
            metas = self.routing.routing.meta_addresses()
            if not metas:
                raise FsError(Code.RPC_CONNECT, "no meta service is alive in the routing info")
            return await self.rpc.call(metas[next(self._meta_rr) % len(metas)], method, args)

        return await retrying(attempt, self.routing, self.retry_s, method)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.length_report_s)
            items = [[f.inode, f.session, f.written_end] for f in self._open_writes.values()]
            if items:
                try:
                    await self._meta("report", {"client": self.client_id, "items": items})
                except Exception:
                    pass  # the next report (or close) carries the length

    # --- namespace -----------------------------------------------------------------------------

    async def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        split_path(path)
        return FileStat.from_inode(await self._meta("stat", {"path": path, "follow": follow_symlinks}))

    async def stat_inode(self, inode: int) -> FileStat:
        """``stat`` by inode id (what FUSE and other inode-based clients need)."""
        _check_int(inode, "inode", 1)
        return FileStat.from_inode(await self._meta("stat_inode", {"inode": inode}))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except FileNotFoundError:
            return False

    async def listdir(self, path: str = "/", detail: bool = False) -> list:
        """Names in ``path`` (sorted), or with ``detail=True`` ``(name, FileStat)`` pairs."""
        split_path(path)
        entries = await self._meta("listdir", {"path": path, "with_attrs": detail})
        if detail:
            return [(e["name"], FileStat.from_inode(e["attrs"])) for e in entries if e.get("attrs")]
        return [e["name"] for e in entries]

    async def mkdir(self, path: str, mode: int = 0o755, parents: bool = False, exist_ok: bool = False,
                    chunk_size: int | None = None, stripe: int | None = None) -> FileStat:
        """Create a directory; ``chunk_size``/``stripe`` set the layout its new files inherit."""
        split_path(path)
        _check_int(mode, "mode")
        layout = {k: v for k, v in (("chunk_size", chunk_size), ("stripe", stripe)) if v is not None} or None
        return FileStat.from_inode(await self._meta("mkdir", {"path": path, "mode": mode, "parents": parents,
                                                               "exist_ok": exist_ok, "layout": layout},
                                                    idempotent=False))

    async def symlink(self, path: str, target: str) -> FileStat:
        split_path(path)
        return FileStat.from_inode(await self._meta("symlink", {"path": path, "target": target}, idempotent=False))

    async def readlink(self, path: str) -> str:
        st = await self.stat(path, follow_symlinks=False)
        if st.type != "symlink":
            raise FsError(Code.EINVAL, f"{path} is not a symlink")
        return st.target or ""

    async def link(self, src: str, dst: str) -> FileStat:
        split_path(src, "src")
        split_path(dst, "dst")
        return FileStat.from_inode(await self._meta("hardlink", {"src": src, "dst": dst}, idempotent=False))

    async def rename(self, src: str, dst: str) -> None:
        split_path(src, "src")
        split_path(dst, "dst")
        await self._meta("rename", {"src": src, "dst": dst}, idempotent=False)

    async def remove_tree(self, path: str, *, wait: bool = True) -> dict:
        """Remove ``path`` and everything under it on the meta server: the tree leaves the
        namespace in one transaction, then the server empties it in batched transactions (before
        replying with ``wait``, else in the background). Returns ``{"inode", "type", "queued"}``
        plus ``"files"`` / ``"dirs"`` removed when known (``wait``, or a file)."""
        split_path(path)
        if not isinstance(wait, bool):
            raise ValueError(f"wait: expected a bool, got {wait!r}")
        return await self._meta("remove_tree", {"path": path, "wait": wait}, idempotent=False)

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, symlink or empty directory (``recursive=True``: a whole tree, one
        request per entry; :meth:`remove_tree` does it on the server).
        The chunks of a removed file are deleted in the background (or at last close)."""
        split_path(path)
        if recursive:
            st = await self.stat(path, follow_symlinks=False)
            if st.is_dir:
                for name in await self.listdir(path):
                    await self.remove(path.rstrip("/") + "/" + name, recursive=True)
        await self._meta("remove", {"path": path}, idempotent=False)

    async def chmod(self, path: str, mode: int) -> FileStat:
        _check_int(mode, "mode")
        return FileStat.from_inode(await self._meta("setattr", {"path": path, "mode": mode}))

    async def chown(self, path: str, uid: int | None = None, gid: int | None = None) -> FileStat:
        return FileStat.from_inode(await self._meta("setattr", {"path": path, "uid": uid, "gid": gid}))

    async def utime(self, path: str, atime: float | None = None, mtime: float | None = None) -> FileStat:
        return FileStat.from_inode(await self._meta("setattr", {"path": path, "atime": atime, "mtime": mtime}))

    async def truncate(self, path: str, length: int) -> None:
        _check_int(length, "length")
        f = await self.open(path, "r+b")
        try:
            await f.truncate(length)
        finally:
            await f.close()

    # --- files ---------------------------------------------------------------------------------

    async def open(self, path: str, mode: str = "rb", *, perm: int = 0o644, chunk_size: int | None = None,
                   stripe: int | None = None) -> "AsyncFile":
        """Open a file. ``mode``: rb, wb, ab, xb, r+b, w+b (text modes are the same bytes API)."""
        split_path(path)
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {sorted(_MODES)}, got {mode!r}")
        read, write, create, exclusive, trunc, append = _MODES[mode]
        session = uuid.uuid4().bytes if write else None
        node = await self._meta("open", {"path": path, "read": read or not write, "write": write, "create": create,
                                         "exclusive": exclusive, "mode": perm, "session": session,
                                         "client": self.client_id if write else "", "chunk_size": chunk_size,
                                         "stripe": stripe}, idempotent=not create)
        f = AsyncFile(self, path, node, session, readable=read or not write, writable=write)
        if write:
            self._open_writes[session] = f
        if trunc and node.get("length", 0):
            await f.truncate(0)
        if append:
            f.position = f.length
        return f

    async def read_bytes(self, path: str) -> bytes:
        f = await self.open(path, "rb")
        try:
            return await f.pread(f.length, 0)
        finally:
            await f.close()

    async def write_bytes(self, path: str, data: bytes) -> int:
        f = await self.open(path, "wb")
        try:
            return await f.pwrite(data, 0)
        finally:
            await f.close()


class AsyncFile:
    """An open file: ``pread``/``pwrite`` at offsets, or ``read``/``write`` at ``position``."""

    def __init__(self, fs: AsyncClient, path: str, node: dict, session: bytes | None, readable: bool, writable: bool):
        self.fs, self.path, self.node, self.session = fs, path, node, session
        self.inode: int = node["id"]
        self.layout: dict = node["layout"]
        self.chunk_size: int = self.layout["chunk_size"]
        self.readable, self.writable = readable, writable
        self.length: int = node.get("length", 0)
        self.written_end = 0
        self.position = 0
        self.closed = False
        # Sequential read-ahead: blocks of ``_ra_blk`` bytes (a chunk, or a power-of-two part of a
        # chunk larger than _RA_BLOCK_MAX) fetched in the background while a handle reads on from
        # where its last read ended; block index -> (task, bytes asked). At most the blocks of the
        # current read plus ``_ra_ahead`` are held.
        blk = self.chunk_size
        while blk > _RA_BLOCK_MAX and blk % 2 == 0:
            blk //= 2
        self._ra_blk = blk
        self._ra_ahead = max(1, _RA_BYTES // blk) if _RA_BYTES > 0 else 0
        self._ra: dict[int, tuple[asyncio.Task, int]] = {}
        self._ra_pos = 0  # where the last read ended (0 at open: reading from the start is sequential)

    def _check_open(self, need_write: bool = False) -> None:
        if self.closed:
            raise FsError(Code.EBADF, f"{self.path}: file is closed")
        if need_write and not self.writable:
            raise FsError(Code.EBADF, f"{self.path}: not open for writing")

    def _pieces(self, offset: int, size: int):
        end = offset + size
        while offset < end:
            index, within = divmod(offset, self.chunk_size)
            n = min(self.chunk_size - within, end - offset)
            yield index, within, offset, n
            offset += n

    async def _gather(self, coros) -> list:
        sem = asyncio.Semaphore(self.fs.parallel_chunks)

        async def one(c):
            async with sem:
                return await c

        return await asyncio.gather(*(one(c) for c in coros))

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; returns the byte count once every replica committed it."""
        self._check_open(need_write=True)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expected bytes-like, got {type(data).__name__}")
        _check_int(offset, "offset")
        view = memoryview(data).cast("B")
        pieces = list(self._pieces(offset, len(view)))
        if len(pieces) > 1:  # several chunks: one write_batch per chain
            self._raise_first(await self.write_chunks(
                {idx: [(within, bytes(view[pos - offset:pos - offset + n]))] for idx, within, pos, n in pieces}))
            return len(view)
        st = self.fs.storage
        self._invalidate()
        await self._gather(st.write_chunk(self.layout, self.inode, idx, within, bytes(view[pos - offset:pos - offset + n]))
                           for idx, within, pos, n in pieces)
        self._invalidate()  # a sequential read during the write may have fetched old bytes
        end = offset + len(view)
        self.written_end = max(self.written_end, end)
        self.length = max(self.length, end)
        return len(view)

    async def pwritev(self, pieces: list) -> int:
        """Write every ``(offset, data)`` of ``pieces`` (file offsets, in order: a later piece wins
        where they overlap); the pieces that fall in one chunk go down its chain as one update
        (one copy-on-write per replica instead of one per piece). Returns the bytes written."""
        self._check_open(need_write=True)
        if not isinstance(pieces, (list, tuple)):
            raise TypeError(f"pieces: expected a list of (offset, data), got {type(pieces).__name__}")
        per_chunk: dict[int, list[tuple[int, bytes]]] = {}
        total = end = 0
        for item in pieces:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TypeError(f"pieces: expected (offset, data) items, got {item!r:.60}")
            offset, data = item
            _check_int(offset, "offset")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data: expected bytes-like, got {type(data).__name__}")
            view = memoryview(data).cast("B")
            for idx, within, pos, n in self._pieces(offset, len(view)):
                per_chunk.setdefault(idx, []).append((within, bytes(view[pos - offset:pos - offset + n])))
            total += len(view)
            end = max(end, offset + len(view))
        if per_chunk:
            self._raise_first(await self.write_chunks(per_chunk))
        return total

    @staticmethod
    def _raise_first(outcome: dict[int, Exception | None]) -> None:
        for idx in sorted(outcome):
            if outcome[idx] is not None:
                raise outcome[idx]

    async def write_chunks(self, updates: dict[int, list[tuple[int, bytes]]]) -> dict[int, Exception | None]:
        """Write ``updates`` (chunk index -> ``[(offset within the chunk, bytes), ...]``, applied in
        order): the chunks of one chain go down it as one ``write_batch`` (one request and one
        commit per replica for all of them). Returns per chunk None (every replica committed it)
        or the exception it failed with; the others are not affected by it."""
        self._check_open(need_write=True)
        cs = self.chunk_size
        for idx, ranges in updates.items():
            _check_int(idx, "chunk index")
            for off, d in ranges:
                if off < 0 or off + len(d) > cs:
                    raise ValueError(f"chunk {idx}: range [{off}, {off + len(d)}) is not inside a chunk of {cs} bytes")
        self._invalidate()
        res = await self.fs.storage.write_chunks(self.layout, self.inode, updates)
        self._invalidate()  # a sequential read during the write may have fetched old bytes
        out: dict[int, Exception | None] = {}
        end = 0
        for idx, ranges in updates.items():
            r = res.get(idx)
            if isinstance(r, dict):
                out[idx] = None
                end = max(end, idx * cs + max(off + len(d) for off, d in ranges))
            else:
                out[idx] = r if isinstance(r, Exception) else FsError(Code.INTERNAL, f"chunk {idx}: no result")
        if end:
            self.written_end = max(self.written_end, end)
            self.length = max(self.length, end)
        return out

    async def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short at end of file; b"" past it). Holes read as zeros."""
        self._check_open()
        _check_int(size, "size")
        _check_int(offset, "offset")
        if offset + size > self.length and not self.writable:
            st = await self.fs._meta("stat_inode", {"inode": self.inode})  # another writer may have grown it
            self.length = max(self.length, st.get("length", 0))
        size = max(0, min(size, self.length - offset))
        if size == 0:
            return b""
        buf = bytearray(size)
        if not await self._ra_read(memoryview(buf), offset):
            await self._pread_into(memoryview(buf), offset)
        return bytes(buf)  # the one copy left: the chunks went from the socket into ``buf``

    async def pread_into(self, buffer, offset: int) -> int:
        """Read into ``buffer`` (any writable contiguous buffer) from ``offset``; returns the byte
        count (short at end of file, the rest of ``buffer`` untouched). Holes read as zeros. The
        chunks are received straight into ``buffer``; after an error its contents are unspecified."""
        self._check_open()
        _check_int(offset, "offset")
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError("buffer: expected a writable buffer")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = view.nbytes
        if offset + size > self.length and not self.writable:
            st = await self.fs._meta("stat_inode", {"inode": self.inode})  # another writer may have grown it
            self.length = max(self.length, st.get("length", 0))
        size = max(0, min(size, self.length - offset))
        if size and not await self._ra_read(view[:size], offset):
            await self._pread_into(view[:size], offset)
        return size

    # --- sequential read-ahead -----------------------------------------------------------------

    def drop_readahead(self) -> None:
        """Forget (and cancel) the blocks fetched ahead: after a write or truncate of the file, on
        close, or when the handle stops reading sequentially. The FUSE mount calls it for every
        handle of an inode it writes through another handle."""
        ra, self._ra = self._ra, {}
        for t, _ in ra.values():
            t.cancel()
        peers = self.fs._reading_ahead.get(self.inode)
        if peers is not None:
            peers.discard(self)
            if not peers:
                del self.fs._reading_ahead[self.inode]

    def _invalidate(self) -> None:
        """A write or truncate through this file: every file of the inode open in this client
        drops what it fetched ahead."""
        self.drop_readahead()
        for f in list(self.fs._reading_ahead.get(self.inode, ())):
            f.drop_readahead()

    def _ra_start(self, b: int) -> None:
        start = b * self._ra_blk
        n = min(self._ra_blk, self.length - start)
        if n <= 0 or b in self._ra:
            return
        index, within = divmod(start, self.chunk_size)
        t = asyncio.ensure_future(self.fs.storage.read_chunk(self.layout, self.inode, index, within, n))
        t.add_done_callback(_ra_reap)
        if not self._ra:
            self.fs._reading_ahead.setdefault(self.inode, set()).add(self)
        self._ra[b] = (t, n)

    def _ra_continues(self, offset: int) -> bool:
        """Whether a read at ``offset`` continues this handle's sequential reading: it starts where
        the last read ended or, while blocks are fetched ahead, within _RA_SLACK of it (FUSE may
        deliver the kernel's concurrent read requests out of order) or inside a fetched block."""
        if offset == self._ra_pos:
            return True
        return bool(self._ra) and (abs(offset - self._ra_pos) <= _RA_SLACK or offset // self._ra_blk in self._ra)

    async def _ra_read(self, view: memoryview, offset: int) -> bool:
        """Serve a read from (and keep filling) the read-ahead window when it continues the last
        read; False for a read that does not (it then goes the direct way, and nothing is fetched
        ahead: random access drops the window)."""
        if self._ra_ahead == 0 or self.closed:
            return False
        size, blk = view.nbytes, self._ra_blk
        first, last = offset // blk, (offset + size - 1) // blk
        if not self._ra_continues(offset):
            self._ra_pos = offset + size
            if self._ra:
                self.drop_readahead()
            return False
        self._ra_pos = max(self._ra_pos, offset + size)
        for b in [k for k in self._ra if k < first]:  # behind the reader: no longer needed
            del self._ra[b]
        if (last - first + 1) * blk > _RA_BYTES + blk:  # a large read: direct (parallel), then fetch ahead
            held = [self._ra.pop(b) for b in range(first, last + 1) if b in self._ra]
            for t, _ in held:
                t.cancel()
            await self._pread_into(view, offset)
            for b in range(last + 1, last + 1 + self._ra_ahead):
                self._ra_start(b)
            return True
        for b in range(first, last + 1 + self._ra_ahead):
            self._ra_start(b)
        jobs = [(b, self._ra.get(b)) for b in range(first, last + 1)]
        if (offset + size) % blk == 0:  # the read ends a block: it is consumed
            self._ra.pop(last, None)

        async def one(b: int, held) -> None:
            lo, hi = max(offset, b * blk), min(offset + size, (b + 1) * blk)
            part = view[lo - offset:hi - offset]
            if held is not None:
                t, n = held
                await asyncio.wait((t,))
                if not t.cancelled() and t.exception() is None and hi - b * blk <= n:
                    data = t.result()
                    within = lo - b * blk
                    got = max(0, min(len(data) - within, hi - lo))
                    part[:got] = data[within:within + got]
                    if got < hi - lo:  # a hole or a chunk shorter than the file: zeros
                        part[got:] = bytes(hi - lo - got)
                    return
            await self._pread_into(part, lo)  # not fetched, failed, cancelled or too short: directly

        if len(jobs) == 1:
            await one(*jobs[0])
        else:
            await asyncio.gather(*(one(b, h) for b, h in jobs))
        return True

    async def _pread_into(self, view: memoryview, offset: int) -> None:
        st = self.fs.storage
        pieces = list(self._pieces(offset, view.nbytes))
        got = await self._gather(st.read_chunk(self.layout, self.inode, idx, within, n,
                                               into=view[pos - offset:pos - offset + n])
                                 for idx, within, pos, n in pieces)
        for (_, _, pos, n), k in zip(pieces, got):
            if k < n:  # a hole or a chunk shorter than the file: zeros (a failed try may have left bytes)
                view[pos - offset + k:pos - offset + n] = bytes(n - k)

    async def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.length - self.position)
        data = await self.pread(size, self.position)
        self.position += len(data)
        return data

    async def write(self, data: bytes) -> int:
        n = await self.pwrite(data, self.position)
        self.position += n
        return n

    async def truncate(self, length: int) -> None:
        self._check_open(need_write=True)
        _check_int(length, "length")
        self._invalidate()
        await self.fs.storage.truncate_chunks(self.layout, self.inode, length)
        self.node = await self.fs._meta("set_length", {"inode": self.inode, "length": length})
        self.length = length
        self.written_end = min(self.written_end, length)
        self._invalidate()

    async def fsync(self) -> None:
        """Writes are durable when acknowledged; fsync makes the recorded length exact."""
        self._check_open()
        if self.writable:
            self.node = await self.fs._meta("sync", {"inode": self.inode, "session": self.session,
                                                     "length_hint": self.written_end})
            self.length = self.node.get("length", self.length)

    async def stat(self) -> FileStat:
        return FileStat.from_inode(await self.fs._meta("stat_inode", {"inode": self.inode}))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.drop_readahead()
        if self.writable:
            self.fs._open_writes.pop(self.session, None)
            await self.fs._meta("close", {"inode": self.inode, "session": self.session, "length_hint": self.written_end})

    async def __aenter__(self) -> "AsyncFile":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# Sync clients whose loop thread still runs. At interpreter exit their connections are closed and
# their loops stopped first (atexit runs before finalization): a daemon loop thread left running
# would wake up during finalization (a read-ahead fetch finishing, a server closing its
# connection) and run Python code on a half-torn-down interpreter, and a connection left open on a
# closed loop leaves a libuv handle for finalization to free; either can crash the process on its
# way out.
_LIVE_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register
def abandon_live_clients() -> None:
    """Close every sync client still open in this process without a word to the servers (see
    :meth:`Client._abandon`): the exit hook; also for a program's own exit hook that must run
    before its servers stop."""
    for client in list(_LIVE_CLIENTS):
        client._abandon()


class Client:
    """Synchronous client: the same API as :class:`AsyncClient`, run on a private event loop."""

    def __init__(self, mgmtd: str | list[str], **kwargs):
        try:  # uvloop's sockets are faster; asyncio's loop otherwise
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openinfra-fs-client", daemon=True)
        self._thread.start()
        _LIVE_CLIENTS.add(self)
        self.aio = AsyncClient(mgmtd, **kwargs)
        try:
            self._run(self.aio.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        _LIVE_CLIENTS.discard(self)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            # Finish the loop here, on the caller's thread: cancel what is left (the report task of
            # a client that was never closed, say) and close it, so that no task or uvloop handle
            # is left for interpreter finalization to tear down (a demo run once died with SIGSEGV
            # at exit after "Task was destroyed but it is pending" for the report task).
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=2))
            self._loop.close()

    def _abandon(self, timeout_s: float = 2.0) -> None:
        """Close without talking to anyone (the interpreter is exiting, servers may be gone):
        cancel the report task and close the connections on the loop, give the loop a few turns
        to finish closing their handles, then stop it. Open write sessions are left to meta's
        session timeout, as for a client that was killed."""

        async def drop_connections():
            if self.aio._reporter:
                self.aio._reporter.cancel()
            await self.aio.rpc.close()
            for _ in range(3):  # uv_close callbacks run on the loop's next turns
                await asyncio.sleep(0)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(drop_connections(), self._loop).result(timeout_s)
            except Exception:  # noqa: BLE001 - exiting anyway: the loop is stopped below either way
                pass
        self._stop_loop()

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self.aio.close())
            finally:
                self._stop_loop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def client_id(self) -> str:
        return self.aio.client_id

    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        return self._run(self.aio.stat(path, follow_symlinks))

    def stat_inode(self, inode: int) -> FileStat:
        return self._run(self.aio.stat_inode(inode))

    def exists(self, path: str) -> bool:
        return self._run(self.aio.exists(path))

    def listdir(self, path: str = "/", detail: bool = False) -> list:
        return self._run(self.aio.listdir(path, detail))

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False, exist_ok: bool = False, **layout) -> FileStat:
        return self._run(self.aio.mkdir(path, mode, parents, exist_ok, **layout))

    def symlink(self, path: str, target: str) -> FileStat:
        return self._run(self.aio.symlink(path, target))

    def readlink(self, path: str) -> str:
        return self._run(self.aio.readlink(path))

    def link(self, src: str, dst: str) -> FileStat:
        return self._run(self.aio.link(src, dst))

    def rename(self, src: str, dst: str) -> None:
        return self._run(self.aio.rename(src, dst))

    def remove(self, path: str, recursive: bool = False) -> None:
        return self._run(self.aio.remove(path, recursive))

    def remove_tree(self, path: str, *, wait: bool = True) -> dict:
        return self._run(self.aio.remove_tree(path, wait=wait))

    def chmod(self, path: str, mode: int) -> FileStat:
        return self._run(self.aio.chmod(path, mode))

    def chown(self, path: str, uid: int | None = None, gid: int | None = None) -> FileStat:
        return self._run(self.aio.chown(path, uid, gid))

    def utime(self, path: str, atime: float | None = None, mtime: float | None = None) -> FileStat:
        return self._run(self.aio.utime(path, atime, mtime))

    def truncate(self, path: str, length: int) -> None:
        return self._run(self.aio.truncate(path, length))

    def open(self, path: str, mode: str = "rb", **kwargs) -> "File":
        return File(self, self._run(self.aio.open(path, mode, **kwargs)))

    def read_bytes(self, path: str) -> bytes:
        return self._run(self.aio.read_bytes(path))

    def write_bytes(self, path: str, data: bytes) -> int:
        return self._run(self.aio.write_bytes(path, data))


class File:
    """Synchronous file object (``read``/``write``/``seek``/``tell``/``pread``/``pwrite``)."""

    def __init__(self, client: Client, f: AsyncFile):
        self._c, self._f = client, f

    @property
    def inode(self) -> int:
        return self._f.inode

    @property
    def length(self) -> int:
        return self._f.length

    @property
    def closed(self) -> bool:
        return self._f.closed

    def pread(self, size: int, offset: int) -> bytes:
        return self._c._run(self._f.pread(size, offset))

    def pwrite(self, data: bytes, offset: int) -> int:
        return self._c._run(self._f.pwrite(data, offset))

    def pwritev(self, pieces: list) -> int:
        return self._c._run(self._f.pwritev(pieces))

    def write_chunks(self, updates: dict) -> dict:
        """:meth:`AsyncFile.write_chunks`: per chunk index None (written) or its exception."""
        return self._c._run(self._f.write_chunks(updates))

    def read(self, size: int = -1) -> bytes:
        return self._c._run(self._f.read(size))

    def write(self, data: bytes) -> int:
        return self._c._run(self._f.write(data))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._f.position, os.SEEK_END: self._f.length}.get(whence)
        if base is None:
            raise ValueError(f"whence: expected 0, 1 or 2, got {whence!r}")
        if base + offset < 0:
            raise ValueError(f"offset: seek to a negative position ({base + offset})")
        self._f.position = base + offset
        return self._f.position

    def tell(self) -> int:
        return self._f.position

    def truncate(self, length: int) -> None:
        return self._c._run(self._f.truncate(length))

    def fsync(self) -> None:
        return self._c._run(self._f.fsync())

    def stat(self) -> FileStat:
        return self._c._run(self._f.stat())

    def close(self) -> None:
        return self._c._run(self._f.close())

    def __enter__(self) -> "File":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
