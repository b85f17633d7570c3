"""Prefix reuse: cached latent rows of whole prompt pages, keyed by the token prefix they encode.

A page of ``page_size`` prompt tokens is identified by a hash chain: ``key_i = H(key_{i-1},
tokens of page i)``, so a key names the page *and everything before it* — the same 64 tokens after
a different prefix are a different key. The value is that page's latent rows for every layer,
``[n_layers, page_size, latent_dim]``. The store is anything with ``get`` / ``put`` / ``exists``
over bytes keys and tensors: :class:`MemoryBlockStore` here, :class:`FileBlockStore` (a directory
that several processes of one machine share), a 3FS KVCache client in a cluster.
:func:`open_block_store` opens one from a JSON-able spec, so a prefill worker process can open the
same store as the decode side.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import OrderedDict
from typing import Protocol

import torch

__all__ = ["BlockStore", "MemoryBlockStore", "FileBlockStore", "open_block_store", "page_keys"]


class BlockStore(Protocol):
    """What the engine needs. Optional, used when present: ``delete(key)`` (a request's own partial
    page is dropped once the decode side read it) and ``get_many(keys)`` (one batched read)."""

    def get(self, key: bytes) -> torch.Tensor | None: ...
    def put(self, key: bytes, value: torch.Tensor) -> None: ...
    def exists(self, key: bytes) -> bool: ...


def page_keys(tokens: list[int], page_size: int, namespace: bytes = b"") -> list[bytes]:
    """One key per *full* page of ``tokens``: a SHA-256 chain over the pages so far."""
    keys: list[bytes] = []
    digest = hashlib.sha256(b"openinfra-prefix-v1" + namespace).digest()
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = torch.tensor(tokens[start : start + page_size], dtype=torch.int64).numpy().tobytes()
        digest = hashlib.sha256(digest + page).digest()
        keys.append(digest)
    return keys


class MemoryBlockStore:
    """An in-process LRU store bounded by bytes (the single-machine default)."""

    def __init__(self, capacity_bytes: int = 256 * 2**20):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def exists(self, key: bytes) -> bool:
        return key in self._items

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self._items:
            self._items.move_to_end(key)
            return
        value = value.detach().to("cpu", copy=True)
        size = value.numel() * value.element_size()
        while self._items and self._bytes + size > self.capacity_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        if size <= self.capacity_bytes:
            self._items[key] = value
            self._bytes += size

    def delete(self, key: bytes) -> bool:
        value = self._items.pop(key, None)
        if value is not None:
            self._bytes -= value.numel() * value.element_size()
        return value is not None

    def __len__(self) -> int:
        return len(self._items)


class FileBlockStore:
    """Blocks as files in one directory (``<root>/<hex key>.pt``): a store that separate processes
    of one machine share without a 3FS cluster. Writes go to a temporary name and are renamed into
    place, so a reader sees a whole block or none. Not bounded: for tests and single-node use."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: bytes) -> str:
        if not isinstance(key, bytes) or not key:
            raise ValueError("key must be non-empty bytes")
        return os.path.join(self.root, key.hex() + ".pt")

    def get(self, key: bytes) -> torch.Tensor | None:
        try:
            return torch.load(self._path(key), weights_only=True)
        except FileNotFoundError:
            return None

    def exists(self, key: bytes) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: bytes, value: torch.Tensor) -> None:
        path = self._path(key)
        if os.path.exists(path):
            return  # keys name content
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        torch.save(value.detach().to("cpu").contiguous().clone(), tmp)
        os.replace(tmp, path)

    def delete(self, key: bytes) -> bool:
        try:
            os.remove(self._path(key))
            return True
        except FileNotFoundError:
            return False


def open_block_store(spec: dict | None):
    """A block store from a JSON-able ``spec``: ``None`` (no store), ``{"kind": "memory", "capacity_mb": N}``
    (this process only), ``{"kind": "dir", "path": P}`` (:class:`FileBlockStore`), or
    ``{"kind": "3fs", "mgmtd": "host:port", "root": "/kvcache/..."}`` (3FS KVCache)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"block store spec must be a dict with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind == "memory":
        return MemoryBlockStore(int(spec.get("capacity_mb", 256)) * 2**20)
    if kind == "dir":
        return FileBlockStore(spec["path"])
    if kind == "3fs":
        from openinfra.fs.clients.kvcache import KVCache
        from openinfra.serving.kv_store import KVCacheStore

        try:  # the 3FS client retries for its retry_s (60 s) first: failovers are ridden out
            return KVCacheStore(KVCache(spec["mgmtd"], root=spec.get("root", "/kvcache")))
        except OSError as exc:
            raise RuntimeError(f"block store: cannot open 3FS KVCache at mgmtd {spec['mgmtd']}: {exc}") from exc
    raise ValueError(f"block store spec: unknown kind {kind!r} (memory, dir or 3fs)")
