"""Path rules shared by the meta service and the clients.

Paths are absolute, ``/``-separated strings. Empty components (``//``) collapse; ``.`` and
``..`` are refused (a distributed namespace resolved by string would let ``..`` escape checks),
as are NUL bytes, names over 255 bytes and paths over 4096 bytes.
"""

from __future__ import annotations

from openinfra.fs.errors import Code, FsError

__all__ = ["split_path", "InvalidPath", "NAME_MAX", "PATH_MAX"]

NAME_MAX = 255
PATH_MAX = 4096


class InvalidPath(FsError, ValueError):
    """A malformed path: both an ``OSError`` (EINVAL / ENAMETOOLONG) and a ``ValueError``."""


def _bad(code: str, message: str) -> InvalidPath:
    return InvalidPath(code, message)


def split_path(path: object, name: str = "path") -> list[str]:
    """``"/a/b"`` -> ``["a", "b"]``; ``"/"`` -> ``[]``. Raises TypeError / InvalidPath."""
    if not isinstance(path, str):
        raise TypeError(f"{name}: expected a str path, got {type(path).__name__}")
    if "\x00" in path:
        raise _bad(Code.EINVAL, f"{name}: contains a NUL byte: {path!r}")
    if not path.startswith("/"):
        raise _bad(Code.EINVAL, f"{name}: must be absolute (start with '/'), got {path!r}")
    if len(path.encode()) > PATH_MAX:
        raise _bad(Code.ENAMETOOLONG, f"{name}: longer than {PATH_MAX} bytes")
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise _bad(Code.EINVAL, f"{name}: '{p}' components are not allowed: {path!r}")
        if len(p.encode()) > NAME_MAX:
            raise _bad(Code.ENAMETOOLONG, f"{name}: component longer than {NAME_MAX} bytes: {p[:32]!r}...")
    return parts
