"""3FS clients on the native API: fsspec filesystem, KVCache, tree delete, ring I/O, FUSE mount.

    import fsspec
    fs = fsspec.filesystem("3fs", mgmtd="127.0.0.1:8000")      # pandas: "threefs://127.0.0.1:8000/x.parquet"
    from openinfra.fs.clients import KVCache
    kv = KVCache("127.0.0.1:8000", root="/kvcache", capacity_bytes=8 << 30)
    kv.put(b"key", torch.ones(4096)); out = torch.empty(4096); kv.get_into([b"key"], [out])

Submodules load lazily (``import openinfra.fs.clients.fsspec`` must not pull in torch, pyfuse3 or
trio); every name of ``__all__`` is importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ThreeFSFileSystem", "ThreeFSFile", "resolve_mgmtd",
    "KVCache", "KVCacheBlockStore", "GCResult",
    "remove_tree", "remove_tree_async", "RemoveTreeResult",
    "make_iovec", "make_ioring", "register_fd", "deregister_fd", "IoVec", "IoRing", "IoResult", "RingServer",
    "mount", "register_mount",
]

_WHERE = {
    "ThreeFSFileSystem": "fsspec", "ThreeFSFile": "fsspec", "resolve_mgmtd": "common",
    "KVCache": "kvcache", "KVCacheBlockStore": "kvcache", "GCResult": "kvcache",
    "remove_tree": "tree", "remove_tree_async": "tree", "RemoveTreeResult": "tree",
    "make_iovec": "usrbio", "make_ioring": "usrbio", "register_fd": "usrbio", "deregister_fd": "usrbio",
    "IoVec": "usrbio", "IoRing": "usrbio", "IoResult": "usrbio", "RingServer": "usrbio",
    "mount": "fuse", "register_mount": "fuse",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'openinfra.fs.clients' has no attribute {name!r}")
    return getattr(importlib.import_module(f"openinfra.fs.clients.{mod}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
