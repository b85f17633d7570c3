"""Error codes shared by every 3FS service and client, and their Python exceptions.

Services reply with a string code and a message; clients turn the pair back into an exception.
POSIX-like codes become the matching built-in ``OSError`` subclass (``FileNotFoundError`` ...)
so callers can use ordinary ``except`` clauses; service-level codes become :class:`FsError`
with ``retriable`` telling the client whether waiting for new routing info may help.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "FsError", "RpcError", "make_error", "RETRIABLE_CODES", "Code",
]


class Code:
    """The codes that cross the wire (strings, so logs and replies stay readable)."""

    # POSIX-like, from meta and storage
    ENOENT = "ENOENT"
    EEXIST = "EEXIST"
    ENOTDIR = "ENOTDIR"
    EISDIR = "EISDIR"
    ENOTEMPTY = "ENOTEMPTY"
    EACCES = "EACCES"
    EPERM = "EPERM"
    EINVAL = "EINVAL"
    ENAMETOOLONG = "ENAMETOOLONG"
    ELOOP = "ELOOP"
    EBADF = "EBADF"
    EFBIG = "EFBIG"
    EXDEV = "EXDEV"
    EIO = "EIO"
    # RPC layer
    RPC_MALFORMED = "RPC_MALFORMED"
    RPC_TOO_LARGE = "RPC_TOO_LARGE"
    RPC_UNKNOWN_METHOD = "RPC_UNKNOWN_METHOD"
    RPC_BAD_ARGS = "RPC_BAD_ARGS"
    RPC_TIMEOUT = "RPC_TIMEOUT"
    RPC_CONNECT = "RPC_CONNECT"
    INTERNAL = "INTERNAL"
    # cluster state
    NOT_PRIMARY = "NOT_PRIMARY"
    FENCED = "FENCED"
    CHAIN_VERSION_MISMATCH = "CHAIN_VERSION_MISMATCH"
    NOT_HEAD = "NOT_HEAD"
    TARGET_NOT_SERVING = "TARGET_NOT_SERVING"
    NO_SERVING_TARGET = "NO_SERVING_TARGET"
    CHUNK_DIRTY = "CHUNK_DIRTY"
    STALE_UPDATE = "STALE_UPDATE"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    KV_CONFLICT = "KV_CONFLICT"


# Codes after which the same request may succeed once routing info changes or a peer returns.
RETRIABLE_CODES = frozenset({
    Code.RPC_TIMEOUT, Code.RPC_CONNECT, Code.NOT_PRIMARY, Code.FENCED, Code.CHAIN_VERSION_MISMATCH,
    Code.NOT_HEAD, Code.TARGET_NOT_SERVING, Code.NO_SERVING_TARGET, Code.CHUNK_DIRTY, Code.KV_CONFLICT,
})

_POSIX = {
    Code.ENOENT: (_errno.ENOENT, FileNotFoundError),
    Code.EEXIST: (_errno.EEXIST, FileExistsError),
    Code.ENOTDIR: (_errno.ENOTDIR, NotADirectoryError),
    Code.EISDIR: (_errno.EISDIR, IsADirectoryError),
    Code.ENOTEMPTY: (_errno.ENOTEMPTY, OSError),
    Code.EACCES: (_errno.EACCES, PermissionError),
    Code.EPERM: (_errno.EPERM, PermissionError),
    Code.EINVAL: (_errno.EINVAL, OSError),
    Code.ENAMETOOLONG: (_errno.ENAMETOOLONG, OSError),
    Code.ELOOP: (_errno.ELOOP, OSError),
    Code.EBADF: (_errno.EBADF, OSError),
    Code.EFBIG: (_errno.EFBIG, OSError),
    Code.EXDEV: (_errno.EXDEV, OSError),
    Code.EIO: (_errno.EIO, OSError),
}


class FsError(OSError):
    """An error reported by a 3FS service (or raised locally with the same code).

    ``code`` is one of :class:`Code`; ``retriable`` says whether retrying after fresh routing
    info can help. POSIX-like codes are raised as subclasses that also derive from the matching
    built-in (``FileNotFoundError`` for ``ENOENT``), see :func:`make_error`.
    """

    def __init__(self, code: str, message: str = ""):
        num = _POSIX.get(code, (None, None))[0]
        if num is not None:
            super().__init__(num, message or code)
        else:
            super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE_CODES

    def __reduce__(self):  # picklable across processes (tests run services in subprocesses)
        return (make_error, (self.code, self.message))


class RpcError(FsError):
    """An RPC-level failure: connection, timeout, malformed or oversized frames, unknown methods."""


_CLASSES: dict[str, type[FsError]] = {}


def make_error(code: str, message: str = "") -> FsError:
    """The exception for ``code``: POSIX codes derive from the built-in OSError subclass too."""
    cls = _CLASSES.get(code)
    if cls is None:
        builtin = _POSIX.get(code, (None, None))[1]
        if code.startswith("RPC_"):
            cls = RpcError
        elif builtin is not None and builtin is not OSError:
            cls = type(f"FsError_{code}", (FsError, builtin), {})
        else:
            cls = FsError
        _CLASSES[code] = cls
    return cls(code, message)
