"""The chunk engine of one storage target: copy-on-write chunk files or block-granular in-place
updates, CRC32C per chunk (and per 4 KiB piece), and one atomic metadata commit per update.

On disk (``<target>/``): ``chunks/<xx>/<inode>.<index>.<version>`` data files and ``meta.db``
(SQLite, WAL) with one row per committed chunk (version, file, length, CRC32C). An update never
touches the committed file: it writes the new content to a new file and syncs it; that file is
the chunk's pending version, known only in memory (a pending version was never acknowledged, so
a crash may forget it). Commit points the row at the new file in one SQLite transaction and only
then unlinks the old file. A crash at any point leaves either the old or the new version, never a
torn chunk; :meth:`ChunkStore.recover` deletes the files no row points to.

Small partial updates of a chunk longer than one 64 KiB block (at most ``INPLACE_MAX`` bytes, not
a truncate) are not copied: the pending version is the update's ranges in memory plus the new
CRC32C of every 4 KiB piece they touch (a piece the ranges cover only partly is read and checked
against its stored CRC first; a whole one needs no old bytes). Commit writes, in the same SQLite
transaction, the chunk row (new version, length, chunk CRC combined from the piece CRCs, piece
CRCs) and a redo record holding the ranges;
only after that transaction is durable are the ranges written into the committed file in place
(``pwrite``, on the event loop, before the row cache shows the new version). A crash after the
commit replays the redo records on open (:meth:`ChunkStore.recover`), so the file is either the
old version (no commit) or the new one; a redo record is deleted only after its file was
``fdatasync``ed (checkpoint, in batches). The chunk CRC stays the CRC32C of the whole content, so
reads check it exactly as before.

The table ``dedup`` keeps, per (client, channel), the last applied sequence number and its result,
committed in the same transaction as the chunk, so a retried write is applied once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mmap
import os
import resource
import sqlite3
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import msgpack

__all__ = ["ChunkStore", "ChunkMeta", "checksum", "crc_combine", "INLINE_READ_MAX", "OPEN_FILES_MAX", "BLOCK_SIZE",
           "CRC_BLOCK",
           "INPLACE_MAX"]

log = logging.getLogger("openinfra.fs.storage")

# Committed rows kept in memory per target (entries; ~200 bytes each).
ROW_CACHE_MAX = 1 << 18
# Reads up to this many bytes run on the event loop instead of a worker thread (bytes).
INLINE_READ_MAX = 256 * 1024
# Committed chunk files kept open per target for reads on the event loop (descriptors): saves an
# open and a close (~5-10 us) per small read; a KV working set is thousands of chunks. At most
# a quarter of the process's descriptor limit (RLIMIT_NOFILE) per target. A file read whole
# (a small chunk, CRC32C-checked) is kept as a read-only map instead (one descriptor as well).
OPEN_FILES_MAX = 4096
# Whole small chunks are read from cached read-only maps of their files: the CRC32C check and
# the send read the page cache directly (no ``pread`` copy, no syscall). 0 turns it off (tests,
# A/B measurements: ``OPENINFRA_FS_MAP_READS=0``).
MAP_READS = os.environ.get("OPENINFRA_FS_MAP_READS", "1") != "0"
# Block of the per-block CRC32Cs (bytes): an in-place update reads and re-CRCs the blocks it touches.
BLOCK_SIZE = 64 * 1024
# Granularity of the stored CRC32Cs (bytes): an update that covers a whole 4 KiB piece needs none
# of its old bytes (no read of a cold file for aligned 4 KiB writes); a partly covered piece is
# read and checked. Per 64 KiB block the CRC is combined from its pieces' (kept in memory).
CRC_BLOCK = 4096
_PIECES = BLOCK_SIZE // CRC_BLOCK
# Updates of at most this many bytes (all ranges) of a chunk longer than one block are applied in
# place through the redo log; bigger ones, truncates and full replacements are copied (bytes).
INPLACE_MAX = 256 * 1024
# Redo records applied since the last checkpoint that trigger one (records), and the longest a
# record waits for one (seconds).
CHECKPOINT_RECORDS = 512
CHECKPOINT_S = 1.0


def checksum(data: bytes | memoryview) -> int:
    """CRC32C of ``data`` (hardware accelerated where the package has it)."""
    return crc32c.crc32c(data)


_POLY = 0x82F63B78  # CRC32C, reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC32C polynomial (reflected bit order; zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=256)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) mod p: the operator that appends ``nbytes`` bytes to a CRC."""
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


@functools.lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> tuple[list[int], ...]:
    """Byte tables of the (GF(2)-linear) product by :func:`_shift` (``nbytes``): four lookups
    instead of a 32-step loop per combine."""
    op = _shift(nbytes)
    tables = []
    for k in range(4):
        t = [0] * 256
        for bit in range(8):
            t[1 << bit] = _multmodp(op, 1 << (8 * k + bit))
        for v in range(3, 256):
            low = v & -v
            if v != low:
                t[v] = t[v ^ low] ^ t[low]
        tables.append(t)
    return tuple(tables)


def crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of ``a + b`` from ``crc1 = CRC32C(a)``, ``crc2 = CRC32C(b)`` and ``len2 = len(b)``."""
    if not len2:
        return crc1
    t0, t1, t2, t3 = _shift_tables(len2)
    return t0[crc1 & 255] ^ t1[(crc1 >> 8) & 255] ^ t2[(crc1 >> 16) & 255] ^ t3[crc1 >> 24] ^ crc2


def _fold(crcs: list[int], lo: int, hi: int, unit: int, length: int) -> int:
    """CRC32C of parts ``lo .. hi-1`` of a ``length``-byte content cut into ``unit``-byte parts
    (part k holds ``min(unit, length - k * unit)`` bytes), from the parts' CRC32Cs. The full parts
    are combined inline with one set of tables (no call, no ``min`` per part: a chunk's update
    combines a few hundred of them)."""
    c = crcs[lo]
    full = min(hi, length // unit)  # parts before this one have exactly ``unit`` bytes
    if lo + 1 < full:
        t0, t1, t2, t3 = _shift_tables(unit)
        for k in range(lo + 1, full):
            c = t0[c & 255] ^ t1[(c >> 8) & 255] ^ t2[(c >> 16) & 255] ^ t3[c >> 24] ^ crcs[k]
    for k in range(max(lo + 1, full), hi):
        c = crc_combine(c, crcs[k], min(unit, length - k * unit))
    return c


def _chunk_crc(block_crcs: list[int], length: int) -> int:
    """CRC32C of a chunk of ``length`` bytes from the CRC32Cs of its ``BLOCK_SIZE`` blocks."""
    return _fold(block_crcs, 0, len(block_crcs), BLOCK_SIZE, length) if block_crcs else 0


def _group_crcs(sub: list[int], length: int) -> list[int]:
    """The CRC32C of every ``BLOCK_SIZE`` block from the CRC32Cs of its ``CRC_BLOCK`` pieces."""
    return [_fold(sub, g, min(g + _PIECES, len(sub)), CRC_BLOCK, length) for g in range(0, len(sub), _PIECES)]


def _content_crcs(view: memoryview) -> tuple[list[int], list[int]]:
    """(piece CRC32Cs, block CRC32Cs) of a chunk's whole content."""
    n = len(view)
    return ([checksum(view[o:o + CRC_BLOCK]) for o in range(0, n, CRC_BLOCK)],
            [checksum(view[o:o + BLOCK_SIZE]) for o in range(0, n, BLOCK_SIZE)])


def _pack_crcs(crcs: list[int]) -> bytes:
    return struct.pack(f"<{len(crcs)}I", *crcs)


def _unpack_crcs(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 4}I", blob))


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
    # In-place updates committed but maybe not yet durable in their chunk file: the ranges
    # (msgpack [[offset, bytes], ...]) of version ``ver`` of the chunk stored in ``file``. ``tok``:
    # unique per record, so a checkpoint deletes exactly the records it synced (a chunk removed
    # and written again reuses (inode, idx, ver)).
    """CREATE TABLE IF NOT EXISTS redo (inode INTEGER, idx INTEGER, ver INTEGER, file TEXT, ranges BLOB,
       tok INTEGER, PRIMARY KEY (inode, idx, ver)) WITHOUT ROWID""",
]


