"""FUSE mount of 3FS (pyfuse3 on asyncio): ``openinfra fs mount MOUNTPOINT``.

The mount process is one more client of the cluster: FUSE inode numbers are 3FS inode ids, and a
request runs as the calling process's uid/gid (one native client per user; the kernel also checks
mode bits, ``default_permissions``). Semantics follow 3FS's FUSE client:

* write-back cache (:mod:`openinfra.fs.clients.writeback`): writes, contiguous or not, stay in
  the mount's memory as dirty ranges per inode (last write wins) and go to the chains as one
  ``write_batch`` per chain (one request and one commit per replica for all its touched chunks).
  They are flushed by ``fsync`` and by ``close`` (FUSE flush/release), when a file holds
  ``writeback_per_file`` dirty bytes or the mount ``writeback_total``, when a contiguous dirty
  run reaches ``write_buffer`` bytes (sequential writes: that run's full chunks go out in the
  background, one run at a time per inode, while the writer goes on; what of it fails comes
  back under newer writes for the next flush to write or report), before a truncate of the file,
  and before a rename or unlink of it. Reads through this mount are served
  from storage data with the dirty bytes laid over it (no flush);
* consistency is 3FS's: this mount reads its own writes at once; other clients see them after
  fsync or close, when the length recorded by meta is exact (3FS: exact length after close). A
  flush that fails keeps the data dirty and fails the fsync/close (EIO) that asked for it; it is
  never dropped silently (only a final release that fails again is logged and dropped);
* sequential read-ahead is the native client's (``AsyncFile``): a write, flush or truncate through
  any handle of an inode drops what every handle of it in this mount fetched ahead;
* attributes and entries are cached by the kernel for ``attr_timeout`` seconds; while a file is
  open for writing here its size is the largest end written, buffered writes included;
* xattrs: read-only ``user.3fs.inode`` and ``user.3fs.layout`` (chunk size, stripe, chains);
  setting xattrs is not supported (the meta service stores none);
* set-user-ID / set-group-ID: the mount asks for ``FUSE_HANDLE_KILLPRIV_V2`` (``fuse_init``; else
  the kernel sends a GETXATTR(security.capability) before every write) and so clears those bits
  itself, as the kernel did: on a write or truncate by a non-root caller (the opener's uid stands
  for the writer's CAP_FSETID, which FUSE does not pass on), on any chown of a regular file, and on
  an open(O_TRUNC) by a non-root caller (which the kernel left undone with atomic O_TRUNC);
  set-group-ID only where group-execute is set;
* ``--ring-socket PATH`` makes the mount process serve ring I/O too (3FS's FUSE daemon serves
  USRBIO): ``RingServer.connect(PATH)``;
* statfs reports 4 KiB blocks and the namespace limits; the cluster exposes no capacity figure yet,
  so the block counts are a fixed 1 PiB.

    openinfra fs mount /mnt/3fs --mgmtd 127.0.0.1:8000      # foreground; Ctrl-C or fusermount3 -u
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat as _stat
import sys
from dataclasses import dataclass
from typing import Any

from openinfra.argtypes import non_negative_float, non_negative_int, positive_int

__all__ = ["mount", "register_mount", "FuseConfig"]

log = logging.getLogger("openinfra.fs.fuse")
_PB = 1 << 50


@dataclass
class FuseConfig:
    """``attr_timeout``/``entry_timeout``: kernel cache lifetimes (s); ``write_buffer``: a contiguous
    dirty run this long (bytes) is written at once; ``writeback_per_file``/``writeback_total``: the
    write-back cache's dirty-byte limits per inode and for the mount (``writeback_total`` 0: every
    write goes to storage before it returns); ``io_retry_s``: how long the native client retries a
    failing storage or meta request (s) before the FUSE call fails with EIO."""

    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    write_buffer: int = 4 << 20
    writeback_per_file: int = 64 << 20
    writeback_total: int = 256 << 20
    io_retry_s: float = 60.0
    allow_other: bool = True
    debug: bool = False
    ring_socket: str | None = None  # also serve ring I/O (USRBIO) on this Unix socket, as 3FS's FUSE daemon does


def _kill_bits(mode: int) -> int:
    """The bits of ``mode`` a write / truncate / chown clears: set-user-ID, and set-group-ID where
    group-execute is set (without it, set-group-ID marks mandatory locking and stays)."""
    bits = mode & _stat.S_ISUID
    if mode & _stat.S_ISGID and mode & _stat.S_IXGRP:
        bits |= _stat.S_ISGID
    return bits


def _ops_class():
    """The Operations subclass (built lazily: importing this module must not need pyfuse3)."""
    import pyfuse3

    from openinfra.fs.client.native import AsyncClient, AsyncFile, FileStat
    from openinfra.fs.clients.common import pread_fast
    from openinfra.fs.clients.writeback import WriteBack, flush_file
    from openinfra.fs.meta.store import User

    def fuse_errors(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except (ValueError, TypeError) as exc:
                log.debug("bad request: %s", exc)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            except Exception:
                log.exception("%s failed", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
        return wrapper

    @dataclass
    class Handle:
        file: AsyncFile
        inode: int
        append: bool = False
        dirty: bool = False  # written through this handle's session since meta last recorded the length
        kill_priv: bool = False  # opened by a non-root user: its writes clear set-user/group-ID bits

    class Ops(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self, mgmtd: list[str], cfg: FuseConfig):
            super().__init__()
            self.mgmtd, self.cfg = mgmtd, cfg
            self.clients: dict[tuple[int, int], AsyncClient] = {}
            self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: "/"}
            self.handles: dict[int, Handle] = {}
            self.writing: dict[int, set[int]] = {}  # inode -> open write handles
            self.open_fhs: dict[int, set[int]] = {}  # inode -> every open handle (read-ahead invalidation)
            self.wb = WriteBack(cfg.writeback_per_file, cfg.writeback_total)
            self._next_fh = 1
            # FUSE_HANDLE_KILLPRIV_V2 granted (fuse_init.negotiate): this mount, not the kernel,
            # clears set-user-ID / set-group-ID on write, truncate and chown.
            self.killpriv = False
            self.privileged: dict[int, int] = {}  # inode -> mode, where it has bits a write clears

        async def client(self, ctx=None) -> AsyncClient:
            key = (ctx.uid, ctx.gid) if ctx is not None else (0, 0)
            c = self.clients.get(key)
            if c is None:
                c = AsyncClient(self.mgmtd, user=User(*key), retry_s=self.cfg.io_retry_s)
                await c.connect()
                self.clients[key] = c
            return c

        async def close(self) -> None:
            for h in list(self.handles.values()):
                try:
                    await self._flush_inode(h.inode, h)
                except Exception:
                    log.exception("unmount: dirty data of inode %d lost", h.inode)
                try:
                    await h.file.close()
                except Exception:
                    pass
            for c in self.clients.values():
                await c.close()

        # --- helpers ---------------------------------------------------------------------------

        def _path(self, inode: int) -> str:
            p = self.paths.get(inode)
            if p is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return p

        def _child(self, parent: int, name: bytes) -> str:
            n = os.fsdecode(name)
            return self._path(parent).rstrip("/") + "/" + n

        def _attrs(self, st: FileStat) -> "pyfuse3.EntryAttributes":
            a = pyfuse3.EntryAttributes()
            a.st_ino = st.inode
            a.generation = 0
            a.entry_timeout, a.attr_timeout = self.cfg.entry_timeout, self.cfg.attr_timeout
            a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.mode, st.nlink, st.uid, st.gid
            if st.mode & 0o6000 and _kill_bits(st.mode) and _stat.S_ISREG(st.mode):
                self.privileged[st.inode] = st.mode
            elif self.privileged:
                self.privileged.pop(st.inode, None)
            size = st.size
            for fh in self.writing.get(st.inode, ()):  # our own unflushed/unreported writes
                h = self.handles.get(fh)
                if h is not None:
                    size = max(size, h.file.length)
            size = max(size, self.wb.end(st.inode))  # writes still in the write-back cache
            if st.type == "symlink":
                size = len(os.fsencode(st.target or ""))
            a.st_size = size
            a.st_blksize = 1 << 16
            a.st_blocks = (size + 511) // 512
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = (int(t * 1e9) for t in (st.atime, st.mtime, st.ctime))
            return a

        async def _stat(self, inode: int, ctx=None) -> FileStat:
            c = await self.client(ctx)
            try:
                st = await c.stat(self._path(inode), follow_symlinks=False)
                if st.inode == inode:
                    return st
            except FileNotFoundError:
                pass
            # The path moved or was unlinked (an open, deleted file): ask by inode.
            return FileStat.from_inode(await c._meta("stat_inode", {"inode": inode}))

        async def _entry(self, path: str, ctx) -> "pyfuse3.EntryAttributes":
            st = await (await self.client(ctx)).stat(path, follow_symlinks=False)
            self.paths[st.inode] = path
            return self._attrs(st)

        def _drop_readahead(self, inode: int) -> None:
            """Forget the bytes every handle of ``inode`` fetched ahead (a write, flush or truncate
            through any handle of this mount: a later read must see the new bytes)."""
            for fh in self.open_fhs.get(inode, ()):
                h = self.handles.get(fh)
                if h is not None:
                    h.file.drop_readahead()

        async def _kill_privs(self, inode: int) -> None:
            """Clear ``inode``'s set-user-ID bit, and set-group-ID where group-execute is set (what the
            kernel does on a write, truncate or open(O_TRUNC) by a caller without CAP_FSETID and on
            any chown of a non-directory; with FUSE_HANDLE_KILLPRIV_V2 it is ours to do). As the
            mount (root): the caller need not own the file. Fresh mode from meta, not the cache.
            Meta changes modes by path only: an inode no longer at its path (unlinked or moved by
            another client) keeps its bits."""
            c, path = await self.client(), self._path(inode)
            try:
                st = await c.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or st.inode != inode or not _stat.S_ISREG(st.mode):
                self.privileged.pop(inode, None)
                return
            new = _stat.S_IMODE(st.mode) & ~_kill_bits(st.mode)
            if new != _stat.S_IMODE(st.mode):
                await c.chmod(path, new)
                try:  # the kernel's cached mode is stale now (attributes only: no page lock taken)
                    pyfuse3.invalidate_inode(inode, attr_only=True)
                except OSError:
                    pass
            self.privileged.pop(inode, None)

        async def _read_storage(self, h: Handle, size: int, off: int) -> bytes:
            """Stored bytes (read-ahead for a handle reading sequentially; the fast path otherwise)."""
            f = h.file
            if f._ra_ahead and not f.closed and f._ra_continues(off):
                return await f.pread(size, off)
            if f._ra_ahead:
                f._ra_pos = off + size  # a random read: the next one continuing it is sequential
            return await pread_fast(f, size, off)

        def _writer(self, inode: int, prefer: Handle | None = None) -> Handle | None:
            """An open handle of ``inode`` that can write (``prefer`` if it can)."""
            if prefer is not None and prefer.file.writable and not prefer.file.closed:
                return prefer
            for fh in self.writing.get(inode, ()):
                h = self.handles.get(fh)
                if h is not None and not h.file.closed:
                    return h
            return None

        async def _flush_locked(self, inode: int, prefer: Handle | None = None, lo: int = 0,
                                hi: int | None = None) -> None:
            """Write ``inode``'s dirty bytes in ``[lo, hi)`` to storage; the caller holds its lock."""
            d = self.wb.files.get(inode)
            if d is not None:  # in order, and its failed chunks are back in the ranges before we look
                await d.settle()
            ranges = self.wb.peek(inode)
            if ranges is None:
                return
            w = self._writer(inode, prefer)
            if w is None:  # cannot happen while the cache is flushed before the last release
                raise OSError(errno.EIO, f"inode {inode}: dirty data but no open writer")
            w.dirty = True  # even a failed flush may have written some chunks: sync the length later
            self._drop_readahead(inode)
            try:
                await flush_file(w.file, ranges, lo, hi)
            finally:
                self._drop_readahead(inode)  # what was fetched during the flush may be older
            for fh in self.writing.get(inode, ()):  # the writers' view of the length, for reads
                o = self.handles.get(fh)
                if o is not None:
                    o.file.length = max(o.file.length, w.file.length)

        def _flush_behind(self, inode: int, d, prefer: Handle, lo: int, hi: int) -> None:
            """Start writing the dirty bytes of ``[lo, hi)`` (a sequential run) in the background
            (the caller holds the inode's lock and has settled the previous one): the writer goes
            on filling the cache while the chunks go down their chains. The bytes leave the
            ranges now; a chunk that fails comes back under any newer writes, so the next flush
            (fsync, close, ...) writes it again or reports the error."""
            import asyncio

            w = self._writer(inode, prefer)
            if w is None:
                raise OSError(errno.EIO, f"inode {inode}: dirty data but no open writer")
            sub = d.ranges.take(lo, hi)
            if not sub:
                return
            w.dirty = True
            self._drop_readahead(inode)

            async def run() -> None:
                try:
                    await flush_file(w.file, sub)
                except Exception as exc:  # noqa: BLE001 - kept dirty (below); flush_file logged it
                    log.debug("background flush of inode %d: %s", inode, exc)
                finally:
                    for off, b in sub.ranges():  # what did not get written
                        d.ranges.add_under(off, b)
                    d.inflight = None
                    self._drop_readahead(inode)  # what was fetched during the flush may be older
                    for fh in self.writing.get(inode, ()):
                        o = self.handles.get(fh)
                        if o is not None:
                            o.file.length = max(o.file.length, w.file.length)

            d.span = (lo, hi)
            d.inflight = asyncio.ensure_future(run())

        async def _flush_inode(self, inode: int, prefer: Handle | None = None) -> None:
            """Write all of ``inode``'s dirty bytes to storage (raises OSError(EIO) on failure)."""
            d = self.wb.files.get(inode)
            if d is None:
                return
            async with d.lock:
                await self._flush_locked(inode, prefer)
            self.wb.drop(inode)

        async def _flush_path(self, path: str) -> None:
            """Flush the dirty inodes at ``path`` or under it and record their lengths (before a
            rename or unlink: what was written before it is then visible at the new name)."""
            prefix = path.rstrip("/") + "/"
            for ino in list(self.wb.files):
                p = self.paths.get(ino)
                if p is not None and (p == path or p.startswith(prefix)):
                    await self._flush_inode(ino)
                    await self._sync_writers(ino)

        async def _drop_dirty(self, inode: int | None) -> None:
            """Forget ``inode``'s buffered writes (an O_TRUNC open: they precede the truncate)."""
            d = self.wb.files.get(inode) if inode is not None else None
            if d is not None:
                await d.settle()  # a background flush must not land after the truncate
                d.ranges.discard(0, d.ranges.end)

        def _lookup_inode(self, path: str) -> int | None:
            """The inode this mount knows at ``path``, if any (no RPC)."""
            for ino, p in self.paths.items():
                if p == path and ino in self.wb.files:
                    return ino
            return None

        async def _sync_writers(self, inode: int) -> None:
            """Make meta's length exact for every handle of ``inode`` that wrote since its last sync."""
            for fh in list(self.writing.get(inode, ())):
                o = self.handles.get(fh)
                if o is not None and o.dirty and not o.file.closed:
                    await o.file.fsync()
                    o.dirty = False

        # --- namespace -------------------------------------------------------------------------

        @fuse_errors
        async def lookup(self, parent_inode, name, ctx=None):
            if name == b".":
                return await self.getattr(parent_inode, ctx)
            if name == b"..":
                parent = self._path(parent_inode).rsplit("/", 1)[0] or "/"
                return await self._entry(parent, ctx)
            return await self._entry(self._child(parent_inode, name), ctx)

        @fuse_errors
        async def getattr(self, inode, ctx=None):
            return self._attrs(await self._stat(inode, ctx))

        @fuse_errors
        async def setattr(self, inode, attr, fields, fh, ctx):
            c = await self.client(ctx)
            path = self._path(inode)
            if fields.update_size:
                self._drop_readahead(inode)
                h = self.handles.get(fh) if fh is not None else None
                d = self.wb.files.get(inode)
                if d is not None:  # bytes past the new size need not be written; the rest must be first
                    async with d.lock:
                        await d.settle()  # (what of it fails comes back before the cut below)
                        d.ranges.discard(attr.st_size, max(attr.st_size, d.ranges.end))
                        await self._flush_locked(inode, h)
                    self.wb.drop(inode)
                if h is not None and h.file.writable:
                    await h.file.truncate(attr.st_size)
                else:
                    await c.truncate(path, attr.st_size)
                for other in self.writing.get(inode, ()):  # keep our open writers' view in step
                    self.handles[other].file.length = attr.st_size
                self._drop_readahead(inode)
            if fields.update_mode:
                await c.chmod(path, _stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                await c.chown(path, attr.st_uid if fields.update_uid else None,
                              attr.st_gid if fields.update_gid else None)
            if fields.update_atime or fields.update_mtime:
                await c.utime(path, attr.st_atime_ns / 1e9 if fields.update_atime else None,
                              attr.st_mtime_ns / 1e9 if fields.update_mtime else None)
            if self.killpriv and inode in self.privileged and not fields.update_mode and (
                    fields.update_uid or fields.update_gid or (fields.update_size and ctx.uid != 0)):
                await self._kill_privs(inode)  # chown: always; truncate: callers without CAP_FSETID
            return self._attrs(await self._stat(inode, ctx))

        @fuse_errors
        async def readlink(self, inode, ctx):
            return os.fsencode(await (await self.client(ctx)).readlink(self._path(inode)))

        @fuse_errors
        async def mkdir(self, parent_inode, name, mode, ctx):
            path = self._child(parent_inode, name)
            st = await (await self.client(ctx)).mkdir(path, mode=_stat.S_IMODE(mode))
            self.paths[st.inode] = path
            return self._attrs(st)

        @fuse_errors
        async def symlink(self, parent_inode, name, target, ctx):
            path = self._child(parent_inode, name)
            st = await (await self.client(ctx)).symlink(path, os.fsdecode(target))
            self.paths[st.inode] = path
            return self._attrs(st)

        @fuse_errors
        async def link(self, inode, new_parent_inode, new_name, ctx):
            path = self._child(new_parent_inode, new_name)
            st = await (await self.client(ctx)).link(self._path(inode), path)
            return self._attrs(st)

        async def _remove(self, parent_inode, name, ctx, want_dir: bool):
            path = self._child(parent_inode, name)
            c = await self.client(ctx)
            await self._flush_path(path)  # 3FS semantics: what was written before the unlink is on storage
            st = await c.stat(path, follow_symlinks=False)
            if want_dir and not st.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if not want_dir and st.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            await c.remove(path)

        @fuse_errors
        async def unlink(self, parent_inode, name, ctx):
            await self._remove(parent_inode, name, ctx, want_dir=False)

        @fuse_errors
        async def rmdir(self, parent_inode, name, ctx):
            await self._remove(parent_inode, name, ctx, want_dir=True)

        @fuse_errors
        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise pyfuse3.FUSEError(errno.EINVAL)  # no atomic exchange in the meta service
            src, dst = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
            c = await self.client(ctx)
            if flags & pyfuse3.RENAME_NOREPLACE and await c.exists(dst):
                raise pyfuse3.FUSEError(errno.EEXIST)
            await self._flush_path(src)
            await self._flush_path(dst)  # a replaced file's dirty data goes where its writes went
            await c.rename(src, dst)
            prefix = src.rstrip("/") + "/"
            for ino, p in list(self.paths.items()):  # the moved entry and everything under it
                if p == src:
                    self.paths[ino] = dst
                elif p.startswith(prefix):
                    self.paths[ino] = dst.rstrip("/") + "/" + p[len(prefix):]

        @fuse_errors
        async def opendir(self, inode, ctx):
            st = await self._stat(inode, ctx)
            if not st.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        @fuse_errors
        async def readdir(self, fh, start_id, token):
            path = self._path(fh)
            entries = await (await self.client()).listdir(path, detail=True)
            base = path.rstrip("/")
            for i, (name, st) in enumerate(entries[start_id:], start_id):
                self.paths.setdefault(st.inode, f"{base}/{name}")
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(st), i + 1):
                    break

        @fuse_errors
        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = _PB // 4096
            s.f_files = s.f_ffree = s.f_favail = 1 << 40
            s.f_namemax = 255
            return s

        # --- xattrs (read-only layout information) --------------------------------------------

        @fuse_errors
        async def getxattr(self, inode, name, ctx):
            if name not in (b"user.3fs.inode", b"user.3fs.layout"):
                # Without a meta round trip: the kernel asks for security.capability before every
                # write (to drop file capabilities), which cost one stat RPC per 4 KiB write.
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            st = await self._stat(inode, ctx)
            if name == b"user.3fs.inode":
                return str(st.inode).encode()
            if name == b"user.3fs.layout" and st.layout:
                lay = {k: st.layout[k] for k in ("chunk_size", "stripe", "chains", "table") if k in st.layout}
                return json.dumps(lay).encode()
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

        @fuse_errors
        async def listxattr(self, inode, ctx):
            st = await self._stat(inode, ctx)
            return [b"user.3fs.inode"] + ([b"user.3fs.layout"] if st.layout else [])

        async def setxattr(self, inode, name, value, ctx):
            raise pyfuse3.FUSEError(errno.ENOTSUP)

        async def removexattr(self, inode, name, ctx):
            raise pyfuse3.FUSEError(errno.ENOTSUP)

        # --- files -----------------------------------------------------------------------------

        def _new_handle(self, f: AsyncFile, flags: int = 0, ctx=None) -> "pyfuse3.FileInfo":
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(f, f.inode, append=bool(flags & os.O_APPEND),
                                      kill_priv=ctx is not None and ctx.uid != 0)
            self.open_fhs.setdefault(f.inode, set()).add(fh)
            if f.writable:
                self.writing.setdefault(f.inode, set()).add(fh)
            fi = pyfuse3.FileInfo(fh=fh)
            fi.keep_cache = False  # other clients may have changed the file: drop stale pages
            return fi

        @fuse_errors
        async def open(self, inode, flags, ctx):
            acc = flags & os.O_ACCMODE
            mode = "rb" if acc == os.O_RDONLY else "r+b"
            f = await (await self.client(ctx)).open(self._path(inode), mode)
            if flags & os.O_TRUNC and acc != os.O_RDONLY:
                self._drop_readahead(inode)
                await self._drop_dirty(inode)  # other handles' buffered writes must not come back after it
                if f.length or self.writing.get(inode):
                    await f.truncate(0)
                if ctx.uid != 0 and inode in self.privileged:
                    await self._kill_privs(inode)  # as do_truncate does for callers without CAP_FSETID
            return self._new_handle(f, flags, ctx)

        @fuse_errors
        async def create(self, parent_inode, name, mode, flags, ctx):
            path = self._child(parent_inode, name)
            c = await self.client(ctx)
            perm = _stat.S_IMODE(mode)
            existed = False
            try:
                f = await c.open(path, "xb", perm=perm)
            except FileExistsError:
                existed = True
                if flags & os.O_EXCL:
                    raise
                if flags & os.O_TRUNC:
                    await self._drop_dirty(self._lookup_inode(path))
                f = await c.open(path, "w+b" if flags & os.O_TRUNC else "r+b", perm=perm)
                if flags & os.O_TRUNC:
                    self._drop_readahead(f.inode)
            self.paths[f.inode] = path
            st = FileStat.from_inode(f.node)
            if existed and flags & os.O_TRUNC and ctx.uid != 0 and _kill_bits(st.mode):
                await self._kill_privs(f.inode)  # an existing file truncated: as open(O_TRUNC)
                st = await self._stat(f.inode)
            fi = self._new_handle(f, flags, ctx)
            return fi, self._attrs(st)

        @fuse_errors
        async def read(self, fh, off, size):
            h = self.handles[fh]
            d = self.wb.files.get(h.inode)
            if d is not None and d.inflight is not None and d.span[0] < off + size and off < d.span[1]:
                await d.settle()  # its bytes are in neither the ranges nor (surely) storage yet
            if d is None or not d.ranges or d.ranges.end <= off:
                return await self._read_storage(h, size, off)
            # Read-your-writes: storage data with this mount's dirty bytes laid over it.
            async with d.lock:
                r = d.ranges
                for o in self.writing.get(h.inode, ()):  # flushed writes grew the file for every handle
                    oh = self.handles.get(o)
                    if oh is not None:
                        h.file.length = max(h.file.length, oh.file.length)
                end = min(off + size, max(h.file.length, r.end))
                if end <= off:
                    return b""
                data = await self._read_storage(h, end - off, off) if off < h.file.length else b""
                if not r.overlaps(off, end - off) and len(data) == end - off:
                    return data
                buf = bytearray(data)
                if len(buf) < end - off:  # past the stored length, before the dirty end: zeros
                    buf += bytes(end - off - len(buf))
                r.overlay(buf, off)
                return bytes(buf)

        @fuse_errors
        async def write(self, fh, off, buf):
            h = self.handles[fh]
            if self.privileged and h.kill_priv and self.killpriv and h.inode in self.privileged:
                await self._kill_privs(h.inode)  # the kernel left it to us (FUSE_HANDLE_KILLPRIV_V2)
            self._drop_readahead(h.inode)
            if not self.wb.enabled:  # write-through
                if h.append:
                    off = h.file.length
                await h.file.pwrite(bytes(buf), off)
                self._drop_readahead(h.inode)  # what other handles fetched during the write may be older
                h.dirty = True
                return len(buf)
            d = self.wb.get(h.inode)
            async with d.lock:
                if h.append:  # O_APPEND: the end as this mount knows it, not the kernel's cached size
                    off = max(h.file.length, self.wb.end(h.inode))  # (a background flush included)
                lo, hi = d.ranges.add(off, buf)
                if d.ranges.nbytes >= self.wb.per_file:
                    await self._flush_locked(h.inode, h)
                elif hi - lo >= self.cfg.write_buffer:
                    # A long contiguous run (sequential writes): send its full chunks now, in one
                    # parallel burst, as the contiguous write buffer did; a partial last chunk waits.
                    # The burst goes in the background (one at a time per inode), so the next
                    # write_buffer of data arrives while it is written.
                    cs = h.file.chunk_size
                    top = hi - hi % cs if hi - hi % cs > lo else hi
                    await d.settle()
                    self._flush_behind(h.inode, d, h, lo, top)
            if self.wb.nbytes > self.wb.total:  # the mount's limit: flush the biggest files first
                for ino in self.wb.largest():
                    await self._flush_inode(ino, h if ino == h.inode else None)
                    if self.wb.nbytes <= self.wb.total:
                        break
            return len(buf)

        @fuse_errors
        async def flush(self, fh):
            h = self.handles.get(fh)
            if h is not None and h.file.writable:
                await self._flush_inode(h.inode, h)
                # close(2) waits for flush but not for release: make the length exact now, so
                # every client sees it as soon as close returns (3FS: exact length after close).
                await self._sync_writers(h.inode)

        @fuse_errors
        async def fsync(self, fh, datasync):
            h = self.handles[fh]
            await self._flush_inode(h.inode, h)
            if h.file.writable:
                h.dirty = True  # fsync always records the length, even with nothing new to write
            await self._sync_writers(h.inode)

        @fuse_errors
        async def release(self, fh):
            h = self.handles.get(fh)
            if h is None:
                return
            try:
                if h.file.writable:
                    try:
                        await self._flush_inode(h.inode, h)
                    except OSError:
                        lost = self.wb.peek(h.inode)
                        if lost is not None and len(self.writing.get(h.inode, ())) <= 1:
                            # The last writer is going: nothing can flush the data later. close(2)
                            # already got this error from flush; release's own reply goes nowhere.
                            log.error("release of inode %d: %d dirty bytes could not be written and are "
                                      "dropped", h.inode, lost.nbytes)
                            self.wb.files.pop(h.inode, None)
                        raise
            finally:
                try:
                    await h.file.close()  # ends the write session: the length becomes exact
                finally:
                    # Only now: until meta has the exact length, getattr adds what we wrote.
                    self.handles.pop(fh, None)
                    fhs = self.open_fhs.get(h.inode)
                    if fhs is not None:
                        fhs.discard(fh)
                        if not fhs:
                            del self.open_fhs[h.inode]
                    ws = self.writing.get(h.inode)
                    if ws is not None:
                        ws.discard(fh)
                        if not ws:
                            del self.writing[h.inode]

        async def releasedir(self, fh):
            return None

        async def forget(self, inode_list):
            return None  # paths are kept (one string per inode seen) so later lookups by inode work

    return Ops


