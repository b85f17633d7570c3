"""Big reply blobs received with ``recvmsg_into`` on a dup of the connection's socket
(``rawsock.recv_into``): the bytes land in the caller's scatter list, replies around them keep
their order, and a server that dies or lies mid-blob fails the call at once, never hangs it."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time

import msgpack
import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.rpc import BlobPieces, RpcClient, RpcServer, parse_address

pytestmark = pytest.mark.unit


class Blobs:
    def __init__(self, data: bytes):
        self.data = data

    async def rpc_pieces(self, sizes: list):
        pos, pieces = 0, []
        for n in sizes:
            pieces.append(memoryview(self.data)[pos:pos + n])
            pos += n
        return {"data": BlobPieces(pieces), "n": len(pieces)}

    async def rpc_ping(self):
        return "pong"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a coroutine on asyncio's loop and on uvloop (the client's loop when installed)."""
    if request.param == "asyncio":
        return asyncio.run
    return pytest.importorskip("uvloop").run


def test_big_blob_lands_in_a_long_scatter_list(run):
    data = os.urandom(16 << 20)
    sizes = [65536] * 100 + [1, 70_000, 3 << 20]  # 103 destinations, ~9.6 MB (many recvmsg_into rounds)

    async def main():
        server = RpcServer(name="blobs")
        server.add_service(Blobs(data))
        await server.start()
        client = RpcClient()
        try:
            want = data[:sum(sizes)]
            for _ in range(3):
                bufs = [memoryview(bytearray(n)) for n in sizes]

                def sink(result, bufs=bufs):
                    result["data"].dest = bufs

                got = await asyncio.gather(client.call(server.address, "pieces", {"sizes": sizes}, sink=sink),
                                           client.call(server.address, "ping"),
                                           client.call(server.address, "pieces", {"sizes": sizes}))
                assert got[0]["data"].nbytes == len(want) and b"".join(bytes(b) for b in bufs) == want
                assert got[1] == "pong" and bytes(got[2]["data"]) == want
        finally:
            await client.close()
            await server.close()

    run(main())


def _liar(behaviour: str):
    """A server that answers one request with a blob frame promising 4 MiB, sends 1 MiB of it,
    then closes (``"close"``) or goes silent (``"stall"``). Returns (address, stop)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            head = conn.recv(4)
            (n,) = struct.unpack(">I", head)
            rid = msgpack.unpackb(conn.recv(n))[1]
            body = msgpack.packb([1, rid, None, {"data": msgpack.ExtType(1, struct.pack(">I", 4 << 20))}])
            conn.sendall(struct.pack(">I", 5 + len(body) + (4 << 20)) + b"\xc1" + struct.pack(">I", len(body)) + body)
            conn.sendall(bytes(1 << 20))
            if behaviour == "stall":
                done.wait(10)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    host, port = srv.getsockname()
    return f"{host}:{port}", done.set


@pytest.mark.parametrize("behaviour", ["close", "stall"])
def test_server_that_dies_or_stalls_mid_blob_fails_the_call(run, behaviour):
    async def main():
        address, stop = _liar(behaviour)
        client = RpcClient(default_timeout=1.0)
        bufs = [memoryview(bytearray(65536)) for _ in range(64)]

        def sink(result):
            result["data"].dest = bufs

        t0 = time.monotonic()
        try:
            with pytest.raises(FsError) as e:
                await client.call(address, "pieces", {"sizes": []}, sink=sink)
            want = Code.RPC_CONNECT if behaviour == "close" else Code.RPC_TIMEOUT
            assert e.value.code == want and time.monotonic() - t0 < 3
        finally:
            stop()
            await client.close()

    run(main())
