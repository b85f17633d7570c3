"""Paths on any storage: local directories, or any fsspec filesystem (3FS through ``3fs://``).

Everything that touches the file system goes through here, so the executor, the datasets and the
sinks work the same on local disk and on 3FS. A path with a protocol (``scheme://...``, other than
``file://``) is remote: it is opened through ``fsspec`` and registered with DuckDB so that SQL reads
it directly. Renames are what make outputs safe: a task writes under a temporary name and renames
into place, so a killed task never leaves a half-written output that a re-run would trust.
"""

from __future__ import annotations

import glob as _glob
import os
import shutil
from typing import Any

__all__ = [
    "is_remote", "join", "makedirs", "exists", "rename", "remove", "expand", "file_size",
    "filesystem", "register_with_duckdb", "link_or_copy", "read_text", "write_text", "listdir",
]


def is_remote(path: str) -> bool:
    """True for ``scheme://`` paths that need fsspec (``file://`` counts as local)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(path: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a remote path."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"path {path!r}: no fsspec filesystem for this protocol ({exc})") from exc


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(_local(base), *parts)


def makedirs(path: str) -> None:
    if is_remote(path):
        fs, p = filesystem(path)
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(_local(path), exist_ok=True)


def exists(path: str) -> bool:
    if is_remote(path):
        fs, p = filesystem(path)
        return fs.exists(p)
    return os.path.exists(_local(path))


def file_size(path: str) -> int:
    if is_remote(path):
        fs, p = filesystem(path)
        return int(fs.size(p))
    return os.path.getsize(_local(path))


def listdir(path: str) -> list[str]:
    """Names (not paths) in a directory, sorted; empty if it does not exist."""
    if is_remote(path):
        fs, p = filesystem(path)
        if not fs.exists(p):
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    p = _local(path)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []


def rename(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (atomic on a local file system; a directory rename on 3FS)."""
    if is_remote(src):
        fs, s = filesystem(src)
        _, d = filesystem(dst)
        fs.mv(s, d, recursive=True)
    else:
        os.rename(_local(src), _local(dst))


def remove(path: str) -> None:
    """Remove a file or a directory tree; missing paths are fine."""
    if is_remote(path):
        fs, p = filesystem(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    p = _local(path)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.remove(p)


def read_text(path: str) -> str:
    if is_remote(path):
        fs, p = filesystem(path)
        with fs.open(p, "r") as f:
            return f.read()
    with open(_local(path)) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    if is_remote(path):
        fs, p = filesystem(path)
        with fs.open(p, "w") as f:
            f.write(text)
        return
    with open(_local(path), "w") as f:
        f.write(text)


def link_or_copy(src: str, dst: str, mode: str = "link_or_copy") -> None:
    """Place ``src`` at ``dst``: a hard link when both are on one local file system, else a copy."""
    if is_remote(src) or is_remote(dst):
        if is_remote(src) and is_remote(dst) and filesystem(src)[0].protocol == filesystem(dst)[0].protocol:
            fs, s = filesystem(src)
            fs.copy(s, filesystem(dst)[1])
            return
        import fsspec

        with fsspec.open(src, "rb") as fin, fsspec.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
        return
    s, d = _local(src), _local(dst)
    if mode in ("link", "link_or_copy"):
        try:
            os.link(s, d)
            return
        except OSError:
            if mode == "link":
                os.symlink(os.path.abspath(s), d)
                return
    shutil.copyfile(s, d)


def expand(patterns: str | list[str], recursive: bool = False, what: str = "paths") -> list[str]:
    """Expand glob patterns and directories into a sorted list of files.

    A directory stands for the files in it (all levels when ``recursive``). Raises
    ``FileNotFoundError`` naming the pattern when one matches nothing: a typo in an input path is
    the most common mistake, and an empty input would otherwise run silently.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a path or a list of paths, got {type(patterns).__name__}")
    out: list[str] = []
    for pattern in patterns:
        matches = _expand_one(pattern, recursive)
        if not matches:
            raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
        out.extend(matches)
    return out


def _expand_one(pattern: str, recursive: bool) -> list[str]:
    if is_remote(pattern):
        fs, p = filesystem(pattern)
        proto = pattern.split("://", 1)[0]
        if fs.isdir(p):
            found = fs.find(p) if recursive else [e for e in fs.ls(p, detail=False) if fs.isfile(e)]
        else:
            found = fs.glob(p, maxdepth=None if recursive else None) if _glob.has_magic(p) else ([p] if fs.exists(p) else [])
        return sorted(f"{proto}://{f.lstrip('/')}" if not f.startswith("/") else f"{proto}://{f}" for f in found)
    p = os.path.abspath(_local(pattern))  # absolute: Ray workers do not share the driver's cwd
    if os.path.isdir(p):
        if recursive:
            return sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files if not f.startswith((".", "_")))
        return sorted(os.path.join(p, f) for f in os.listdir(p) if os.path.isfile(os.path.join(p, f)) and not f.startswith((".", "_")))
    return sorted(f for f in _glob.glob(p, recursive=recursive) if os.path.isfile(f))


def register_with_duckdb(con: Any, paths: list[str]) -> None:
    """Let DuckDB read remote ``paths``: register each protocol's fsspec filesystem once."""
    registered: set[str] | None = None
    for path in paths:
        if not is_remote(path):
            continue
        if registered is None:
            registered = set(con.list_filesystems())
        fs, _ = filesystem(path)
        protocols = fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol]
        if not registered.intersection(protocols) and type(fs).__name__ not in registered:
            con.register_filesystem(fs)
            registered.update(protocols)
            registered.add(type(fs).__name__)
