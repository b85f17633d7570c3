"""One KV test suite on all three backends: memory, SQLite (WAL), PostgreSQL (SERIALIZABLE)."""

from __future__ import annotations

import asyncio

import pytest

from openinfra.fs.kv import KVConflict, MemoryKV, SqliteKV, open_kv, prefix_end

pytestmark = pytest.mark.unit

BACKENDS = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.service)]


@pytest.fixture(params=BACKENDS)
def kv_url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/kv.db"
    return request.getfixturevalue("fresh_postgres_db")


def run(coro):
    return asyncio.run(coro)


def test_set_get_range_clear(kv_url):
    async def main():
        kv = await open_kv(kv_url)
        try:
            async def fill(txn):
                for i in range(10):
                    await txn.set(b"DENT" + bytes([i]), b"v%d" % i)
                await txn.set(b"INOD\x01", b"root")
                # reads see this transaction's own writes
                assert await txn.get(b"DENT\x03") == b"v3"
                assert len(await txn.get_range(b"DENT", prefix_end(b"DENT"))) == 10

            await kv.run(fill)

            async def read(txn):
                return (await txn.get(b"DENT\x05"), await txn.get(b"nope"),
                        await txn.get_range(b"DENT", prefix_end(b"DENT"), limit=3),
                        await txn.get_range(b"DENT\x08", prefix_end(b"DENT")))

            v, missing, first3, tail = await kv.run(read, read_only=True)
            assert v == b"v5" and missing is None
            assert [k for k, _ in first3] == [b"DENT\x00", b"DENT\x01", b"DENT\x02"]
            assert tail == [(b"DENT\x08", b"v8"), (b"DENT\x09", b"v9")]

            async def clear(txn):
                await txn.clear(b"DENT\x00")
                await txn.clear_range(b"DENT\x05", b"DENT\x08")
                assert await txn.get(b"DENT\x00") is None

            await kv.run(clear)
            keys = [k for k, _ in await kv.run(lambda t: t.get_range(b"DENT", prefix_end(b"DENT")))]
            assert keys == [b"DENT" + bytes([i]) for i in (1, 2, 3, 4, 8, 9)]
            assert await kv.run(lambda t: t.get(b"INOD\x01")) == b"root"
        finally:
            await kv.close()

    run(main())


def test_cancel_drops_writes_and_errors_propagate(kv_url):
    async def main():
        kv = await open_kv(kv_url)
        try:
            async def bad(txn):
                await txn.set(b"KEY1", b"x")
                raise ValueError("nope")

            with pytest.raises(ValueError, match="nope"):
                await kv.run(bad)
            assert await kv.run(lambda t: t.get(b"KEY1")) is None
            with pytest.raises(TypeError, match="key"):
                await kv.run(lambda t: t.get("str key"))
        finally:
            await kv.close()

    run(main())


def test_concurrent_increments_are_serializable(kv_url):
    """Read-modify-write from many concurrent transactions: no lost update (retries on conflict)."""

    async def main():
        kv = await open_kv(kv_url)
        try:
            async def incr(txn):
                v = await txn.get(b"CONFcounter")
                n = int(v or b"0")
                await asyncio.sleep(0)  # let the other transactions interleave
                await txn.set(b"CONFcounter", str(n + 1).encode())

            await asyncio.gather(*(kv.run(incr) for _ in range(20)))
            assert await kv.run(lambda t: t.get(b"CONFcounter")) == b"20"
        finally:
            await kv.close()

    run(main())


def test_conflict_detected_on_range_read():
    """Memory backend: a write into a range another transaction read makes its commit fail."""

    async def main():
        kv = MemoryKV()
        t1 = await kv.begin()
        await t1.get_range(b"DENT\x01", b"DENT\x02")
        t2 = await kv.begin()
        await t2.set(b"DENT\x01a", b"new entry")
        await t2.commit()
        await t1.set(b"DENT\x01b", b"other entry")
        with pytest.raises(KVConflict):
            await t1.commit()

    run(main())


def test_sqlite_two_engines_share_one_file(tmp_path):
    """Two engines on one file (as two processes would be) see each other's commits."""

    async def main():
        a, b = SqliteKV(tmp_path / "kv.db"), SqliteKV(tmp_path / "kv.db")

        async def incr(txn):
            n = int(await txn.get(b"CONFn") or b"0")
            await txn.set(b"CONFn", str(n + 1).encode())

        await asyncio.gather(*(e.run(incr) for e in [a, b] * 10))
        assert await b.run(lambda t: t.get(b"CONFn")) == b"20"
        await a.close()
        await b.close()

    run(main())


def test_open_kv_rejects_bad_urls():
    async def main():
        with pytest.raises(ValueError, match="url"):
            await open_kv("")
        with pytest.raises(ValueError, match="unknown KV scheme"):
            await open_kv("mysql://x")
        with pytest.raises(ValueError, match="prefix"):
            prefix_end(b"\xff\xff")
        with pytest.raises(ValueError, match="pool"):
            await open_kv("postgresql://postgres@127.0.0.1:1/db?pool=0")

    run(main())
