"""Replies with file ranges sent by ``sendfile`` beside the asyncio transport (``rawsock``):
bytes and framing as with plain blobs, big replies received with ``recvmsg_into``, and a peer
that stops reading or goes away costs the server one connection, never a hang."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest

from openinfra.fs import rawsock
from openinfra.fs.rawsock import FileRange, OpenFile
from openinfra.fs.rpc import BlobPieces, RpcClient, RpcServer, pack_frame, parse_address

pytestmark = pytest.mark.unit


class Files:
    """Serves ranges of one file as a reply blob of FileRange pieces (as storage does)."""

    def __init__(self, path: str):
        self.path = path

    async def rpc_ranges(self, ranges: list):
        f = OpenFile(self.path)
        pieces = [FileRange(f, off, n) for off, n in ranges]
        return {"data": BlobPieces(pieces), "n": len(pieces)}

    async def rpc_ping(self):
        return "pong"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a coroutine on asyncio's loop and on uvloop (the services' loop)."""
    if request.param == "asyncio":
        return asyncio.run
    uvloop = pytest.importorskip("uvloop")
    return uvloop.run


def _serve(run, path: str, loop_fn):
    async def main():
        server = RpcServer(name="files")
        server.add_service(Files(path))
        await server.start()
        try:
            await loop_fn(server)
        finally:
            await server.close()

    run(main())


def test_file_ranges_arrive_as_one_blob_with_the_file_bytes(run, tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    ranges = [[0, 65536 + 128], [1 << 20, 70_000], [5, 10], [2 << 20, 1 << 20]]
    want = b"".join(data[o:o + n] for o, n in ranges)

    async def go(server):
        client = RpcClient()
        try:
            for _ in range(3):  # one connection: frames after a direct send keep their order
                got = await asyncio.gather(client.call(server.address, "ranges", {"ranges": ranges}),
                                           client.call(server.address, "ping"),
                                           client.call(server.address, "ranges", {"ranges": ranges[2:3]}))
                assert bytes(got[0]["data"]) == want and got[0]["n"] == 4
                assert got[1] == "pong"
                assert bytes(got[2]["data"]) == data[5:15]  # under 64 KiB: joined into the body
            # into the caller's buffers (the recvmsg_into path: more than 256 KiB to come)
            bufs = [memoryview(bytearray(n)) for _, n in ranges]

            def sink(result):
                result["data"].dest = bufs

            got = await client.call(server.address, "ranges", {"ranges": ranges}, sink=sink)
            assert got["data"].nbytes == len(want) and b"".join(bytes(b) for b in bufs) == want
        finally:
            await client.close()

    _serve(run, str(path), go)


def test_file_range_past_the_end_of_its_file_drops_the_connection(run, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(100_000))

    async def go(server):
        client = RpcClient(default_timeout=5)
        try:
            with pytest.raises(Exception) as e:
                await client.call(server.address, "ranges", {"ranges": [[0, 200_000]]})
            assert getattr(e.value, "code", None) in ("RPC_CONNECT", "RPC_MALFORMED"), e.value
            assert await client.call(server.address, "ping") == "pong"  # a new connection works
        finally:
            await client.close()

    _serve(run, str(path), go)


def _request(rid: int, method: str, args: dict) -> bytes:
    return pack_frame([0, rid, method, 10.0, args])


def test_a_peer_that_stops_reading_or_goes_away_never_holds_the_server(run, tmp_path, monkeypatch):
    """A client that asks for 64 MiB and reads nothing: the direct send stalls, the server keeps
    serving others, and drops that connection after ``STALL_S``. A client killed mid-reply
    costs only its connection."""
    monkeypatch.setattr(rawsock, "STALL_S", 0.5)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: cheap to make, 64 MiB to send

    async def go(server):
        loop = asyncio.get_running_loop()
        host, port = parse_address(server.address)
        client = RpcClient(default_timeout=5)

        def stalled() -> float:
            with socket.create_connection((host, port)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(_request(1, "ranges", {"ranges": [[0, 64 << 20]]}))
                t0 = time.monotonic()
                time.sleep(1.5)  # read nothing for longer than STALL_S
                s.settimeout(5)
                got = 0
                try:
                    while True:  # what was queued, then the server's close
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            break
                        got += len(chunk)
                except ConnectionResetError:
                    pass
                assert got < 64 << 20  # the reply was cut off, not completed
                return time.monotonic() - t0

        def killed() -> None:
            s = socket.create_connection((host, port))
            s.sendall(_request(1, "ranges", {"ranges": [[0, 64 << 20]]}))
            s.recv(100_000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # reset mid-reply

        try:
            stall = loop.run_in_executor(None, stalled)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert await client.call(server.address, "ping") == "pong"  # served during the stall
            assert time.monotonic() - t0 < 0.5
            assert await stall < 5
            await loop.run_in_executor(None, killed)
            assert await client.call(server.address, "ping") == "pong"
        finally:
            await client.close()

    _serve(run, str(path), go)
