"""fsspec filesystem for 3FS: ``3fs://host:port/path`` URLs for pandas, pyarrow, DuckDB, smallpond.

Registered as the ``3fs`` protocol (the ``fsspec.specs`` entry point); ``threefs://`` is the same
filesystem (pandas hands only letter-led URL schemes to fsspec)::

    import pandas as pd
    import openinfra.fs.clients.fsspec                          # registers "threefs"
    df.to_parquet("threefs://127.0.0.1:8000/tables/t.parquet")  # host:port = any mgmtd of the cluster
    pd.read_parquet("threefs://127.0.0.1:8000/tables/t.parquet")

    import fsspec, duckdb, pyarrow.dataset as ds
    fs = fsspec.filesystem("3fs", mgmtd="127.0.0.1:8000")
    ds.dataset("/tables", filesystem=fs, format="parquet")
    con = duckdb.connect(); con.register_filesystem(fs)
    con.sql("SELECT count(*) FROM '3fs://127.0.0.1:8000/tables/*.parquet'")

Where the cluster is: the URL's ``host:port[,host:port]``, else ``mgmtd=``, else ``data_dir=``
of a cluster started by ``openinfra fs start``, else ``$OPENINFRA_FS_MGMTD``, else
``$OPENINFRA_FS_DATA_DIR``. A URL's first component counts as the cluster address only when it
looks like one (``host:port`` with a numeric port): ``3fs:///a/b`` and ``3fs://a/b`` both mean
``/a/b``. One instance talks to one cluster. Paths inside the filesystem are absolute (``/a/b``).
Files are buffered: reads fetch ``block_size`` ranges (read-ahead), writes go to 3FS one block
at a time and the length is exact once the file is closed. ``auto_mkdir=True`` (default) creates
missing parent directories on write, as object stores behave (pyarrow, DuckDB and smallpond
write into fresh directories).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from openinfra.fs.client.native import File, FileStat
from openinfra.fs.clients.common import ClientHandle, resolve_mgmtd
from openinfra.fs.meta.store import User

__all__ = ["ThreeFSFileSystem", "ThreeFSFile"]

PROTOCOL = "3fs"
ALIAS = "threefs"
_ADDRESS = re.compile(r"^[^/,:\s]+:\d{1,5}(,[^/,:\s]+:\d{1,5})*$")


def _split_url(path: str) -> tuple[str | None, str]:
    """``"3fs://h:1/a/b"`` -> ``("h:1", "/a/b")``; ``"3fs:///a"``, ``"3fs://a"``, ``"a"`` -> ``(None, "/a")``."""
    if not isinstance(path, str):
        raise TypeError(f"path: expected a str, got {type(path).__name__}")
    netloc = None
    for prefix in (PROTOCOL + "://", ALIAS + "://"):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            head, sep, tail = rest.partition("/")
            if _ADDRESS.match(head):
                netloc, rest = head, sep + tail
            path = rest
            break
    path = "/" + path.lstrip("/")
    return netloc, (path.rstrip("/") or "/")


class ThreeFSFileSystem(AbstractFileSystem):
    """fsspec ``AbstractFileSystem`` over the native 3FS client.

    ``mgmtd``: ``"host:port"`` (several comma separated, or a list) of the cluster's mgmtd;
    ``data_dir``: a cluster directory of ``openinfra fs start`` instead. ``uid``/``gid``: who the
    requests run as (default root). ``block_size``: read-ahead / write buffer in bytes (4 MiB).
    """

    protocol = (PROTOCOL, ALIAS)
    root_marker = "/"
    cachable = True

    def __init__(self, mgmtd: str | list[str] | None = None, data_dir: str | None = None, *, uid: int = 0,
                 gid: int = 0, block_size: int = 4 << 20, retry_s: float = 60.0, auto_mkdir: bool = True,
                 **kwargs: Any):
        super().__init__(mgmtd=mgmtd, data_dir=data_dir, uid=uid, gid=gid, block_size=block_size,
                         retry_s=retry_s, auto_mkdir=auto_mkdir, **kwargs)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1 (bytes), got {block_size!r}")
        if mgmtd is None and data_dir is not None:
            from openinfra.fs.cluster import LocalCluster

            mgmtd = LocalCluster.attach(data_dir).mgmtd_addresses
        self.mgmtd = resolve_mgmtd(mgmtd)
        self.block_size, self.auto_mkdir = block_size, auto_mkdir
        self._handle = ClientHandle(self.mgmtd, User(uid, gid), retry_s=retry_s)

    # --- URLs ----------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        return _split_url(str(path))[1]

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict:
        netloc, _ = _split_url(path)
        return {"mgmtd": netloc} if netloc else {}

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{','.join(self.mgmtd)}{self._strip_protocol(name)}"

    @property
    def client(self):
        """The native :class:`~openinfra.fs.Client` (connected on first use, again after fork)."""
        return self._handle.get()

    # --- metadata ------------------------------------------------------------------------------

    @staticmethod
    def _info(path: str, st: FileStat) -> dict:
        kind = {"dir": "directory", "file": "file"}.get(st.type, "other")
        info = {"name": path, "size": st.size if st.is_file else 0, "type": kind, "mode": st.mode,
                "uid": st.uid, "gid": st.gid, "nlink": st.nlink, "mtime": st.mtime, "created": st.ctime,
                "ino": st.inode, "islink": st.type == "symlink"}
        if st.target is not None:
            info["destination"] = st.target
        return info

    def info(self, path: str, **kwargs) -> dict:
        path = self._strip_protocol(path)
        return self._info(path, self.client.stat(path))

    def ls(self, path: str, detail: bool = True, **kwargs) -> list:
        path = self._strip_protocol(path)
        st = self.client.stat(path)
        if not st.is_dir:
            return [self._info(path, st)] if detail else [path]
        base = path.rstrip("/")
        entries = self.client.listdir(path, detail=True)
        if detail:
            return [self._info(f"{base}/{name}", s) for name, s in entries]
        return [f"{base}/{name}" for name, _ in entries]

    def exists(self, path: str, **kwargs) -> bool:
        return self.client.exists(self._strip_protocol(path))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs) -> None:
        self.client.mkdir(self._strip_protocol(path), mode=kwargs.get("mode", 0o755), parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.client.mkdir(self._strip_protocol(path), parents=True, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        path = self._strip_protocol(path)
        if not self.client.stat(path, follow_symlinks=False).is_dir:
            raise NotADirectoryError(f"{path} is not a directory")
        self.client.remove(path)

    def _rm(self, path: str) -> None:
        self.client.remove(self._strip_protocol(path))

    rm_file = _rm

    def rm(self, path, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Remove files; ``recursive=True`` removes directory trees with the batched tree delete."""
        from openinfra.fs.clients.tree import remove_tree

        for p in ([path] if isinstance(path, str) else list(path)):
            if any(c in p for c in "*?["):
                for q in sorted(self.expand_path(p, recursive=recursive, maxdepth=maxdepth), reverse=True):
                    if self.exists(q):
                        self.rm(q, recursive=recursive)
                continue
            p = self._strip_protocol(p)
            st = self.client.stat(p, follow_symlinks=False)
            if not st.is_dir:
                self.client.remove(p)
            elif not recursive:
                raise IsADirectoryError(f"{p} is a directory; pass recursive=True")
            elif maxdepth is None:
                remove_tree(self.client, p)
            else:
                super().rm(p, recursive=True, maxdepth=maxdepth)

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs) -> None:
        """Rename (one metadata transaction; a directory moves with everything under it)."""
        p1, p2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.isdir(p2) and not self.isdir(p1):
            p2 = p2.rstrip("/") + "/" + p1.rsplit("/", 1)[-1]
        elif self.auto_mkdir:
            self.makedirs(self._parent(p2), exist_ok=True)
        self.client.rename(p1, p2)

    def cp_file(self, path1: str, path2: str, **kwargs) -> None:
        p1, p2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.auto_mkdir:
            self.makedirs(self._parent(p2), exist_ok=True)
        with self.client.open(p1, "rb") as src, self.client.open(p2, "wb") as dst:
            off = 0
            while data := src.pread(self.block_size, off):
                dst.pwrite(data, off)
                off += len(data)

    def created(self, path: str):
        import datetime

        return datetime.datetime.fromtimestamp(self.info(path)["created"], datetime.timezone.utc)

    def modified(self, path: str):
        import datetime

        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], datetime.timezone.utc)

    def chmod(self, path: str, mode: int) -> None:
        self.client.chmod(self._strip_protocol(path), mode)

    def symlink(self, target: str, path: str) -> None:
        self.client.symlink(self._strip_protocol(path), target)

    def islink(self, path: str) -> bool:
        try:
            return self.client.stat(self._strip_protocol(path), follow_symlinks=False).type == "symlink"
        except FileNotFoundError:
            return False

    def touch(self, path: str, truncate: bool = True, **kwargs) -> None:
        path = self._strip_protocol(path)
        if truncate or not self.client.exists(path):
            if self.auto_mkdir:
                self.makedirs(self._parent(path), exist_ok=True)
            self.client.open(path, "wb").close()
        else:
            self.client.utime(path, mtime=time.time())

    # --- data ----------------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs) -> bytes:
        path = self._strip_protocol(path)
        with self.client.open(path, "rb") as f:
            size = f.length
            s = 0 if start is None else (start + size if start < 0 else start)
            e = size if end is None else (end + size if end < 0 else end)
            s, e = max(0, min(s, size)), max(0, min(e, size))
            return f.pread(e - s, s) if e > s else b""

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs) -> None:
        path = self._strip_protocol(path)
        if self.auto_mkdir:
            self.makedirs(self._parent(path), exist_ok=True)
        with self.client.open(path, "xb" if mode == "create" else "wb") as f:
            f.pwrite(bytes(value), 0)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict | None = None, **kwargs) -> "ThreeFSFile":
        if not autocommit:
            raise NotImplementedError("3FS files are written in place; autocommit=False is not supported")
        path = self._strip_protocol(path)
        if mode != "rb" and self.auto_mkdir:
            self.makedirs(self._parent(path), exist_ok=True)
        return ThreeFSFile(self, path, mode, block_size=block_size or self.block_size,
                           cache_options=cache_options, **kwargs)

    def __reduce__(self):
        # Re-create from the constructor arguments: no sockets or threads cross processes.
        return _rebuild, (self.storage_args, self.storage_options)


