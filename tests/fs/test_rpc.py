"""RPC layer: framing, request ids, deadlines, the frame limit, and bad input keeps the server up."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest

from openinfra.fs.errors import Code, FsError, RpcError
from openinfra.fs.rpc import RpcClient, RpcServer, pack_frame, parse_address

pytestmark = pytest.mark.unit


class Echo:
    async def rpc_echo(self, value, delay: float = 0.0):
        if delay:
            await asyncio.sleep(delay)
        return value

    async def rpc_fail(self, code: str):
        raise FsError(code, "asked to fail")

    async def rpc_crash(self):
        raise RuntimeError("boom")


async def _server(max_frame: int = 4 << 20) -> RpcServer:
    server = RpcServer(max_frame=max_frame, name="echo")
    server.add_service(Echo())
    await server.start()
    return server


def _raw_exchange(address: str, data: bytes, frames: int, timeout_s: float = 20.0) -> list:
    """Send raw bytes on a fresh socket and read reply frames until ``frames`` of them arrived (a
    slow reply under load is waited for, up to ``timeout_s`` in all); fails clearly otherwise."""
    host, port = parse_address(address)
    replies: list = []
    deadline = time.monotonic() + timeout_s
    buf = b""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(data)
        while len(replies) < frames:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(replies)} of {frames} reply frames within {timeout_s:g} s: {replies}"
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue  # the assertion above reports it
            assert chunk, f"the server closed the connection after {len(replies)} of {frames} reply frames: {replies}"
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                (n,) = struct.unpack(">I", buf[:4])
                replies.append(msgpack.unpackb(buf[4:4 + n], raw=False))
                buf = buf[4 + n:]
    return replies


def test_roundtrip_concurrent_calls_match_ids():
    async def main():
        server = await _server()
        client = RpcClient()
        try:
            # Later calls finish first: replies must still reach the right caller.
            values = await asyncio.gather(*(client.call(server.address, "echo", {"value": i, "delay": (20 - i) * 0.005})
                                            for i in range(20)))
            assert values == list(range(20))
            blob = bytes(range(256)) * 4096
            assert await client.call(server.address, "echo", {"value": blob}) == blob
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_errors_are_typed_and_server_keeps_serving():
    async def main():
        server = await _server()
        client = RpcClient()
        try:
            with pytest.raises(FileNotFoundError):
                await client.call(server.address, "fail", {"code": Code.ENOENT})
            with pytest.raises(FsError) as ei:
                await client.call(server.address, "crash")
            assert ei.value.code == Code.INTERNAL
            with pytest.raises(RpcError) as ei:
                await client.call(server.address, "nope")
            assert ei.value.code == Code.RPC_UNKNOWN_METHOD
            with pytest.raises(RpcError) as ei:
                await client.call(server.address, "echo", {"wrong": 1})
            assert ei.value.code == Code.RPC_BAD_ARGS
            assert await client.call(server.address, "echo", {"value": "still here"}) == "still here"
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_deadline_expires_and_is_retriable():
    async def main():
        server = await _server()
        client = RpcClient()
        try:
            with pytest.raises(RpcError) as ei:
                await client.call(server.address, "echo", {"value": 1, "delay": 2.0}, timeout=0.1)
            assert ei.value.code == Code.RPC_TIMEOUT and ei.value.retriable
            assert await client.call(server.address, "echo", {"value": 2}) == 2
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_malformed_and_oversized_frames_get_error_replies():
    async def main():
        server = await _server(max_frame=4096)
        loop = asyncio.get_running_loop()
        try:
            # Not msgpack, then a valid request on the same connection: both answered.
            garbage = b"\xc1\xc1\xc1"
            good = pack_frame([0, 7, "echo", 5.0, {"value": "ok"}])
            replies = await loop.run_in_executor(None, _raw_exchange, server.address,
                                                 struct.pack(">I", len(garbage)) + garbage + good, 2)
            assert replies[0][2] == Code.RPC_MALFORMED
            assert replies[1] == [1, 7, None, "ok"]
            # Wrong shape: a map instead of the request array.
            replies = await loop.run_in_executor(None, _raw_exchange, server.address, pack_frame({"id": 1}), 1)
            assert replies[0][2] == Code.RPC_MALFORMED
            # Over the limit: error reply, that connection closes, the server keeps serving.
            replies = await loop.run_in_executor(None, _raw_exchange, server.address, struct.pack(">I", 10**9), 1)
            assert replies[0][2] == Code.RPC_TOO_LARGE
            client = RpcClient()
            with pytest.raises(RpcError) as ei:
                await client.call(server.address, "echo", {"value": b"x" * 8192})
            assert ei.value.code in (Code.RPC_TOO_LARGE, Code.RPC_CONNECT)
            assert await client.call(server.address, "echo", {"value": 5}) == 5
            await client.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_connect_failure_is_retriable_and_addresses_validated():
    async def main():
        client = RpcClient(connect_timeout=0.5)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(RpcError) as ei:
            await client.call(f"127.0.0.1:{port}", "echo", {"value": 1})
        assert ei.value.code == Code.RPC_CONNECT and ei.value.retriable
        with pytest.raises(ValueError, match="address"):
            await client.call("nonsense", "echo", {})
        with pytest.raises(ValueError, match="timeout"):
            await client.call("127.0.0.1:1", "echo", {}, timeout=0)

    asyncio.run(main())


def test_large_binary_travels_outside_msgpack():
    """Blobs >= 64 KiB go after the msgpack body and arrive as memoryviews; bad blob frames are
    rejected as malformed."""

    async def main():
        server = await _server()
        client = RpcClient()
        loop = asyncio.get_running_loop()
        try:
            big, small = bytes(range(256)) * 1024, b"tiny"
            value = {"a": big, "b": [small, big[:70_000]], "c": 3}
            got = await client.call(server.address, "echo", {"value": value})
            assert isinstance(got["a"], memoryview) and got["a"] == big
            assert got["b"][0] == small and isinstance(got["b"][0], bytes) and got["b"][1] == big[:70_000]
            frame = pack_frame([0, 9, "echo", 5.0, {"value": big}])
            assert frame[4:5] == b"\xc1" and len(frame) > len(big)
            for body in (b"\xc1\x00", b"\xc1\x00\x00\x00\x09abc", b"\xc1\x00\x00\x00\x01\xc0junk"):
                replies = await loop.run_in_executor(None, _raw_exchange, server.address,
                                                     struct.pack(">I", len(body)) + body, 1)
                assert replies[0][2] == Code.RPC_MALFORMED, body
            assert await client.call(server.address, "echo", {"value": 1}) == 1
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())
