"""The transactional key-value interface that mgmtd and meta are written against (3FS's
IReadOnlyTransaction / IReadWriteTransaction).

Keys and values are ``bytes``; keys order bytewise. A transaction reads its own writes; commit is
serializable: if another transaction changed something this one read, commit raises
:class:`KVConflict` and :meth:`KVEngine.run` runs the whole function again (with backoff), so an
operation is written once as ``async def op(txn): ...`` and runs on every backend.
"""

from __future__ import annotations

import abc
import asyncio
import random
from typing import Any, Awaitable, Callable, TypeVar

from openinfra.fs.errors import Code, FsError

__all__ = ["KVConflict", "Transaction", "KVEngine", "prefix_end"]

T = TypeVar("T")


class KVConflict(FsError):
    """The transaction conflicted with a concurrent one (retriable)."""

    def __init__(self, message: str = "transaction conflict"):
        super().__init__(Code.KV_CONFLICT, message)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (range end for a scan)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        raise ValueError("prefix_end: prefix of only 0xff bytes has no end")
    p[-1] += 1
    return bytes(p)


def _check_key(key: Any, name: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"{name}: expected bytes, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{name}: must not be empty")
    return bytes(key)


class Transaction(abc.ABC):
    """One transaction. Reads see this transaction's own writes."""

    read_only: bool = False

    @abc.abstractmethod
    async def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` or None; adds ``key`` to the read-conflict set."""

    async def snapshot_get(self, key: bytes) -> bytes | None:
        """Like :meth:`get` without a read conflict (backends that cannot separate them conflict)."""
        return await self.get(key)

    @abc.abstractmethod
    async def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        """Pairs with ``begin <= key < end`` in key order, at most ``limit`` (0 = all)."""

    @abc.abstractmethod
    async def set(self, key: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    async def clear(self, key: bytes) -> None: ...

    async def clear_range(self, begin: bytes, end: bytes) -> None:
        for k, _ in await self.get_range(begin, end):
            await self.clear(k)

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the writes durable and visible; raises :class:`KVConflict` on conflict."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Drop the writes."""

    def _check_write(self, key: bytes, value: bytes | None = None) -> None:
        if self.read_only:
            raise FsError(Code.INTERNAL, "write in a read-only transaction")
        _check_key(key)
        if value is not None and not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"value: expected bytes, got {type(value).__name__}")


class KVEngine(abc.ABC):
    """A backend: :meth:`transaction` makes a transaction; :meth:`run` runs ``fn`` with retries."""

    url: str = ""

    @abc.abstractmethod
    async def begin(self, read_only: bool = False) -> Transaction: ...

    async def close(self) -> None:  # pragma: no cover - trivial default
        return None

    async def run(self, fn: Callable[[Transaction], Awaitable[T]], *, read_only: bool = False,
                  max_retries: int = 50, backoff_s: float = 0.002) -> T:
        """Run ``fn(txn)`` in a transaction and commit; on :class:`KVConflict` run it again.

        ``fn`` must be safe to run several times (no side effects outside the transaction).
        Raises the last KVConflict after ``max_retries`` attempts; any other exception cancels
        the transaction and propagates.
        """
        delay = backoff_s
        for attempt in range(max_retries):
            txn = None
            try:
                txn = await self.begin(read_only=read_only)
                result = await fn(txn)
                await txn.commit()
                return result
            except KVConflict:
                if txn is not None:
                    await txn.cancel()
                if attempt == max_retries - 1:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.02)
            except BaseException:
                if txn is not None:
                    await txn.cancel()
                raise
        raise AssertionError("unreachable")