def _rebuild(args, kwargs):
    return ThreeFSFileSystem(*args, **kwargs)


class ThreeFSFile(AbstractBufferedFile):
    """A buffered file on 3FS (``rb``, ``wb``, ``ab``, ``xb``)."""

    def __init__(self, fs: ThreeFSFileSystem, path: str, mode: str = "rb", **kwargs):
        self._native: File | None = None
        self.closed = True  # until opened: a failed open leaves nothing for __del__ to flush
        if mode not in ("rb", "wb", "ab", "xb"):
            raise ValueError(f"mode: expected 'rb', 'wb', 'ab' or 'xb', got {mode!r}")
        path = fs._strip_protocol(path)
        if mode == "rb":
            self._native = fs.client.open(path, "rb")
            kwargs.setdefault("size", self._native.length)
        else:
            # Open (and create) now, so errors such as a missing parent surface at open().
            self._native = fs.client.open(path, mode)
        super().__init__(fs, path, mode, **kwargs)
        self._base = self._native.length if mode == "ab" else 0
        if mode == "ab":
            self.loc = self._base

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._native.pread(max(0, end - start), start)

    def _initiate_upload(self) -> None:
        pass  # the native file was opened in __init__

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()
        if data:
            self._native.pwrite(data, self._base + self.offset)
        if final:
            self._native.close()  # the length is exact once the write session ends
        return True

    def close(self) -> None:
        if self._native is None:
            self.closed = True
            return
        try:
            super().close()
        finally:
            if not self._native.closed:
                self._native.close()

    def __del__(self):
        # Garbage collection may run this on any thread, the client's event-loop thread included,
        # where a blocking close would wait for itself. Read opens hold no server state (3FS does
        # not track them), so dropping one needs no request; an unclosed writer is closed here
        # unless we are on the loop thread (its write session then expires on the meta service).
        if getattr(self, "closed", True) or self._native is None:
            return
        if self.mode == "rb" or threading.current_thread() is getattr(self.fs.client, "_thread", None):
            self.closed = True
            return
        try:
            self.close()
        except Exception:
            pass

    def discard(self) -> None:
        if self._native is not None and not self._native.closed:
            self._native.close()


def _register_alias() -> None:
    import fsspec

    if fsspec.registry.get(ALIAS) is not ThreeFSFileSystem:
        fsspec.register_implementation(ALIAS, ThreeFSFileSystem, clobber=True)


_register_alias()