def mount(mountpoint: str, mgmtd: str | list[str] | None = None, cfg: FuseConfig | None = None) -> None:
    """Mount the cluster at ``mountpoint`` and serve until unmounted (``fusermount3 -u``) or SIGINT/SIGTERM."""
    import asyncio
    import signal

    import pyfuse3
    import pyfuse3.asyncio

    from openinfra.fs.clients.common import resolve_mgmtd

    cfg = cfg or FuseConfig()
    addrs = resolve_mgmtd(mgmtd)
    if not os.path.isdir(mountpoint):
        raise ValueError(f"mountpoint: {mountpoint} is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise RuntimeError("/dev/fuse is missing: FUSE is not available here (install fuse3, load the fuse module)")
    pyfuse3.asyncio.enable()
    if os.environ.get("OI_KEEP_HEAP", "1") == "1":
        # The write-back cache allocates and frees MiBs per sequential run; with glibc's defaults
        # the freed heap top goes back to the kernel and the next run faults every page in again.
        from openinfra.fs.server import keep_heap

        keep_heap()
    ops = _ops_class()(addrs, cfg)
    options = set(pyfuse3.default_options) | {"fsname=3fs", "subtype=openinfra"}
    if cfg.allow_other:
        options.add("allow_other")
    if cfg.debug:
        options.add("debug")

    async def main():
        await ops.client()  # connect before the mount appears: fail early on a bad address
        ring = None
        if cfg.ring_socket:
            from openinfra.fs.clients.usrbio import serve

            ring = asyncio.ensure_future(serve(addrs, cfg.ring_socket))
        pyfuse3.init(ops, mountpoint, options)
        from openinfra.fs.clients.fuse_init import negotiate

        ops.killpriv = negotiate()  # no GETXATTR(security.capability) per write; see fuse_init
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, pyfuse3.terminate)
        try:
            await pyfuse3.main()
        finally:
            if ring is not None:
                ring.cancel()
                try:
                    await ring
                except (asyncio.CancelledError, Exception):
                    pass
            await ops.close()

    try:
        if os.environ.get("OI_FUSE_UVLOOP", "1") == "1":
            # uvloop: a FUSE request is a reader added and removed on /dev/fuse, a future, a few
            # callbacks and a lock; the stdlib loop's Python for that was ~half the mount's CPU
            # per 4 KiB write
            from openinfra.fs.rpc import run_loop

            run_loop(main())
        else:
            asyncio.run(main())
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            pass


