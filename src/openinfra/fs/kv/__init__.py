"""Transactional KV backends for mgmtd and meta: memory (tests), SQLite (embedded), PostgreSQL."""

from __future__ import annotations

from openinfra.fs.kv.base import KVConflict, KVEngine, Transaction, prefix_end
from openinfra.fs.kv.memory import MemoryKV
from openinfra.fs.kv.sqlite import SqliteKV

__all__ = ["KVConflict", "KVEngine", "Transaction", "prefix_end", "MemoryKV", "SqliteKV", "PostgresKV", "open_kv"]


def __getattr__(name: str):
    if name == "PostgresKV":  # psycopg is optional: import it only when asked for
        from openinfra.fs.kv.postgres import PostgresKV

        return PostgresKV
    raise AttributeError(name)


async def open_kv(url: str) -> KVEngine:
    """Open a backend by URL: ``memory://``, ``sqlite:///abs/path.db`` (or a plain file path),
    ``postgresql://user@host:port/db`` (``?pool=N``: N connections per process, default 1)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"url: expected a KV URL (memory://, sqlite:///path, postgresql://...), got {url!r}")
    if url == "memory://":
        return MemoryKV()
    if url.startswith(("postgresql://", "postgres://")):
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        from openinfra.fs.kv.postgres import PostgresKV

        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        pool = query.pop("pool", "1")  # ours, not libpq's: connections per process
        if not pool.isdigit() or int(pool) < 1:
            raise ValueError(f"url: pool must be a positive integer, got {pool!r}")
        return await PostgresKV.connect(urlunsplit(parts._replace(query=urlencode(query))), pool_size=int(pool))
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise ValueError(f"url: sqlite URL without a path: {url!r}")
        return SqliteKV(path)
    if "://" in url:
        raise ValueError(f"url: unknown KV scheme in {url!r}; expected memory://, sqlite:// or postgresql://")
    return SqliteKV(url)
