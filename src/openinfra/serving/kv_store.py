"""The serving side's 3FS KVCache store: :class:`~openinfra.fs.clients.kvcache.KVCacheBlockStore`
plus the optional block-store calls the engine uses when present — ``get_many`` (a request's pages
in one batched read: one round of storage requests instead of one per page) and ``delete`` (a
request's own partial page, once the decode side read it)."""

from __future__ import annotations

from typing import Sequence

import torch

from openinfra.fs.clients.kvcache import KVCacheBlockStore

__all__ = ["KVCacheStore"]


class KVCacheStore(KVCacheBlockStore):
    def get_many(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        return self.cache.get_batch(keys)

    def delete(self, key: bytes) -> bool:
        return self.cache.delete(key)