def _mount_cmd(args) -> int:
    mgmtd = args.mgmtd
    if not mgmtd and args.data_dir:
        from openinfra.fs.cluster import LocalCluster

        mgmtd = LocalCluster.attach(args.data_dir).mgmtd_addresses
    cfg = FuseConfig(attr_timeout=args.attr_timeout, entry_timeout=args.attr_timeout,
                     write_buffer=args.write_buffer, writeback_per_file=args.writeback_per_file,
                     writeback_total=args.writeback_total, io_retry_s=args.io_retry,
                     debug=args.debug, ring_socket=args.ring_socket)
    try:
        mount(args.mountpoint, mgmtd, cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"openinfra fs mount: {exc}", file=sys.stderr)
        return 2
    return 0


def register_mount(subparsers: Any) -> Any:
    """Add ``mount`` to the ``openinfra fs`` subcommands (``subparsers`` of the fs parser)."""
    p = subparsers.add_parser("mount", help="mount the cluster with FUSE (foreground; unmount: fusermount3 -u DIR)",
                              description="Mount a 3FS cluster at MOUNTPOINT with FUSE (pyfuse3). Runs in the "
                                          "foreground until unmounted or interrupted.")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument("--mgmtd", help="mgmtd address(es) host:port[,host:port] (default: --data-dir's cluster, "
                                   "$OPENINFRA_FS_MGMTD, $OPENINFRA_FS_DATA_DIR)")
    p.add_argument("--data-dir", help="the directory of a cluster started by `openinfra fs start`")
    p.add_argument("--attr-timeout", type=non_negative_float, default=1.0, help="kernel attribute/entry cache lifetime, s (1.0)")
    p.add_argument("--write-buffer", type=positive_int, default=4 << 20,
                   help="a contiguous dirty run this long is written at once, bytes (4 MiB)")
    p.add_argument("--writeback-per-file", type=non_negative_int, default=64 << 20,
                   help="write-back cache: dirty bytes per file before it is flushed (64 MiB)")
    p.add_argument("--writeback-total", type=non_negative_int, default=256 << 20,
                   help="write-back cache: dirty bytes of the mount before the largest files are flushed "
                        "(256 MiB; 0 turns the cache off: every write reaches storage before it returns)")
    p.add_argument("--io-retry", type=non_negative_float, default=60.0,
                   help="how long a failing storage/meta request is retried before the call fails with EIO, s (60)")
    p.add_argument("--ring-socket", default=None, help="also serve ring I/O (USRBIO) on this Unix socket; "
                                                       "clients attach with RingServer.connect(path)")
    p.add_argument("--debug", action="store_true", help="FUSE debug output")
    p.set_defaults(func=_mount_cmd)
    return p


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m openinfra.fs.clients.fuse")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register_mount(sub)
    args = parser.parse_args(["mount", *argv])
    logging.basicConfig(level=logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
