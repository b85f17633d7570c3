"""The chunk engine of one storage target: copy-on-write chunk files, CRC32C per chunk, and one
atomic metadata commit after the data is durable.

On disk (``<target>/``): ``chunks/<xx>/<inode>.<index>.<version>`` data files and ``meta.db``
(SQLite, WAL) with one row per committed chunk (version, file, length, CRC32C). An update never
touches the committed file: it writes the new content to a new file and syncs it; that file is
the chunk's pending version, known only in memory (a pending version was never acknowledged, so
a crash may forget it). Commit points the row at the new file in one SQLite transaction and only
then unlinks the old file. A crash at any point leaves either the old or the new version, never a
torn chunk; :meth:`ChunkStore.recover` deletes the files no row points to.

The table ``dedup`` keeps, per (client, channel), the last applied sequence number and its result,
committed in the same transaction as the chunk, so a retried write is applied once.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sqlite3
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c

__all__ = ["ChunkStore", "ChunkMeta", "checksum", "INLINE_READ_MAX", "OPEN_FILES_MAX"]

# Committed rows kept in memory per target (entries; ~200 bytes each).
ROW_CACHE_MAX = 1 << 18
# Reads up to this many bytes run on the event loop instead of a worker thread (bytes).
INLINE_READ_MAX = 256 * 1024
# Committed chunk files kept open per target for reads on the event loop (descriptors): saves an
# open and a close (~5-10 us) per small read; a KV working set is thousands of chunks. At most
# a quarter of the process's descriptor limit (RLIMIT_NOFILE) per target.
OPEN_FILES_MAX = 4096


def checksum(data: bytes | memoryview) -> int:
    """CRC32C of ``data`` (hardware accelerated where the package has it)."""
    return crc32c.crc32c(data)


@dataclass
class ChunkMeta:
    inode: int
    index: int
    version: int          # committed version (0: no committed content yet)
    length: int           # bytes of committed content
    crc: int
    file: str | None
    pending_version: int | None = None
    pending_file: str | None = None
    pending_length: int = 0
    pending_crc: int = 0

    def as_dict(self) -> dict:
        return {"inode": self.inode, "index": self.index, "version": self.version, "length": self.length,
                "crc": self.crc, "pending_version": self.pending_version}


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS chunks (inode INTEGER, idx INTEGER, ver INTEGER, len INTEGER, crc INTEGER,
       file TEXT, PRIMARY KEY (inode, idx)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS dedup (client TEXT, channel INTEGER, seq INTEGER, result BLOB,
       PRIMARY KEY (client, channel)) WITHOUT ROWID""",
]