_DELETE_REDO = "DELETE FROM redo WHERE inode = ? AND idx = ? AND ver = ? AND tok = ?"


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
        if "bcrc" not in [r[1] for r in self.db.execute("PRAGMA table_info(chunks)")]:
            # Per-piece CRC32Cs (little-endian u32 per CRC_BLOCK piece), NULL until a chunk's
            # first in-place update (computed from the file then, checked against the chunk CRC).
            self.db.execute("ALTER TABLE chunks ADD COLUMN bcrc BLOB")
        if "tok" not in [r[1] for r in self.db.execute("PRAGMA table_info(redo)")]:
            self.db.execute("ALTER TABLE redo ADD COLUMN tok INTEGER")  # a table from before the tokens
        self._wdb = self._connect()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="chunk-db")
        self._queue: list[tuple[list[tuple[str, tuple]], asyncio.Future]] = []
        self._flushing = False
        # Pending versions: (inode, index) -> (version, file, length, crc, ranges, (piece CRCs, block CRCs)). In
        # memory on purpose. ``ranges``: None for a copy-on-write version (``file`` is its new
        # file), else the ``[(offset, bytes), ...]`` of an in-place update of the committed ``file``.
        self._pending: dict[tuple[int, int], tuple] = {}
        # Block CRC32Cs of committed chunks: (inode, index) -> (version, [crc, ...]). Bounded.
        self._bcrc: dict[tuple[int, int], tuple[int, list[int]]] = {}
        # In-place updates written to their files since the last checkpoint: (inode, index,
        # version, token, file).
        self._applied: list[tuple[int, int, int, int, str]] = []
        self._tok = time.time_ns()  # redo record tokens: unique across restarts of this store
        self._ckpt_task: asyncio.Future | None = None
        self._ckpt_timer: asyncio.TimerHandle | None = None
        # Reads of committed files running in worker threads, by file: an in-place commit of that
        # file waits for them (they must not see a half-applied update).
        self._reading: dict[str, set[asyncio.Future]] = {}
        # Copy-on-write files being written in the background (``prepare(overlap=True)``), by file.
        self._writing: dict[str, asyncio.Future] = {}
        # Committed rows as last read or written: (inode, index) -> row tuple, or None for "no
        # row". This process is the only writer of meta.db and updates an entry only once its
        # transaction committed (before the old file is unlinked), so a hit equals the row a
        # SELECT would return; it saves a SQLite query (~50-150 us here) on every read.
        self._rows: dict[tuple[int, int], tuple | None] = {}
        # Open committed chunk files (descriptors, or read-only maps of files read whole), by
        # relative path, least recently used first. Used on the event-loop thread only, with no
        # await while a descriptor is in use (a worker thread could race an eviction's close). A
        # path leaves the cache whenever its file is unlinked or (re)written, before anything
        # else can create a file under that name (a chunk removed and written again reuses
        # ``<ino>.<idx>.1``), so an entry always holds the file the path names now.
        #
        # Maps: views of a map go out with replies and may outlive the read (a reply the socket
        # did not take at once waits in the transport, by reference), so the bytes of a mapped
        # file must never change while a view exists: nothing but an in-place update writes into
        # a committed file, and an in-place update is only prepared for a file with no map left
        # (:meth:`_unmap`: a map that still has views keeps its file copy-on-write), and no map is
        # made of a chunk with a pending version. Chunk files are never truncated in place, only
        # replaced by new files (a map keeps the unlinked file's pages alive) or grown by an
        # in-place update (no map then either).
        self._files: OrderedDict[str, int | mmap.mmap] = OrderedDict()
        # Maps dropped from ``_files`` while views of them were still out: path -> [map].
        # Closed (unmapped) once their views are gone (:meth:`_unmap`, :meth:`_drop_map`).
        self._exported: dict[str, list[mmap.mmap]] = {}
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
        if self._ckpt_timer is not None:
            self._ckpt_timer.cancel()
        self._executor.shutdown(wait=True)
        if self._applied:  # best effort: records left behind are replayed (harmlessly) on the next open
            try:
                applied, self._applied = self._applied, []
                if self.fsync:
                    self._sync_files({rel for *_, rel in applied})
                self._apply([[(_DELETE_REDO, a[:4]) for a in applied]])
            except Exception as exc:  # noqa: BLE001 - closing anyway; recovery replays the records
                log.warning("chunk store %s: checkpoint at close failed: %s", self.path, exc)
        self._wdb.close()
        self.db.close()

    async def _write(self, stmts: list[tuple[str, tuple]], rows: list[tuple[tuple[int, int], tuple | None]],
                     after=None, after_files: tuple[str, ...] = ()) -> None:
        """Apply ``stmts`` atomically; returns once they are committed (durable with fsync=True).
        ``rows``: the chunk rows they set (``(key, row or None)``), put in the row cache by the
        flusher once the transaction committed, even if this caller was cancelled meanwhile.
        ``after``: a callable the flusher runs on the event loop right after the commit, before
        the rows are cached (in-place updates' ``pwrite``s into ``after_files``), also if this
        caller was cancelled; the worker-thread reads of ``after_files`` in flight finish first."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((stmts, fut, rows, (after, after_files)))
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
                    await loop.run_in_executor(self._executor, self._apply, [e[0] for e in batch])
                except BaseException as exc:
                    for _, fut, rows, _after in batch:
                        for key, _ in rows:  # rolled back, or unknown if cancelled: ask SQLite next time
                            self._rows.pop(key, None)
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, fut, rows, (after, after_files) in batch:
                        error = None
                        if after is not None:
                            # Reads of the old bytes in worker threads (begun before or during the
                            # transaction: the row cache still shows the old version) must not see
                            # the ranges land. No await between the last wait and after(), so no
                            # new threaded read of the files can start in between.
                            while True:
                                reading = [f for rel in after_files for f in self._reading.get(rel, ())]
                                if not reading:
                                    break
                                await asyncio.wait(reading)
                            try:
                                after()
                            except Exception as exc:  # committed, but the file lags: replayed on restart
                                error = exc
                                log.error("chunk store %s: applying a committed update failed: %s", self.path, exc)
                        for key, row in rows:
                            if error is None:
                                self._cache_row(key, row)
                            else:
                                self._rows.pop(key, None)
                        if not fut.done():
                            if error is None:
                                fut.set_result(None)
                            else:
                                fut.set_exception(error)
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
        only; valid until the next call into this store). The cache must not hold a map of
        ``rel`` (:meth:`read_now` reads mapped files through the map)."""
        fd = self._files.get(rel)
        if fd is not None:
            self._files.move_to_end(rel)
            return fd
        fd = self._files[rel] = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
        if len(self._files) > self._files_max:
            self._close_entry(*self._files.popitem(last=False))
        return fd

    def _map(self, rel: str, length: int) -> mmap.mmap | None:
        """A new cached read-only map of committed chunk file ``rel`` (no map of it cached:
        :meth:`read_now`), replacing its cached descriptor; None (nothing cached) when the file
        is not ``length`` bytes long (the caller's ``pread`` then sees what it holds)."""
        fd = self._files.pop(rel, None)
        if fd is None:
            fd = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != length:
                return None
            # (the map keeps a descriptor of its own; MAP_POPULATE: the pages at once, no fault per page)
            m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._files[rel] = m
        if len(self._files) > self._files_max:
            self._close_entry(*self._files.popitem(last=False))
        return m

    def _close_entry(self, rel: str, ent: int | mmap.mmap) -> None:
        if type(ent) is int:
            os.close(ent)
        else:
            self._drop_map(rel, ent)

    def _drop_map(self, rel: str, m: mmap.mmap) -> None:
        """Unmap ``m`` (of ``rel``), or keep it in ``_exported`` while views of it are out."""
        try:
            m.close()
        except BufferError:  # views still out (a reply in a transport's buffer)
            self._exported.setdefault(rel, []).append(m)
            if len(self._exported) > 64:
                self._sweep_exported()

    def _sweep_exported(self) -> None:
        for rel in list(self._exported):
            self._unmap(rel)

    def _unmap(self, rel: str | None) -> bool:
        """Drop every map of ``rel``; whether none is left (no view of one still out), i.e.
        whether the file's bytes may be written in place now."""
        if not rel:
            return True
        ent = self._files.get(rel)
        if ent is not None and type(ent) is not int:
            del self._files[rel]
            try:
                ent.close()
            except BufferError:
                self._exported.setdefault(rel, []).append(ent)
        maps = self._exported.get(rel)
        if maps:
            left = []
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    left.append(m)
            if left:
                self._exported[rel] = left
                return False
            del self._exported[rel]
        return True

    def _forget_file(self, rel: str) -> None:
        ent = self._files.pop(rel, None)
        if ent is not None:
            self._close_entry(rel, ent)

    def _close_files(self) -> None:
        files, self._files = self._files, OrderedDict()
        for rel, ent in files.items():
            self._close_entry(rel, ent)

    def _written(self, rel: str, fut: asyncio.Future) -> None:
        """Done callback of a background file write: forget it (its error, if any, is raised to
        the commit that awaits it; retrieved here so an abandoned one is not reported)."""
        if self._writing.get(rel) is fut:
            del self._writing[rel]
        if not fut.cancelled():
            fut.exception()

    def _unlink_written(self, rel: str | None) -> None:
        """:meth:`_unlink` once any background write of ``rel`` is over (never under a writer)."""
        busy = self._writing.get(rel) if rel else None
        if busy is None:
            self._unlink(rel)
        else:
            busy.add_done_callback(lambda _f: None if self._writing.get(rel) else self._unlink(rel))

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
            meta.pending_version, meta.pending_file, meta.pending_length, meta.pending_crc = pending[:4]
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
            data = await self._threaded_read(meta.file, offset, length)
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
        rel = meta.file
        ent = self._files.get(rel)
        if ent is not None and type(ent) is not int:
            # A cached map (made by a whole read; see ``_files`` for why its bytes stay put). The
            # file's size is checked per read (one fstat): a file cut short behind our back must
            # not be touched through a map (SIGBUS); ``pread`` then reads what is there.
            end = offset + length
            if len(ent) >= end and ent.size() >= end:
                self._files.move_to_end(rel)
                data = memoryview(ent)[offset:end]
            else:
                self._forget_file(rel)
                data = None
        elif whole and MAP_READS and meta.pending_version is None and length:
            ent = self._map(rel, length)
            data = None if ent is None else memoryview(ent)
        else:
            data = None
        if data is None:
            data = self._pread(self._open(rel), offset, length)
        if whole and checksum(data) != meta.crc:
            from openinfra.fs.errors import Code, FsError

            raise FsError(Code.CHECKSUM_MISMATCH, f"chunk {meta.inode}:{meta.index} v{meta.version} fails its CRC32C")
        return memoryview(data)[skip:] if skip else data

    async def _threaded_read(self, rel: str, offset: int = 0, length: int = -1, spans=None):
        """:meth:`_read_file` (or, given ``spans``, :meth:`_read_spans`) of committed file ``rel``
        in a worker thread, registered in ``_reading`` so that an in-place commit's ``pwrite``s into
        ``rel`` wait for it (the flusher)."""
        call = (self._read_spans, rel, spans) if spans is not None else (self._read_file, rel, offset, length)
        fut = asyncio.ensure_future(asyncio.to_thread(*call))
        reading = self._reading.setdefault(rel, set())
        reading.add(fut)
        try:
            return await fut
        finally:
            reading.discard(fut)
            if not reading and self._reading.get(rel) is reading:
                del self._reading[rel]

    async def committed_content(self, inode: int, index: int) -> tuple[bytes, ChunkMeta | None]:
        meta = self.get(inode, index)
        if meta is None or meta.version == 0:
            return b"", meta
        return await self._threaded_read(meta.file), meta

    async def prepare(self, inode: int, index: int, version: int, op: str, offset: int = 0, data: bytes = b"",
                      length: int = 0, full: bytes | None = None,
                      ranges: list[tuple[int, bytes]] | None = None,
                      overlap: bool = False) -> tuple[bytes, int]:
        """Write version ``version`` as pending (copy-on-write); returns ``(content, crc)``.

        ``overlap``: return as soon as the content and CRC are known and write (and sync) the new
        file in the background; :meth:`commit` waits for that write (and fails if it failed), so
        a caller can forward the update down the chain meanwhile.

        ``op``: ``"write"`` (``data`` at ``offset``), ``"writev"`` (each ``(offset, data)`` of
        ``ranges`` in order; a gap past the old end reads as zeros), ``"truncate"`` (to ``length``
        bytes) or a full replacement when ``full`` is given.

        A small partial ``write``/``writev`` of a chunk longer than one block is prepared in place
        (see the module docstring): nothing is written yet and ``content`` comes back as None
        (:meth:`pending_content` builds it when needed)."""
        meta = self.get(inode, index)
        if full is None and op in ("write", "writev"):
            upd = [(offset, data)] if op == "write" else list(ranges or ())
            if self._inplace_ok(meta, upd):
                crc = await self._prepare_inplace(meta, version, upd)
                if crc is not None:
                    return None, crc
                meta = self.get(inode, index)  # copied instead (see _prepare_inplace)
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
        # per-block CRC32Cs too (~50 us a MiB): the chunk's first in-place update then reads only
        # the blocks it touches
        view = memoryview(content)
        crcs = _content_crcs(view)
        del view
        rel = self._file(inode, index, version)
        if meta is not None and meta.file == rel:
            rel += ".r"  # re-applying the committed version number: never overwrite committed data
        # (on this thread, not the writer's: the descriptor cache is the event loop's. Never
        # cached in practice: a committed file is never rewritten, see ".r" above.)
        self._forget_file(rel)
        busy = self._writing.get(rel)
        if busy is not None:  # an earlier attempt's background write of this very file
            await asyncio.wait([busy])
        if overlap:
            fut = asyncio.ensure_future(asyncio.to_thread(self._write_file, rel, content))
            self._writing[rel] = fut
            fut.add_done_callback(functools.partial(self._written, rel))
        else:
            await asyncio.to_thread(self._write_file, rel, content)
        old_pending = meta.pending_file if meta is not None else None
        self._pending[(inode, index)] = (version, rel, len(content), crc, None, crcs)
        if old_pending and old_pending != rel and old_pending != (meta.file if meta else None):
            self._unlink_written(old_pending)  # an earlier attempt that never committed
        return content, crc

    async def commit(self, inode: int, index: int, version: int,
                     dedup: tuple[str, int, int, bytes] | None = None) -> None:
        """Make pending ``version`` the committed one (one SQLite transaction, shared with the commits
        that arrive together), then drop the old file."""
        await self.commit_many([(inode, index, version)], dedup)

    def _pending_of(self, inode: int, index: int, version: int) -> tuple:
        pend = self._pending.get((inode, index))
        if pend is None or pend[0] != version:
            raise RuntimeError(f"chunk {inode}:{index}: no pending version {version} to commit")
        return pend

    async def written(self, inode: int, index: int, version: int) -> None:
        """Wait until the new file of pending copy-on-write ``version`` is written and synced
        (``prepare(overlap=True)`` writes it in the background); raises if that write failed or the
        version was dropped meanwhile. An in-place version has no file to wait for."""
        pend = self._pending_of(inode, index, version)
        busy = self._writing.get(pend[1]) if pend[4] is None else None
        if busy is not None:
            await busy  # the new file is durable before any row points at it (raises if the write failed)
            if self._pending.get((inode, index)) is not pend:
                raise RuntimeError(f"chunk {inode}:{index}: pending version {version} dropped during its write")

    async def commit_many(self, versions: list[tuple[int, int, int]],
                          dedup: tuple[str, int, int, bytes] | None = None) -> None:
        """Make the pending versions ``[(inode, index, version), ...]`` (distinct chunks) the
        committed ones in one SQLite transaction, together with ``dedup``: a copy-on-write version
        once its new file is durable (the old file is unlinked after the commit), an in-place one
        with its row, piece CRCs and redo record, its ranges written into the file by the flusher
        right after the transaction, before the row cache shows the version. All or nothing:
        raises (and commits none) if one has no such pending version or its file write failed;
        callers that want the others committed check :meth:`written` first."""
        for inode, index, version in versions:
            await self.written(inode, index, version)
        stmts: list[tuple[str, tuple]] = []
        rows: list[tuple[tuple[int, int], tuple]] = []
        done: list[tuple[tuple[int, int], int, tuple, str | None]] = []  # (key, version, pending, old file)
        inplace: list[tuple[tuple[int, int], int, tuple, int]] = []     # (key, version, pending, redo token)
        for inode, index, version in versions:
            key = (inode, index)
            pend = self._pending_of(inode, index, version)
            row = (inode, index, version, pend[2], pend[3], pend[1])
            stmts.append(("INSERT OR REPLACE INTO chunks (inode, idx, ver, len, crc, file, bcrc) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", row + (_pack_crcs(pend[5][0]),)))
            rows.append((key, row))
            if pend[4] is None:  # copy-on-write: the new file has it all
                stmts.append(("DELETE FROM redo WHERE inode = ? AND idx = ?", key))
                meta = self.get(inode, index)
                done.append((key, version, pend, meta.file if meta is not None else None))
            else:
                self._tok += 1
                stmts.append(("INSERT OR REPLACE INTO redo (inode, idx, ver, file, ranges, tok) VALUES (?, ?, ?, ?, ?, ?)",
                              (inode, index, version, pend[1], msgpack.packb(pend[4]), self._tok)))
                inplace.append((key, version, pend, self._tok))
                done.append((key, version, pend, None))
        if dedup is not None:
            stmts.append(("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)", dedup))
        for key, _, pend, _ in done:
            if pend[4] is None:
                self._bcrc.pop(key, None)

        after = None
        if inplace:
            def after() -> None:
                error = None
                for key, version, pend, tok in inplace:
                    try:
                        self._write_ranges(pend[1], pend[4])
                    except Exception as exc:  # committed, the file lags: replayed on restart
                        error = error or exc
                        continue
                    self._cache_bcrc(key, version, pend[5])
                    self._applied.append((key[0], key[1], version, tok, pend[1]))
                self._schedule_checkpoint()
                if error is not None:
                    raise error

        # (threaded reads of the in-place files finish first)
        await self._write(stmts, rows, after, tuple({pend[1] for _, _, pend, _ in inplace}))
        for key, version, pend, old_file in done:
            if pend[4] is None:
                self._cache_bcrc(key, version, pend[5])
            if self._pending.get(key, (None,))[0] == version:
                del self._pending[key]
            if old_file and old_file != pend[1]:
                self._unlink(old_file)

    # --- in-place (block-granular) updates -------------------------------------------------------

    @staticmethod
    def _inplace_ok(meta: ChunkMeta | None, upd: list) -> bool:
        """Whether update ``upd`` (``[(offset, bytes), ...]``) of committed ``meta`` goes in place:
        a chunk longer than one block, at most ``INPLACE_MAX`` bytes of ranges (and of zero gap
        past the end), not one write over the whole old content (that is copied: no old bytes)."""
        if meta is None or meta.version == 0 or meta.file is None or meta.length <= BLOCK_SIZE or not upd:
            return False
        total = sum(len(d) for _, d in upd)
        if total == 0 or total > INPLACE_MAX:
            return False
        if max(off + len(d) for off, d in upd) - meta.length > INPLACE_MAX:
            return False
        return not (len(upd) == 1 and upd[0][0] == 0 and len(upd[0][1]) >= meta.length)

    def _cache_bcrc(self, key: tuple[int, int], version: int, crcs: tuple[list[int], list[int]]) -> None:
        if len(self._bcrc) >= ROW_CACHE_MAX:
            self._bcrc.clear()
        self._bcrc[key] = (version, crcs)

    async def _block_crcs(self, meta: ChunkMeta) -> tuple[list[int], list[int]]:
        """(piece CRC32Cs, block CRC32Cs) of committed ``meta``: cached, stored with the row, or
        (the chunk's first in-place update) computed from the file, which must match the chunk CRC."""
        key = (meta.inode, meta.index)
        npieces = (meta.length + CRC_BLOCK - 1) // CRC_BLOCK
        hit = self._bcrc.get(key)
        if hit is not None and hit[0] == meta.version and len(hit[1][0]) == npieces:
            return hit[1]
        row = self.db.execute("SELECT ver, bcrc FROM chunks WHERE inode = ? AND idx = ?", key).fetchone()
        if row is not None and row[0] == meta.version and row[1] is not None and len(row[1]) == 4 * npieces:
            sub = _unpack_crcs(row[1])
            crcs = (sub, _group_crcs(sub, meta.length))
        else:
            data = await self._threaded_read(meta.file, 0, meta.length)
            if len(data) != meta.length or checksum(data) != meta.crc:
                from openinfra.fs.errors import Code, FsError

                raise FsError(Code.CHECKSUM_MISMATCH,
                              f"chunk {meta.inode}:{meta.index} v{meta.version} fails its CRC32C")
            crcs = _content_crcs(memoryview(data))
        self._cache_bcrc(key, meta.version, crcs)
        return crcs

    def _read_spans(self, rel: str, spans: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if len(spans) > 1:  # cold pieces: let the kernel fetch them all at once
                for lo, hi in spans:
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            return [self._pread(fd, lo, hi - lo) for lo, hi in spans]
        finally:
            os.close(fd)

    async def _read_old(self, rel: str, spans: list[tuple[int, int]]) -> list:
        """The bytes of ``spans`` of committed file ``rel``: on the event loop when the page cache
        has them all (``RWF_NOWAIT``), else in a worker thread (a cold read must not stall the loop)."""
        if not spans:
            return []
        if sum(hi - lo for lo, hi in spans) <= INLINE_READ_MAX:
            fd = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
            try:
                out = []
                for lo, hi in spans:
                    buf = bytearray(hi - lo)
                    if os.preadv(fd, [buf], lo, os.RWF_NOWAIT) != hi - lo:
                        break
                    out.append(buf)
                else:
                    return out
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        return await self._threaded_read(rel, spans=spans)

    async def _prepare_inplace(self, meta: ChunkMeta, version: int, upd: list) -> int | None:
        """Pending in-place version ``version`` of ``meta``: the ranges and the new CRC32C of every
        4 KiB piece they touch. A piece the ranges cover whole needs no old bytes; the old bytes of
        a partly covered one are read and checked against its CRC. Returns the new chunk CRC32C,
        or None (nothing done: the caller copies) while views of a map of the file are out.
        Nothing is written until :meth:`commit`."""
        from openinfra.fs.errors import Code, FsError

        key = (meta.inode, meta.index)
        sub, groups = await self._block_crcs(meta)
        upd = [(off, bytes(d)) for off, d in upd if len(d)]
        old_len = meta.length
        new_len = max(old_len, max(off + len(d) for off, d in upd))
        pieces: dict[int, list] = {}  # piece index -> [(start, end, range offset, range bytes)], in order
        for off, d in upd:
            pos, end = off, off + len(d)
            while pos < end:
                e = min(end, (pos // CRC_BLOCK + 1) * CRC_BLOCK)
                pieces.setdefault(pos // CRC_BLOCK, []).append((pos, e, off, d))
                pos = e
        for p in range(old_len // CRC_BLOCK, (new_len - 1) // CRC_BLOCK + 1) if new_len > old_len else ():
            pieces.setdefault(p, [])  # grown: the old last piece and the gap (zeros) change too
        need = []
        for p, ps in pieces.items():
            lo = p * CRC_BLOCK
            if lo >= old_len:
                continue
            hi, at = min(lo + CRC_BLOCK, new_len), lo
            for s, e in sorted((q[0], q[1]) for q in ps):
                if s > at:
                    break
                at = max(at, e)
            if at < hi:
                need.append(p)
        need.sort()
        olds = dict(zip(need, await self._read_old(
            meta.file, [(p * CRC_BLOCK, min(p * CRC_BLOCK + CRC_BLOCK, old_len)) for p in need])))
        new_sub = sub + [0] * ((new_len + CRC_BLOCK - 1) // CRC_BLOCK - len(sub))
        for p, ps in pieces.items():
            lo = p * CRC_BLOCK
            hi = min(lo + CRC_BLOCK, new_len)
            old = olds.get(p)
            if old is not None:
                if len(old) != min(lo + CRC_BLOCK, old_len) - lo or checksum(old) != sub[p]:
                    raise FsError(Code.CHECKSUM_MISMATCH,
                                  f"chunk {meta.inode}:{meta.index} v{meta.version} bytes {lo}-{hi} fail their CRC32C")
                buf = bytearray(old)
                if len(buf) < hi - lo:
                    buf += bytes(hi - lo - len(buf))
            else:
                buf = bytearray(hi - lo)  # covered whole by the ranges, or past the old end
            for s, e, off, d in ps:
                buf[s - lo:e - lo] = d[s - off:e - off]
            new_sub[p] = checksum(buf)
        new_groups = groups + [0] * ((new_len + BLOCK_SIZE - 1) // BLOCK_SIZE - len(groups))
        for g in {p // _PIECES for p in pieces}:
            first = g * _PIECES
            new_groups[g] = _fold(new_sub, first, min(first + _PIECES, len(new_sub)), CRC_BLOCK, new_len)
        crc = _chunk_crc(new_groups, new_len)
        if not self._unmap(meta.file):
            # Views of a map of the file are still out (a reply being sent): its bytes must not
            # change under them. No await from here on, and no map is made of a chunk with a
            # pending version, so none appears before the commit has written the ranges.
            return None
        old_pending = meta.pending_file
        self._pending[key] = (version, meta.file, new_len, crc, upd, (new_sub, new_groups))
        if old_pending and old_pending != meta.file:
            self._unlink_written(old_pending)  # an earlier copy-on-write attempt that never committed
        return crc

    def _write_ranges(self, rel: str, ranges) -> None:
        fd = os.open(self._root_slash + rel, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for off, d in ranges:
                view = memoryview(d)
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
        finally:
            os.close(fd)

    def _sync_files(self, rels) -> None:
        for rel in rels:
            try:
                fd = os.open(self._root_slash + rel, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # replaced or removed since: its redo records went in that transaction
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def _schedule_checkpoint(self) -> None:
        if len(self._applied) >= CHECKPOINT_RECORDS:
            self._start_checkpoint()
        elif self._ckpt_timer is None:
            self._ckpt_timer = asyncio.get_running_loop().call_later(CHECKPOINT_S, self._start_checkpoint)

    def _start_checkpoint(self) -> None:
        if self._ckpt_timer is not None:
            self._ckpt_timer.cancel()
            self._ckpt_timer = None
        if self._applied and (self._ckpt_task is None or self._ckpt_task.done()):
            self._ckpt_task = asyncio.ensure_future(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Sync the files of applied in-place updates, then delete their redo records."""
        loop = asyncio.get_running_loop()
        try:
            for _ in range(16):  # a burst of updates: a few rounds, then the timer takes over
                batch, self._applied = self._applied, []
                if not batch:
                    break
                if self.fsync:
                    await loop.run_in_executor(None, self._sync_files, {rel for *_, rel in batch})
                await self._write([(_DELETE_REDO, a[:4]) for a in batch], [])
                if len(self._applied) < CHECKPOINT_RECORDS:
                    break
        except Exception as exc:  # the records stay in the table: replayed (harmlessly) on the next open
            log.warning("chunk store %s: checkpoint failed: %s", self.path, exc)
        finally:
            if self._applied and self._ckpt_timer is None:
                self._ckpt_timer = loop.call_later(CHECKPOINT_S, self._start_checkpoint)

    async def pending_content(self, inode: int, index: int) -> bytes:
        """The whole content of the chunk's pending version (to resend it to a stale successor)."""
        pend = self._pending.get((inode, index))
        if pend is None:
            raise RuntimeError(f"chunk {inode}:{index}: no pending version")
        if pend[4] is None:
            busy = self._writing.get(pend[1])
            if busy is not None:
                await busy
            return await asyncio.to_thread(self._read_file, pend[1])
        data = bytearray((await self.committed_content(inode, index))[0])
        for off, d in pend[4]:
            if off > len(data):
                data += bytes(off - len(data))
            data[off:off + len(d)] = d
        return bytes(data)

    def abort(self, inode: int, index: int) -> None:
        """Drop a pending version (its write failed downstream and will be retried or abandoned)."""
        pending = self._pending.pop((inode, index), None)
        if pending is None:
            return
        row = self.db.execute("SELECT file FROM chunks WHERE inode = ? AND idx = ?", (inode, index)).fetchone()
        if row is None or row[0] != pending[1]:
            self._unlink_written(pending[1])

    async def remove(self, inode: int, index: int, dedup: tuple[str, int, int, bytes] | None = None) -> bool:
        """Delete a chunk (committed and pending); returns whether it existed."""
        meta = self.get(inode, index)
        stmts = [("DELETE FROM chunks WHERE inode = ? AND idx = ?", (inode, index)),
                 ("DELETE FROM redo WHERE inode = ? AND idx = ?", (inode, index))]
        if dedup is not None:
            stmts.append(("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)", dedup))
        self._bcrc.pop((inode, index), None)
        await self._write(stmts, [((inode, index), None)])
        self._pending.pop((inode, index), None)
        if meta is not None:
            self._unlink(meta.file)
            if meta.pending_file != meta.file:
                self._unlink_written(meta.pending_file)
        return meta is not None and meta.version > 0

    async def replace(self, inode: int, index: int, version: int, content: bytes) -> int:
        """Sync: install ``content`` as committed ``version`` whatever was there; returns the CRC."""
        _, crc = await self.prepare(inode, index, version, "write", full=content)
        await self.commit(inode, index, version)
        return crc

    def recover(self) -> int:
        """Replay the redo records of committed in-place updates (in version order, then sync the
        files), and delete files no committed row points to (pending versions of a crashed process)."""
        self._pending.clear()
        self._rows.clear()
        self._bcrc.clear()
        self._applied.clear()
        self._close_files()
        redo = self.db.execute(
            "SELECT r.file, r.ranges FROM redo r JOIN chunks c ON c.inode = r.inode AND c.idx = r.idx"
            " WHERE c.file = r.file AND r.ver <= c.ver ORDER BY r.inode, r.idx, r.ver").fetchall()
        for rel, blob in redo:
            try:
                self._write_ranges(rel, msgpack.unpackb(blob))
            except FileNotFoundError:
                log.error("chunk store %s: redo record for missing file %s", self.path, rel)
        if redo and self.fsync:
            self._sync_files({rel for rel, _ in redo})
        self.db.execute("DELETE FROM redo")
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
