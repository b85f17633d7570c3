"""RPC latency paths. The outbox: the first frame of an event-loop turn is written at once (a lone
request or reply waits for no loop turn); frames queued after it in the same turn go out together,
in order, at the end of the turn. ``fast_`` handlers: served in the connection's read loop, with
SLOW / other exceptions / malformed requests handed to the ``rpc_`` handler. End to end against a
server in another process over loopback TCP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.rpc import RpcClient, _decode, _Outbox

pytestmark = pytest.mark.unit


class _Recorder:
    """The two things _Outbox needs from a writer; records each writelines call."""

    def __init__(self):
        self.calls: list[list[bytes]] = []

    def writelines(self, pieces) -> None:
        self.calls.append([bytes(p) for p in pieces])

    async def drain(self) -> None:
        return None


def _frames(data: bytes) -> list:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(_decode(memoryview(data[4:4 + n])))
        data = data[4 + n:]
    return out


def test_first_frame_written_now_rest_of_turn_coalesced():
    async def main():
        rec = _Recorder()
        box = _Outbox(rec)
        await box.send([1, 1, None, "a"])
        # written before any loop turn
        assert len(rec.calls) == 1 and _frames(b"".join(rec.calls[0])) == [[1, 1, None, "a"]]
        big = os.urandom(100 << 10)  # a blob: travels as its own piece
        await box.send([1, 2, None, "b"])
        await box.send([1, 3, None, {"data": big}])
        await box.send([1, 4, None, "d"])
        assert len(rec.calls) == 1  # queued: the turn is not over
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(rec.calls) == 2  # one writelines for the three
        got = _frames(b"".join(rec.calls[1]))
        assert [g[1] for g in got] == [2, 3, 4]
        assert bytes(got[1][3]["data"]) == big and got[2][3] == "d"
        # a new turn: the next lone frame is written at once again
        await box.send([1, 5, None, "e"])
        assert len(rec.calls) == 3 and _frames(b"".join(rec.calls[2])) == [[1, 5, None, "e"]]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(rec.calls) == 3  # the end-of-turn flush had nothing to write

    asyncio.run(main())


_SERVER = textwrap.dedent("""
    import asyncio, sys
    from openinfra.fs.rpc import RpcServer

    from openinfra.fs.errors import FsError
    from openinfra.fs.rpc import SLOW

    class Echo:
        async def rpc_echo(self, value, delay: float = 0.0):
            if delay:
                await asyncio.sleep(delay)
            return value

        def fast_which(self, value, extra=None):
            if value == "slow":
                return SLOW
            if value == "fail":
                raise FsError("EACCES", "fast says no")
            if value == "crash":
                raise RuntimeError("fast crashed")
            return ["fast", value]

        async def rpc_which(self, value, extra=None):
            if value == "fail":
                raise FsError("EACCES", "slow says no")
            return ["slow", value]

    async def main():
        s = RpcServer(name="echo")
        s.add_service(Echo())
        print(await s.start(), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def test_lone_and_burst_calls_against_a_server_process():
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address

        async def main():
            c = RpcClient()
            try:
                for i in range(200):  # queue depth 1: each request and reply is a lone frame
                    assert await c.call(address, "echo", {"value": i}, timeout=5) == i
                blobs = [os.urandom(n) for n in (10, 70 << 10, 3, 200 << 10, 4096)]
                for _ in range(5):  # bursts: small frames and blobs interleaved, replies out of order
                    calls = [c.call(address, "echo", {"value": {"k": k, "b": b}, "delay": (k % 3) * 0.002}, timeout=5)
                             for k, b in enumerate(blobs * 20)]
                    got = await asyncio.gather(*calls)
                    for k, (g, b) in enumerate(zip(got, blobs * 20)):
                        assert g["k"] == k and bytes(g["b"]) == b
            finally:
                await c.close()

        asyncio.run(main())
        assert proc.poll() is None  # the server kept serving
    finally:
        proc.kill()
        proc.wait()


def test_fast_handlers_and_their_fallbacks_against_a_server_process():
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()

        async def main():
            c = RpcClient()
            try:
                call = lambda args: c.call(address, "which", args, timeout=5)  # noqa: E731
                assert await call({"value": 7}) == ["fast", 7]
                assert await call({"value": 7, "extra": 1}) == ["fast", 7]
                assert await call({"value": "slow"}) == ["slow", "slow"]  # SLOW: the rpc_ handler
                assert await call({"value": "crash"}) == ["slow", "crash"]  # any other exception: same
                with pytest.raises(FsError) as e:
                    await call({"value": "fail"})  # an FsError from the fast handler is the reply
                assert e.value.code == "EACCES" and "fast says no" in e.value.message
                for bad in ({}, {"value": 1, "nope": 2}):  # bad args: the usual error reply
                    with pytest.raises(FsError) as e:
                        await call(bad)
                    assert e.value.code == Code.RPC_BAD_ARGS
                big = "x" * 8000  # over the fast path's size: the rpc_ handler
                assert await call({"value": big}) == ["slow", big]
                got = await asyncio.gather(*(call({"value": i}) for i in range(300)))
                assert got == [["fast", i] for i in range(300)]
            finally:
                await c.close()

        asyncio.run(main())
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
