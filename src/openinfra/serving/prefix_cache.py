"""Prefix reuse: cached latent rows of whole prompt pages, keyed by the token prefix they encode.

A page of ``page_size`` prompt tokens is identified by a hash chain: ``key_i = H(key_{i-1},
tokens of page i)``, so a key names the page *and everything before it* — the same 64 tokens after
a different prefix are a different key. The value is that page's latent rows for every layer,
``[n_layers, page_size, latent_dim]``. The store is anything with ``get`` / ``put`` / ``exists``
over bytes keys and tensors: :class:`MemoryBlockStore` here, a 3FS KVCache client in a cluster.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

import torch

__all__ = ["BlockStore", "MemoryBlockStore", "page_keys"]


class BlockStore(Protocol):
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

    def __len__(self) -> int:
        return len(self._items)
