"""SQLite KV backend (WAL): the embedded default; several processes on one box share the file.

SQLite has one writer at a time, which makes every transaction serializable. A read-write
transaction takes the write lock up front (``BEGIN IMMEDIATE``); when another process holds it,
the short busy timeout expires and the attempt raises KVConflict, so :meth:`KVEngine.run` backs
off in asyncio instead of blocking the event loop.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from openinfra.fs.kv.base import KVConflict, KVEngine, Transaction, _check_key

__all__ = ["SqliteKV"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _SqliteTxn(Transaction):
    def __init__(self, engine: "SqliteKV", conn: sqlite3.Connection, read_only: bool):
        self.engine, self.conn, self.read_only = engine, conn, read_only
        self.open = True

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise KVConflict(f"sqlite busy: {exc}") from None
            raise

    async def get(self, key: bytes) -> bytes | None:
        row = self._exec("SELECT v FROM kv WHERE k = ?", (_check_key(key),)).fetchone()
        return None if row is None else bytes(row[0])

    async def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        begin, end = _check_key(begin, "begin"), _check_key(end, "end")
        if limit < 0:
            raise ValueError(f"limit: expected >= 0, got {limit}")
        rows = self._exec("SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k LIMIT ?",
                          (begin, end, limit if limit else -1)).fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]

    async def set(self, key: bytes, value: bytes) -> None:
        self._check_write(key, value)
        self._exec("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (bytes(key), bytes(value)))

    async def clear(self, key: bytes) -> None:
        self._check_write(key)
        self._exec("DELETE FROM kv WHERE k = ?", (bytes(key),))

    async def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_write(begin)
        self._exec("DELETE FROM kv WHERE k >= ? AND k < ?", (_check_key(begin), _check_key(end, "end")))

    async def commit(self) -> None:
        if not self.open:
            return
        try:
            self._exec("COMMIT")
        finally:
            self._release()

    async def cancel(self) -> None:
        if not self.open:
            return
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        self.open = False
        self.engine._pool.append(self.conn)


class SqliteKV(KVEngine):
    """``SqliteKV(path, synchronous="NORMAL")``: WAL mode; ``synchronous="FULL"`` syncs each commit.

    With NORMAL a commit survives a process crash (SIGKILL) but may be lost on power failure;
    the database stays consistent either way.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 20):
        if synchronous not in ("OFF", "NORMAL", "FULL"):
            raise ValueError(f"synchronous: expected OFF, NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{self.path}"
        self.synchronous, self.busy_timeout_ms = synchronous, busy_timeout_ms
        self._pool: list[sqlite3.Connection] = []
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        for attempt in range(200):
            try:
                conn.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == 199:
                    raise
        self._pool.append(conn)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread off because
        # the loop may run in a helper thread (the synchronous client), never two at once.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    async def begin(self, read_only: bool = False) -> Transaction:
        conn = self._pool.pop() if self._pool else self._connect()
        try:
            conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._pool.append(conn)
            if _busy(exc):
                raise KVConflict(f"sqlite busy: {exc}") from None
            raise
        return _SqliteTxn(self, conn, read_only)

    async def run(self, fn, *, read_only: bool = False, max_retries: int = 2000, backoff_s: float = 0.001):
        # Writers queue on one lock across processes: many short retries instead of long blocking.
        return await super().run(fn, read_only=read_only, max_retries=max_retries, backoff_s=backoff_s)

    async def close(self) -> None:
        for conn in self._pool:
            conn.close()
        self._pool.clear()

