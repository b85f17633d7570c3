"""Write-back cache of the FUSE mount: dirty byte ranges per open inode, flushed chunk by chunk.

A 4 KiB write that went straight to storage cost a whole CRAQ round trip, and each replica
rewrote its 1 MiB chunk (copy-on-write). The mount keeps writes here instead and sends each
touched chunk once when it flushes:

* one :class:`DirtyRanges` per inode (shared by the mount's handles of that inode, so a read
  through any handle sees the writes of every handle), non-overlapping and sorted; a newer
  write replaces the bytes it covers (last write wins), and adjacent ranges merge;
* a flush sends one ``write_batch`` per chain (split when large) holding every touched chunk of
  that chain with its ranges (several disjoint ranges of one chunk are one multi-range update);
  storage handles the batch as one request and one commit per replica, with a result per chunk;
* a chunk leaves the cache only once its write was acknowledged. On an error the chunks that
  failed stay dirty and the error propagates (the mount turns it into EIO for the caller of
  fsync/close/write/read); a later flush tries them again;
* :class:`WriteBack` bounds the memory: ``per_file`` bytes per inode and ``total`` bytes over
  all inodes (dirty bytes, after merging).

Concurrency: the FUSE loop serves requests as concurrent tasks; every operation that awaits
while it uses an inode's ranges holds that inode's ``lock`` so that a write cannot land in the
middle of a flush of the same bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
from dataclasses import dataclass, field

__all__ = ["DirtyRanges", "DirtyFile", "WriteBack", "flush_file"]

log = logging.getLogger("openinfra.fs.fuse")


class DirtyRanges:
    """Sorted, non-overlapping, non-adjacent dirty byte ranges of one file (offsets in bytes)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.bufs: list[bytearray] = []
        self.nbytes = 0  # dirty bytes held

    def __bool__(self) -> bool:
        return bool(self.starts)

    @property
    def end(self) -> int:
        """One past the last dirty byte (0 when clean)."""
        return self.starts[-1] + len(self.bufs[-1]) if self.starts else 0

    def ranges(self) -> list[tuple[int, bytearray]]:
        return list(zip(self.starts, self.bufs))

    def add(self, off: int, data) -> tuple[int, int]:
        """Record ``data`` at ``off`` over whatever was dirty there; returns the merged range (start, end)."""
        n = len(data)
        end = off + n
        i = bisect.bisect_right(self.starts, off) - 1
        if i >= 0 and self.starts[i] + len(self.bufs[i]) >= off:
            first = i  # the range before ``off`` touches or covers it
        else:
            first = i + 1
        last = bisect.bisect_right(self.starts, end)  # ranges starting at or before ``end`` merge
        if first == last:  # touches nothing: a new range
            self.starts.insert(first, off)
            self.bufs.insert(first, bytearray(data))
            self.nbytes += n
            return off, end
        s0, b0 = self.starts[first], self.bufs[first]
        if last - first == 1 and s0 <= off:  # the common cases: overwrite inside, or append to, one range
            old = len(b0)
            if end <= s0 + old:
                b0[off - s0:end - s0] = data
            else:
                b0[off - s0:] = data
            self.nbytes += len(b0) - old
            return s0, s0 + len(b0)
        start = min(off, s0)
        stop = max(end, self.starts[last - 1] + len(self.bufs[last - 1]))
        merged = bytearray(stop - start)
        for s, b in zip(self.starts[first:last], self.bufs[first:last]):
            merged[s - start:s - start + len(b)] = b
            self.nbytes -= len(b)
        merged[off - start:end - start] = data
        self.starts[first:last] = [start]
        self.bufs[first:last] = [merged]
        self.nbytes += len(merged)
        return start, stop

    def overlaps(self, off: int, size: int) -> bool:
        i = bisect.bisect_right(self.starts, off + size - 1) - 1
        return size > 0 and i >= 0 and self.starts[i] + len(self.bufs[i]) > off

    def overlay(self, buf: bytearray, off: int) -> None:
        """Copy the dirty bytes that fall in ``[off, off + len(buf))`` into ``buf``."""
        end = off + len(buf)
        i = max(0, bisect.bisect_right(self.starts, off) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            s, b = self.starts[i], self.bufs[i]
            lo, hi = max(off, s), min(end, s + len(b))
            if lo < hi:
                buf[lo - off:hi - off] = b[lo - s:hi - s]
            i += 1

    def discard(self, lo: int, hi: int) -> None:
        """Forget the dirty bytes in ``[lo, hi)`` (written, or cut off by a truncate)."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            s, b = self.starts[i], self.bufs[i]
            e = s + len(b)
            if e <= lo:
                i += 1
                continue
            keep = []
            if s < lo:
                keep.append((s, b[:lo - s]))
            if e > hi:
                keep.append((hi, b[hi - s:]))
            self.nbytes -= len(b) - sum(len(k[1]) for k in keep)
            self.starts[i:i + 1] = [k[0] for k in keep]
            self.bufs[i:i + 1] = [k[1] for k in keep]
            i += len(keep)

    def take(self, lo: int, hi: int) -> "DirtyRanges":
        """Move the dirty bytes in ``[lo, hi)`` out into a new :class:`DirtyRanges` (copies)."""
        out = DirtyRanges()
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            s, b = self.starts[i], self.bufs[i]
            a, z = max(lo, s), min(hi, s + len(b))
            if a < z:  # (clipped pieces of non-adjacent ranges stay non-adjacent)
                out.starts.append(a)
                # a buffer inside the span moves as it is (discard below drops it without a copy)
                out.bufs.append(b if (a, z) == (s, s + len(b)) else b[a - s:z - s])
                out.nbytes += z - a
            i += 1
        self.discard(lo, hi)
        return out

    def add_under(self, off: int, data) -> None:
        """Record the bytes of ``data`` at ``off`` only where nothing is dirty now: older bytes
        (of a failed background flush) coming back under the writes made since."""
        end = off + len(data)
        pos = off
        i = max(0, bisect.bisect_right(self.starts, off) - 1)
        gaps = []
        while pos < end:
            while i < len(self.starts) and self.starts[i] + len(self.bufs[i]) <= pos:
                i += 1
            if i < len(self.starts) and self.starts[i] <= pos:
                pos = self.starts[i] + len(self.bufs[i])  # dirty here: skip past it
                continue
            stop = min(end, self.starts[i]) if i < len(self.starts) else end
            gaps.append((pos, stop))
            pos = stop
        for a, z in gaps:
            self.add(a, data[a - off:z - off])

    def by_chunk(self, chunk_size: int) -> dict[int, list[tuple[int, bytearray]]]:
        """The dirty pieces grouped by chunk index: ``{index: [(file offset, bytes), ...]}``, in order.
        Copies, not views: a view would pin the buffers (a bytearray with views cannot grow), and
        an error's traceback may keep them alive."""
        out: dict[int, list[tuple[int, bytearray]]] = {}
        for s, b in zip(self.starts, self.bufs):
            pos, e = s, s + len(b)
            while pos < e:
                idx = pos // chunk_size
                stop = min(e, (idx + 1) * chunk_size)
                out.setdefault(idx, []).append((pos, b[pos - s:stop - s]))
                pos = stop
        return out


@dataclass
class DirtyFile:
    """The cache of one inode: its ranges and the lock that orders writes against flushes.

    ``inflight``: a background flush of a sequential run (``[span[0], span[1])``, its bytes moved
    out of ``ranges``) that the writer does not wait for; at most one per inode. Whatever of it
    fails comes back into ``ranges`` under the newer writes. Everything that flushes, truncates or
    reads the span waits for it first."""

    ranges: DirtyRanges = field(default_factory=DirtyRanges)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: asyncio.Future | None = None
    span: tuple[int, int] = (0, 0)

    async def settle(self) -> None:
        """Wait for the background flush, if any (it never raises: its failures are back in ``ranges``)."""
        while self.inflight is not None:
            await asyncio.wait([self.inflight])


class WriteBack:
    """Dirty data of the mount: ``per_file`` and ``total`` are limits in bytes (``total`` 0: write-through)."""

    def __init__(self, per_file: int = 64 << 20, total: int = 256 << 20):
        if per_file < 0 or total < 0:
            raise ValueError(f"write-back limits: expected >= 0 bytes, got per_file={per_file} total={total}")
        self.per_file, self.total = per_file, total
        self.files: dict[int, DirtyFile] = {}

    @property
    def enabled(self) -> bool:
        return self.total > 0 and self.per_file > 0

    @property
    def nbytes(self) -> int:
        """Dirty bytes held over all inodes."""
        return sum(d.ranges.nbytes for d in self.files.values())

    def get(self, inode: int) -> DirtyFile:
        d = self.files.get(inode)
        if d is None:
            d = self.files[inode] = DirtyFile()
        return d

    def peek(self, inode: int) -> DirtyRanges | None:
        """The inode's ranges if it has dirty bytes, else None."""
        d = self.files.get(inode)
        return d.ranges if d is not None and d.ranges else None

    def end(self, inode: int) -> int:
        """One past the inode's last dirty byte (0 when clean): the length getattr must report at least."""
        d = self.files.get(inode)
        if d is None:
            return 0
        return max(d.ranges.end, d.span[1]) if d.inflight is not None else d.ranges.end

    def largest(self) -> list[int]:
        """Inodes with dirty bytes, most dirty bytes first (who to flush when ``total`` is exceeded)."""
        return sorted((i for i, d in self.files.items() if d.ranges), key=lambda i: -self.files[i].ranges.nbytes)

    def drop(self, inode: int) -> None:
        d = self.files.get(inode)
        if d is not None and not d.ranges and not d.lock.locked() and d.inflight is None:
            del self.files[inode]


async def flush_file(f, ranges: DirtyRanges, lo: int = 0, hi: int | None = None) -> None:
    """Write the dirty bytes of ``ranges`` within ``[lo, hi)`` through the open native file ``f``
    (an :class:`~openinfra.fs.AsyncFile` open for writing): one ``write_batch`` per chain for its
    touched chunks, chains in parallel. Written chunks leave ``ranges``; the chunks that failed
    stay and the first error is raised as ``OSError(EIO)``. The caller holds the inode's lock."""
    if not ranges:
        return
    cs = f.chunk_size
    chunks = ranges.by_chunk(cs)
    if lo or hi is not None:
        first, last = lo // cs, (hi - 1) // cs if hi is not None else None
        chunks = {i: p for i, p in chunks.items() if i >= first and (last is None or i <= last)}
    # One write_batch per chain for all its chunks (one request and one commit per replica);
    # several disjoint ranges in one chunk are one multi-range update of it, so every replica
    # handles the chunk once, only the dirty bytes travel, and the bytes between the ranges are
    # not rewritten (another client's writes there survive).
    outcome = await f.write_chunks({idx: [(off - idx * cs, data) for off, data in pieces]
                                    for idx, pieces in chunks.items()})
    first_error = None
    spans: list[list[int]] = []  # written chunks' spans, adjacent ones merged: one discard each
    for idx, pieces in sorted(chunks.items()):
        err = outcome.get(idx)
        if err is not None:
            first_error = first_error or err
            continue
        lo_, hi_ = pieces[0][0], pieces[-1][0] + len(pieces[-1][1])
        if spans and spans[-1][1] == lo_:
            spans[-1][1] = hi_
        else:
            spans.append([lo_, hi_])
    for lo_, hi_ in spans:  # (a discard per chunk of a long run would copy the rest of it each time)
        ranges.discard(lo_, hi_)
    if first_error is not None:
        if isinstance(first_error, asyncio.CancelledError):
            raise first_error
        log.warning("write-back flush of inode %d failed (%d dirty bytes kept): %s", f.inode, ranges.nbytes,
                    first_error)
        raise OSError(errno.EIO, f"write-back flush of inode {f.inode} failed: {first_error}") from first_error