class ChunkStore:
    """Chunks of one target. Data I/O runs in worker threads; metadata in the caller's thread."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self._root = str(self.path)
        self._root_slash = self._root.rstrip("/") + "/"  # chunk file paths are this + a relative path
        self.fsync = fsync
        (self.path / "chunks").mkdir(parents=True, exist_ok=True)
        # Two connections: reads on the caller's thread, writes on one helper thread, where
        # commits that arrive together share one transaction and one fsync (group commit).
        self.db = self._connect()
        for stmt in _SCHEMA:
            self.db.execute(stmt)
        self._wdb = self._connect()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="chunk-db")
        self._queue: list[tuple[list[tuple[str, tuple]], asyncio.Future]] = []
        self._flushing = False
        # Pending versions: (inode, index) -> (version, file, length, crc). In memory on purpose.
        self._pending: dict[tuple[int, int], tuple[int, str, int, int]] = {}
        # Committed rows as last read or written: (inode, index) -> row tuple, or None for "no
        # row". This process is the only writer of meta.db and updates an entry only once its
        # transaction committed (before the old file is unlinked), so a hit equals the row a
        # SELECT would return; it saves a SQLite query (~50-150 us here) on every read.
        self._rows: dict[tuple[int, int], tuple | None] = {}
        # Open committed chunk files (descriptors), by relative path, least recently used
        # first. Used on the event-loop thread only, with no await while a descriptor is in
        # use (a worker thread could race an eviction's close). A path leaves the cache
        # whenever its file is unlinked or (re)written, before anything else can create a file
        # under that name (a chunk removed and written again reuses ``<ino>.<idx>.1``), so an
        # entry always holds the file the path names now.
        self._files: OrderedDict[str, int] = OrderedDict()
        self._files_max = max(16, min(OPEN_FILES_MAX, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        self.recover()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path / "meta.db", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def close(self) -> None:
        self._close_files()
        self._executor.shutdown(wait=True)
        self._wdb.close()
        self.db.close()

    async def _write(self, stmts: list[tuple[str, tuple]], rows: list[tuple[tuple[int, int], tuple | None]]) -> None:
        """Apply ``stmts`` atomically; returns once they are committed (durable with fsync=True).
        ``rows``: the chunk rows they set (``(key, row or None)``), put in the row cache by the
        flusher once the transaction committed, even if this caller was cancelled meanwhile."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((stmts, fut, rows))
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await loop.run_in_executor(self._executor, self._apply, [stmts for stmts, _, _ in batch])
                except BaseException as exc:
                    for _, fut, rows in batch:
                        for key, _ in rows:  # rolled back, or unknown if cancelled: ask SQLite next time
                            self._rows.pop(key, None)
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, fut, rows in batch:
                        for key, row in rows:
                            self._cache_row(key, row)
                        if not fut.done():
                            fut.set_result(None)
        finally:
            self._flushing = False

    def _apply(self, batch: list[list[tuple[str, tuple]]]) -> None:
        db = self._wdb
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmts in batch:
                for sql, params in stmts:
                    db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- files ---------------------------------------------------------------------------------

    def _file(self, inode: int, index: int, version: int) -> str:
        return f"chunks/{inode % 256:02x}/{inode:x}.{index}.{version}"

    def _write_file(self, rel: str, data: bytes) -> None:
        p = self.path / rel
        p.parent.mkdir(exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _read_file(self, rel: str | None, offset: int = 0, length: int = -1) -> bytes:
        """Bytes ``[offset, offset+length)`` of a chunk file (to its end when ``length < 0``).
        ``length`` should not run past the end: callers pass the committed length, so one
        ``pread`` into an exactly sized buffer is the whole read (no buffered-file layer)."""
        if rel is None:
            return b""
        fd = os.open(self._root_slash + rel, os.O_RDONLY)  # not os.path.join: ~10 us a read
        try:
            if length < 0:
                length = os.fstat(fd).st_size - offset
            return self._pread(fd, offset, length)
        finally:
            os.close(fd)

    @staticmethod
    def _pread(fd: int, offset: int, length: int) -> bytes:
        """``length`` bytes of ``fd`` from ``offset`` (fewer only at the end of the file)."""
        data = os.pread(fd, length, offset)
        if len(data) < length:  # short reads happen (signals, huge sizes): finish the read
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def _open(self, rel: str) -> int:
        """A cached read-only descriptor of committed chunk file ``rel`` (event-loop thread
        only; valid until the next call into this store)."""
        fd = self._files.get(rel)
        if fd is not None:
            self._files.move_to_end(rel)
            return fd
        fd = self._files[rel] = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
        if len(self._files) > self._files_max:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _forget_file(self, rel: str) -> None:
        fd = self._files.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def _close_files(self) -> None:
        files, self._files = self._files, OrderedDict()
        for fd in files.values():
            os.close(fd)

    def _unlink(self, rel: str | None) -> None:
        if rel:
            self._forget_file(rel)
            try:
                os.unlink(self.path / rel)
            except FileNotFoundError:
                pass

    # --- metadata ------------------------------------------------------------------------------

    def get(self, inode: int, index: int) -> ChunkMeta | None:
        key = (inode, index)
        try:
            row = self._rows[key]
        except KeyError:
            row = self.db.execute("SELECT inode, idx, ver, len, crc, file FROM chunks WHERE inode = ? AND idx = ?",
                                  (inode, index)).fetchone()
            self._cache_row(key, row)
        pending = self._pending.get((inode, index))
        if row is None and pending is None:
            return None
        meta = ChunkMeta(*row) if row is not None else ChunkMeta(inode, index, 0, 0, 0, None)
        if pending is not None:
            meta.pending_version, meta.pending_file, meta.pending_length, meta.pending_crc = pending
        return meta

    def _cache_row(self, key: tuple[int, int], row: tuple | None) -> None:
        if len(self._rows) >= ROW_CACHE_MAX:
            self._rows.clear()  # bounded memory; entries come back on the next reads
        self._rows[key] = row

    def list(self, inode: int | None = None, from_index: int = 0) -> list[ChunkMeta]:
        """Committed chunks (of ``inode`` from ``from_index``, or all), in (inode, index) order."""
        sql = "SELECT inode, idx, ver, len, crc, file FROM chunks WHERE ver > 0"
        params: tuple = ()
        if inode is not None:
            sql += " AND inode = ? AND idx >= ?"
            params = (inode, from_index)
        return [ChunkMeta(*r) for r in self.db.execute(sql + " ORDER BY inode, idx", params).fetchall()]

    def last_chunk(self, inode: int) -> tuple[int, int] | None:
        """``(index, length)`` of the highest committed chunk of ``inode``, or None."""
        row = self.db.execute("SELECT idx, len FROM chunks WHERE inode = ? AND ver > 0 ORDER BY idx DESC LIMIT 1",
                              (inode,)).fetchone()
        return None if row is None else (row[0], row[1])

    def dedup_get(self, client: str, channel: int) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT seq, result FROM dedup WHERE client = ? AND channel = ?",
                              (client, channel)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    # --- updates -------------------------------------------------------------------------------

    async def read(self, inode: int, index: int, offset: int, length: int,
                   meta: ChunkMeta | None | bool = False) -> tuple[bytes, ChunkMeta | None]:
        """Committed bytes ``[offset, offset+length)`` (shorter at the chunk's end) and the meta.
        A read of the whole chunk is checked against its CRC32C, and so is a read that runs to
        the end of a chunk of at most ``INLINE_READ_MAX`` bytes (the chunk is read whole for it;
        the bytes come back as a memoryview then). ``meta``: this chunk's
        :meth:`get` result when the caller just looked it up (saves a second SQLite query;
        it must be current, i.e. fetched with no ``await`` in between), else it is looked up."""
        if meta is False:
            meta = self.get(inode, index)
        if meta is None or meta.version == 0 or offset >= meta.length:
            return b"", meta
        data = self.read_now(meta, offset, length)
        if data is not None:
            return data, meta
        whole = offset == 0 and length >= meta.length
        length = min(length, meta.length - offset)
        skip = 0
        if not whole and offset + length == meta.length and meta.length <= INLINE_READ_MAX:
            # A read to the end of a small chunk (a KV block's payload after its header, say):
            # read the chunk whole, so its CRC32C is checked too, and return the tail as a view.
            whole, skip, offset, length = True, offset, 0, meta.length
        if length <= INLINE_READ_MAX:
            # A small read of a (usually page-cached) file costs less than the thread hop
            # (~50-100 us on a busy 2-core box): do it on the event loop.
            data = self._read_file(meta.file, offset, length)
        else:
            data = await asyncio.to_thread(self._read_file, meta.file, offset, length)
        if whole and checksum(data) != meta.crc:
            from openinfra.fs.errors import Code, FsError

            raise FsError(Code.CHECKSUM_MISMATCH, f"chunk {inode}:{index} v{meta.version} fails its CRC32C")
        return (memoryview(data)[skip:] if skip else data), meta

    def read_now(self, meta: ChunkMeta, offset: int, length: int) -> bytes | memoryview | None:
        """:meth:`read` of committed chunk ``meta`` (current, version > 0, ``offset`` inside it)
        done right here on the event loop, or None when the read is too big for that
        (over ``INLINE_READ_MAX``: the caller goes through :meth:`read`'s worker thread).
        A small read of a (usually page-cached) file costs less than the thread hop (~50-100 us
        on a busy 2-core box). CRC32C checks as :meth:`read` says; a mismatch raises."""
        whole = offset == 0 and length >= meta.length
        length = min(length, meta.length - offset)
        skip = 0
        if not whole and offset + length == meta.length and meta.length <= INLINE_READ_MAX:
            # A read to the end of a small chunk (a KV block's payload after its header, say):
            # read the chunk whole, so its CRC32C is checked too, and return the tail as a view.
            whole, skip, offset, length = True, offset, 0, meta.length
        if length > INLINE_READ_MAX:
            return None
        data = self._pread(self._open(meta.file), offset, length)
        if whole and checksum(data) != meta.crc:
            from openinfra.fs.errors import Code, FsError

            raise FsError(Code.CHECKSUM_MISMATCH, f"chunk {meta.inode}:{meta.index} v{meta.version} fails its CRC32C")
        return memoryview(data)[skip:] if skip else data

    async def committed_content(self, inode: int, index: int) -> tuple[bytes, ChunkMeta | None]:
        meta = self.get(inode, index)
        if meta is None or meta.version == 0:
            return b"", meta
        return await asyncio.to_thread(self._read_file, meta.file), meta

    async def prepare(self, inode: int, index: int, version: int, op: str, offset: int = 0, data: bytes = b"",
                      length: int = 0, full: bytes | None = None,
                      ranges: list[tuple[int, bytes]] | None = None) -> tuple[bytes, int]:
        """Write version ``version`` as pending (copy-on-write); returns ``(content, crc)``.

        ``op``: ``"write"`` (``data`` at ``offset``), ``"writev"`` (each ``(offset, data)`` of
        ``ranges`` in order; a gap past the old end reads as zeros), ``"truncate"`` (to ``length``
        bytes) or a full replacement when ``full`` is given."""
        meta = self.get(inode, index)
        if full is not None:
            content = bytes(full)
        elif op == "writev":
            old = b"" if meta is None or meta.version == 0 else (await self.committed_content(inode, index))[0]
            buf = bytearray(old)
            for off, piece in ranges or ():
                if off > len(buf):
                    buf += bytes(off - len(buf))
                buf[off:off + len(piece)] = piece
            content = bytes(buf)
        else:
            if op == "write" and offset == 0 and meta is not None and len(data) >= meta.length:
                old = b""  # the update covers the whole old content: nothing to copy
            elif op == "write" and (meta is None or meta.version == 0):
                old = b""
            else:
                old, _ = await self.committed_content(inode, index)
            if op == "write" and offset == 0 and len(data) >= len(old):
                content = bytes(data)  # a full overwrite: no copy of the old bytes
            elif op == "write":
                if offset > len(old):
                    old = old + bytes(offset - len(old))
                content = old[:offset] + bytes(data) + old[offset + len(data):]
            elif op == "truncate":
                content = old[:length] + bytes(max(0, length - len(old)))
            else:
                raise ValueError(f"op: expected 'write' or 'truncate', got {op!r}")
        crc = checksum(content)
        rel = self._file(inode, index, version)
        if meta is not None and meta.file == rel:
            rel += ".r"  # re-applying the committed version number: never overwrite committed data
        # (on this thread, not the writer's: the descriptor cache is the event loop's. Never
        # cached in practice: a committed file is never rewritten, see ".r" above.)
        self._forget_file(rel)
        await asyncio.to_thread(self._write_file, rel, content)
        old_pending = meta.pending_file if meta is not None else None
        self._pending[(inode, index)] = (version, rel, len(content), crc)
        if old_pending and old_pending != rel and old_pending != (meta.file if meta else None):
            self._unlink(old_pending)  # an earlier attempt that never committed
        return content, crc

    async def commit(self, inode: int, index: int, version: int,
                     dedup: tuple[str, int, int, bytes] | None = None) -> None:
        """Make pending ``version`` the committed one (one SQLite transaction, shared with the commits
        that arrive together), then drop the old file."""
        meta = self.get(inode, index)
        if meta is None or meta.pending_version != version:
            raise RuntimeError(f"chunk {inode}:{index}: no pending version {version} to commit")
        stmts = [("INSERT OR REPLACE INTO chunks (inode, idx, ver, len, crc, file) VALUES (?, ?, ?, ?, ?, ?)",
                  (inode, index, version, meta.pending_length, meta.pending_crc, meta.pending_file))]
        if dedup is not None:
            stmts.append(("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)", dedup))
        await self._write(stmts, [((inode, index), (inode, index, version, meta.pending_length, meta.pending_crc,
                                                    meta.pending_file))])
        if self._pending.get((inode, index), (None,))[0] == version:
            del self._pending[(inode, index)]
        if meta.file and meta.file != meta.pending_file:
            self._unlink(meta.file)

    def abort(self, inode: int, index: int) -> None:
        """Drop a pending version (its write failed downstream and will be retried or abandoned)."""
        pending = self._pending.pop((inode, index), None)
        if pending is None:
            return
        row = self.db.execute("SELECT file FROM chunks WHERE inode = ? AND idx = ?", (inode, index)).fetchone()
        if row is None or row[0] != pending[1]:
            self._unlink(pending[1])

    async def remove(self, inode: int, index: int, dedup: tuple[str, int, int, bytes] | None = None) -> bool:
        """Delete a chunk (committed and pending); returns whether it existed."""
        meta = self.get(inode, index)
        stmts = [("DELETE FROM chunks WHERE inode = ? AND idx = ?", (inode, index))]
        if dedup is not None:
            stmts.append(("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)", dedup))
        await self._write(stmts, [((inode, index), None)])
        self._pending.pop((inode, index), None)
        if meta is not None:
            self._unlink(meta.file)
            if meta.pending_file != meta.file:
                self._unlink(meta.pending_file)
        return meta is not None and meta.version > 0

    async def replace(self, inode: int, index: int, version: int, content: bytes) -> int:
        """Sync: install ``content`` as committed ``version`` whatever was there; returns the CRC."""
        _, crc = await self.prepare(inode, index, version, "write", full=content)
        await self.commit(inode, index, version)
        return crc

    def recover(self) -> int:
        """Delete files no committed row points to (pending versions of a crashed process)."""
        self._pending.clear()
        self._rows.clear()
        self._close_files()
        keep = {f for (f,) in self.db.execute("SELECT file FROM chunks WHERE ver > 0 AND file IS NOT NULL")}
        removed = 0
        for sub in (self.path / "chunks").iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f"chunks/{sub.name}/{f.name}" not in keep:
                    f.unlink()
                    removed += 1
        return removed
