"""In-memory KV backend with optimistic concurrency control (serializable), for unit tests.

Each transaction records the keys and ranges it read; at commit, any transaction committed after
this one began that wrote into that read set makes the commit fail with KVConflict.
"""

from __future__ import annotations

import bisect

from openinfra.fs.kv.base import KVConflict, KVEngine, Transaction, _check_key

__all__ = ["MemoryKV"]


class _MemoryTxn(Transaction):
    def __init__(self, engine: "MemoryKV", read_only: bool):
        self.engine, self.read_only = engine, read_only
        self.start = engine._version
        self.reads: set[bytes] = set()
        self.ranges: list[tuple[bytes, bytes]] = []
        self.writes: dict[bytes, bytes | None] = {}
        self.done = False
        engine._active.add(self)

    async def get(self, key: bytes) -> bytes | None:
        key = _check_key(key)
        self.reads.add(key)
        return await self.snapshot_get(key)

    async def snapshot_get(self, key: bytes) -> bytes | None:
        key = _check_key(key)
        if key in self.writes:
            return self.writes[key]
        return self.engine._data.get(key)

    async def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        begin, end = _check_key(begin, "begin"), _check_key(end, "end")
        if limit < 0:
            raise ValueError(f"limit: expected >= 0, got {limit}")
        self.ranges.append((begin, end))
        keys = self.engine._keys
        lo, hi = bisect.bisect_left(keys, begin), bisect.bisect_left(keys, end)
        merged = {k: self.engine._data[k] for k in keys[lo:hi]}
        for k, v in self.writes.items():
            if begin <= k < end:
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
        out = sorted(merged.items())
        return out[:limit] if limit else out

    async def set(self, key: bytes, value: bytes) -> None:
        self._check_write(key, value)
        self.writes[bytes(key)] = bytes(value)

    async def clear(self, key: bytes) -> None:
        self._check_write(key)
        self.writes[bytes(key)] = None

    def _conflicts(self) -> bool:
        for version, keys in self.engine._log:
            if version <= self.start:
                continue
            for k in keys:
                if k in self.reads or any(b <= k < e for b, e in self.ranges):
                    return True
        return False

    async def commit(self) -> None:
        eng = self.engine
        try:
            if self.writes:
                if self._conflicts():
                    raise KVConflict("a concurrent transaction wrote what this one read")
                eng._version += 1
                for k, v in self.writes.items():
                    if v is None:
                        if eng._data.pop(k, None) is not None:
                            eng._keys.pop(bisect.bisect_left(eng._keys, k))
                    else:
                        if k not in eng._data:
                            bisect.insort(eng._keys, k)
                        eng._data[k] = v
                eng._log.append((eng._version, frozenset(self.writes)))
        finally:
            self._finish()

    async def cancel(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        eng = self.engine
        eng._active.discard(self)
        oldest = min((t.start for t in eng._active), default=eng._version)
        eng._log = [(v, k) for v, k in eng._log if v > oldest]


class MemoryKV(KVEngine):
    """A dict with sorted keys; lives as long as the object (one process)."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []
        self._version = 0
        self._log: list[tuple[int, frozenset[bytes]]] = []
        self._active: set[_MemoryTxn] = set()

    async def begin(self, read_only: bool = False) -> Transaction:
        return _MemoryTxn(self, read_only)
