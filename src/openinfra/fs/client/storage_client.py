"""Chunk I/O against the storage chains, shared by the native client and the meta service.

Placement is arithmetic: chunk ``i`` of a file lives on chain ``layout["chains"][i % stripe]``;
writes go to the chain's head, reads to any serving replica (the tail when the replica reports a
dirty chunk). Every call retries on retriable errors (chain changed, node fenced or down, ...)
after refreshing routing info, until ``retry_s`` has passed. Writes keep their (client, channel,
sequence) across retries, so storage applies each at most once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import msgpack

from openinfra.fs.errors import RETRIABLE_CODES, Code, FsError, make_error
from openinfra.fs.routing import Routing
from openinfra.fs.rpc import BlobRef, Placed, RpcClient
from openinfra.fs.storage.service import MgmtdLink

__all__ = ["RoutingCache", "StorageClient", "chunk_chain", "retrying"]

log = logging.getLogger("openinfra.fs.client")
BATCH_READ_BYTES = 16 << 20  # the most bytes one batch_read request asks for
BATCH_WRITE_BYTES = 16 << 20  # the most bytes of ranges one write_batch request carries
BATCH_WRITE_ITEMS = 512       # the most chunks one write_batch request carries (storage takes 1024)
T = TypeVar("T")


def _segments(into) -> tuple[list[memoryview], int]:
    """``into`` (a writable buffer or a list of them) as a scatter list of byte memoryviews, and
    their total size in bytes."""
    bufs = into if isinstance(into, (list, tuple)) else [into]
    segs = []
    total = 0
    for b in bufs:
        if type(b) is memoryview and b.format == "B" and b.ndim == 1 and b.c_contiguous and not b.readonly:
            segs.append(b)  # the common case (callers that pass byte views): no new objects
            total += b.nbytes
            continue
        m = memoryview(b)
        if m.readonly:
            raise TypeError("into: expected writable buffers")
        if not m.c_contiguous:
            raise ValueError("into: expected contiguous buffers")
        segs.append(m if m.format == "B" and m.ndim == 1 else m.cast("B"))
        total += m.nbytes
    return segs, total


def _place(data, segs: list[memoryview]) -> int:
    """Bytes of one read now in ``segs``: a blob the RPC layer received there already, or a
    small reply (sent inside the msgpack body) copied in. Returns the byte count."""
    if isinstance(data, Placed):
        if data.dest is not segs:
            raise RuntimeError("reply placed into another read's buffers")
        return data.nbytes
    src = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    n = src.nbytes
    if n > sum(s.nbytes for s in segs):
        raise ValueError(f"into: {n} bytes read do not fit in {sum(s.nbytes for s in segs)} bytes of buffers")
    pos = 0
    for s in segs:
        k = min(s.nbytes, n - pos)
        if k <= 0:
            break
        s[:k] = src[pos:pos + k]
        pos += k
    return n


def _head(segs: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of scatter list ``segs`` (``n`` at most their total size)."""
    out = []
    for s in segs:
        if n <= 0:
            break
        out.append(s[:n] if s.nbytes > n else s)
        n -= s.nbytes
    if n > 0:
        raise ValueError(f"into: {sum(s.nbytes for s in segs)} bytes of buffers, {sum(s.nbytes for s in out) + n} read")
    return out


def _sink_one(segs: list[memoryview]):
    """An RPC sink that places a ``read`` reply's data blob into ``segs``."""

    def sink(result) -> None:
        if isinstance(result, dict) and type(result.get("data")) is BlobRef:
            result["data"].dest = segs

    return sink


def _reply_results(res, parsed: list, count: int, addr: str) -> list:
    """The per-read results of a packed ``batch_read`` reply: the ones the blob sink already
    unpacked (``parsed``), else unpacked here; exactly ``count`` of them or RPC_MALFORMED."""
    results = parsed[0] if parsed else None
    if results is None and type(res) is dict:
        try:
            results = msgpack.unpackb(res.get("results"))
        except Exception:
            results = None
    if type(results) is not list or len(results) != count:
        raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: {count} reads, a reply of "
                         f"{len(results) if isinstance(results, list) else type(res).__name__} results")
    return results


def _result_size(one, addr: str) -> int | None:
    """Bytes one read of a ``batch_read`` reply returned, or None for a retriable per-read error
    (left to the caller's retrying path); any other error, or a malformed result, raises."""
    if type(one) is not list or len(one) not in (2, 3):
        raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: bad result {one!r}")
    if len(one) == 2:
        if one[0] not in RETRIABLE_CODES:
            raise make_error(one[0], one[1])
        return None
    if type(one[0]) is not int or one[0] < 0:
        raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: bad result size {one[0]!r}")
    return one[0]


def chunk_chain(layout: dict, index: int) -> int:
    """The chain id holding chunk ``index`` of a file with ``layout``."""
    return layout["chains"][index % layout["stripe"]]


class RoutingCache:
    """The newest routing info fetched from mgmtd; concurrent refreshes share one request."""

    def __init__(self, mgmtd: MgmtdLink, min_interval_s: float = 0.05):
        self.mgmtd, self.min_interval_s = mgmtd, min_interval_s
        self.routing = Routing.empty()
        self._inflight: asyncio.Future | None = None
        self._last = 0.0

    async def refresh(self, force: bool = True) -> Routing:
        if not force and self.routing.version:
            return self.routing
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        wait = self.min_interval_s - (time.monotonic() - self._last)
        self._inflight = asyncio.get_running_loop().create_future()
        fut = self._inflight
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            info = await self.mgmtd.call("get_routing")
            if info["version"] >= self.routing.version:
                self.routing = Routing(info)
            fut.set_result(self.routing)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it
            raise
        finally:
            self._last = time.monotonic()
            self._inflight = None
        return self.routing


async def retrying(fn: Callable[[], Awaitable[T]], routing: RoutingCache, retry_s: float, what: str) -> T:
    """Run ``fn`` until it succeeds or a non-retriable error; refresh routing between attempts."""
    deadline = time.monotonic() + retry_s
    delay = 0.01
    while True:
        try:
            return await fn()
        except FsError as exc:
            if not exc.retriable or time.monotonic() + delay > deadline:
                raise
            log.debug("%s: retrying after %s", what, exc)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 0.5)
        try:
            await routing.refresh()
        except FsError:
            pass


class StorageClient:
    """``write_chunk`` / ``read_chunk`` / ``read_chunks`` / ``remove_chunks`` / ``truncate_chunks`` / ``file_length``."""

    def __init__(self, rpc: RpcClient, routing: RoutingCache, *, client_id: str | None = None,
                 retry_s: float = 60.0, io_timeout_s: float = 10.0, channels: int = 64):
        self.rpc, self.routing = rpc, routing
        self.client_id = client_id or uuid.uuid4().hex
        self.retry_s, self.io_timeout_s = retry_s, io_timeout_s
        self._channels: asyncio.Queue = asyncio.Queue()
        for ch in range(1, channels + 1):
            self._channels.put_nowait(ch)
        self._seq: dict[int, itertools.count] = {}
        self._addrs_of: tuple[Routing | None, dict[int, list[str]]] = (None, {})

    def _node_address(self, r: Routing, target: dict) -> str:
        addr = r.address(target["node"])
        if addr is None:
            raise FsError(Code.RPC_CONNECT, f"node {target['node']} has no address yet")
        return addr

    def _chain_head(self, chain_id: int) -> tuple[dict, str]:
        """(the chain's current routing entry, the address of its head, the first serving target):
        where a write of the chain goes now."""
        r = self.routing.routing
        chain = r.chain(chain_id)
        serving = r.serving(chain_id)
        if chain is None or not serving:
            raise FsError(Code.NO_SERVING_TARGET, f"chain {chain_id} has no serving target")
        return chain, self._node_address(r, serving[0])

    async def write_chunk(self, layout: dict, inode: int, index: int, offset: int, data: bytes,
                          op: str = "write", length: int = 0, ranges: list | None = None) -> dict:
        """Apply one update through the chain; returns ``{"version", "crc", "length"}``.
        ``op="writev"`` writes every ``(offset within the chunk, bytes)`` of ``ranges`` as one update."""
        chain_id = chunk_chain(layout, index)
        channel = await self._channels.get()
        try:
            seq = next(self._seq.setdefault(channel, itertools.count(1)))

            async def attempt():
                chain, head = self._chain_head(chain_id)
                args = dict(chain_id=chain_id, chain_version=chain["version"], inode=inode, index=index, op=op,
                            offset=offset, data=data, length=length, client=self.client_id, channel=channel, seq=seq)
                if ranges is not None:
                    args["ranges"] = ranges
                return await self.rpc.call(head, "write", args, timeout=self.io_timeout_s)

            return await retrying(attempt, self.routing, self.retry_s, f"write chunk {inode}:{index}")
        finally:
            self._channels.put_nowait(channel)

    async def write_chunks(self, layout: dict, inode: int, updates: dict[int, list]) -> dict[int, dict | Exception]:
        """Apply updates of many chunks of one file: ``updates`` maps a chunk index to its ranges
        ``[(offset within the chunk, bytes), ...]`` (applied in order, as ``writev``). The chunks of
        one chain go to its head as one ``write_batch`` (split at ``BATCH_WRITE_BYTES`` /
        ``BATCH_WRITE_ITEMS``), so each replica handles one request and one commit for all of them;
        chains in parallel.

        Returns, per chunk index, ``{"version", "crc", "length"}`` or the exception that chunk
        failed with: one chunk's failure is never reported as the others' success, nor theirs as
        its. Whole-request errors that may pass (chain changed, a replica gone) and per-chunk ones
        of that kind are retried (the request keeps its sequence number, so a chunk applied
        before a lost reply is not applied twice) until ``retry_s``."""
        by_chain: dict[int, list[int]] = {}
        for idx in sorted(updates):
            by_chain.setdefault(chunk_chain(layout, idx), []).append(idx)
        requests: list[tuple[int, list[int]]] = []
        for cid, idxs in by_chain.items():
            cur: list[int] = []
            size = 0
            for idx in idxs:
                n = sum(len(d) for _, d in updates[idx]) + 64 * len(updates[idx])
                if cur and (size + n > BATCH_WRITE_BYTES or len(cur) >= BATCH_WRITE_ITEMS):
                    requests.append((cid, cur))
                    cur, size = [], 0
                cur.append(idx)
                size += n
            if cur:
                requests.append((cid, cur))
        out: dict[int, dict | Exception] = {}

        async def one(chain_id: int, idxs: list[int]) -> None:
            left = {idx: [[off, d] for off, d in updates[idx]] for idx in idxs}
            channel = await self._channels.get()
            try:
                seq = next(self._seq.setdefault(channel, itertools.count(1)))

                async def attempt():
                    chain, head = self._chain_head(chain_id)
                    order = list(left)
                    reply = await self.rpc.call(head, "write_batch", dict(
                        chain_id=chain_id, chain_version=chain["version"], client=self.client_id, channel=channel,
                        seq=seq, items=[[inode, idx, left[idx]] for idx in order]), timeout=self.io_timeout_s)
                    res = reply.get("results") if type(reply) is dict else None
                    if type(res) is not list or len(res) != len(order):
                        raise make_error(Code.RPC_MALFORMED, f"write_batch on chain {chain_id}: {len(order)} chunks, "
                                         f"a reply of {len(res) if type(res) is list else type(reply).__name__} results")
                    again = None
                    for idx, one in zip(order, res):
                        if type(one) is list and len(one) == 3 and all(type(x) is int for x in one):
                            out[idx] = {"version": one[0], "crc": one[1], "length": one[2]}
                        elif type(one) is list and len(one) == 2 and type(one[0]) is str and type(one[1]) is str:
                            if one[0] in RETRIABLE_CODES:
                                again = again or one
                                continue  # stays in ``left``: sent again (same seq) after a routing refresh
                            out[idx] = make_error(one[0], f"chunk {inode}:{idx}: {one[1]}")
                        else:
                            out[idx] = make_error(Code.RPC_MALFORMED, f"write_batch: bad result {one!r:.80}")
                        del left[idx]
                    if again is not None:
                        raise make_error(again[0], again[1])

                try:
                    await retrying(attempt, self.routing, self.retry_s, f"write_batch of {len(idxs)} chunks of {inode}")
                except Exception as exc:  # noqa: BLE001 - reported per chunk
                    for idx in left:
                        out[idx] = exc
            finally:
                self._channels.put_nowait(channel)

        await asyncio.gather(*(one(cid, idxs) for cid, idxs in requests))
        return out

    async def read_chunk(self, layout: dict, inode: int, index: int, offset: int, length: int,
                         into=None):
        """Committed bytes of one chunk (shorter than ``length`` at the chunk's end; b"" for a hole).

        ``into``: a writable buffer, or a list of them filled in order (a scatter list), with room
        for ``length`` bytes: the bytes are received straight into it and the byte count is
        returned instead. After an error its contents are unspecified."""
        chain_id = chunk_chain(layout, index)
        tail = [False]
        segs = None if into is None else _segments(into)[0]
        sink = None if segs is None else _sink_one(segs)

        async def attempt():
            r = self.routing.routing
            serving = r.serving(chain_id)
            if not serving:
                raise FsError(Code.NO_SERVING_TARGET, f"chain {chain_id} has no serving target")
            target = serving[-1] if tail[0] else random.choice(serving)
            try:
                res = await self.rpc.call(self._node_address(r, target), "read", dict(
                    chain_id=chain_id, inode=inode, index=index, offset=offset, length=length),
                    timeout=self.io_timeout_s, sink=sink)
            except FsError as exc:
                tail[0] = exc.code == Code.CHUNK_DIRTY
                raise
            return res["data"] if segs is None else _place(res["data"], segs)

        return await retrying(attempt, self.routing, self.retry_s, f"read chunk {inode}:{index}")

    async def read_chunks(self, reads: list[tuple[dict, int, int, int, int]], into: list | None = None) -> list:
        """Many chunk reads, one ``batch_read`` request per storage node: ``reads`` holds
        ``(layout, inode, index, offset, length)`` tuples; returns their bytes in order, each as
        :meth:`read_chunk` would (short at a chunk's end, b"" for a hole).

        ``into``: one destination per read as :meth:`read_chunk` takes it (a buffer or a scatter
        list); the replies are received straight into them and the byte counts are returned.

        Each read goes to a random serving replica of its chain; reads that fail there (a dirty
        chunk, a node fenced or gone) are retried one by one through :meth:`read_chunk`, which
        follows routing changes and sends dirty reads to the tail."""
        if not isinstance(reads, (list, tuple)):
            raise TypeError(f"reads: expected a list of (layout, inode, index, offset, length), got {type(reads).__name__}")
        out: list = [None] * len(reads)
        if into is not None and len(into) != len(reads):
            raise ValueError(f"into: expected {len(reads)} destinations (one per read), got {len(into)}")
        segs = caps = None
        if into is not None:
            segs, caps = [], []
            for d in into:
                sg, cap = _segments(d)
                segs.append(sg)
                caps.append(cap)
        r = self.routing.routing
        # Per node: the reads' indexes, their [chain, inode, index, offset, length] request
        # items and their reply bytes at most (one pass; this runs for every KV block).
        groups: dict[str, tuple[list[int], list[list], list[int]]] = {}
        addrs_of: dict[int, list[str]] = {}  # per chain, its serving replicas' addresses (looked up once)
        for i, (layout, inode, index, offset, length) in enumerate(reads):
            cid = layout["chains"][index % layout["stripe"]]
            addrs = addrs_of.get(cid)
            if addrs is None:
                addrs = addrs_of[cid] = [a for a in (r.address(t["node"]) for t in r.serving(cid)) if a is not None]
            if not addrs:
                continue  # left for the one-by-one path, which waits for routing
            # a random serving replica spreads the reads (no draw for a single one)
            addr = addrs[0] if len(addrs) == 1 else random.choice(addrs)
            g = groups.get(addr)
            if g is None:
                g = groups[addr] = ([], [], [0])
            g[0].append(i)
            g[1].append([cid, inode, index, offset, length])
            n = layout["chunk_size"] - offset if length < 0 else min(length, layout["chunk_size"] - offset)
            g[2][0] += max(0, n)

        async def node_batch(addr: str, idxs: list[int], args: list[list]) -> None:
            # Packed reply: per read [nbytes, version, chunk_length] or [code, message],
            # then all bytes as one blob. With ``into`` the sink turns the sizes into one scatter
            # list (each read's bytes into its destination) before the blob arrives.
            sink = None
            parsed: list = []  # the sink's unpacked results, reused below

            def unpack(raw) -> list | None:
                try:
                    res = msgpack.unpackb(raw) if isinstance(raw, (bytes, memoryview)) else None
                except Exception:
                    return None
                return res if isinstance(res, list) else None

            if segs is not None:
                def sink(result) -> None:
                    if not isinstance(result, dict) or type(result.get("data")) is not BlobRef:
                        return
                    res, ref = unpack(result.get("results")), result["data"]
                    if res is None or len(res) != len(idxs):
                        return
                    parsed.append(res)
                    dest, total = [], 0
                    for i, one in zip(idxs, res):
                        if type(one) is list and len(one) == 3 and type(one[0]) is int and one[0] > 0:
                            n = one[0]
                            dest.extend(segs[i] if n == caps[i] else _head(segs[i], n))
                            total += n
                    if total == ref.nbytes:
                        ref.dest = dest
            try:
                res = await self.rpc.call(addr, "batch_read", {"reads": args, "packed": True},
                                          timeout=self.io_timeout_s, sink=sink)
            except FsError as exc:
                if not exc.retriable:
                    raise
                return  # the whole batch falls back to the one-by-one path
            results = _reply_results(res, parsed, len(idxs), addr)
            data = res.get("data", b"")
            placed = isinstance(data, Placed)
            if not placed:
                data = memoryview(data)
            pos = 0
            for i, one in zip(idxs, results):
                n = _result_size(one, addr)
                if n is None:
                    continue  # left for the one-by-one path
                if not placed and pos + n > data.nbytes:
                    raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results add up past the data")
                if segs is None:
                    out[i] = data[pos:pos + n]
                elif placed:
                    out[i] = n
                else:
                    out[i] = _place(data[pos:pos + n], segs[i])
                pos += n
            if placed and pos != data.nbytes:
                raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results do not add up to the data")

        # Split a node's reads into requests of at most BATCH_READ_BYTES reply bytes and 4096
        # reads (the server's limit), so a reply stays far below the RPC frame limit.
        batches: list[tuple[str, list[int], list[list]]] = []
        for addr, (idxs, args, size) in groups.items():
            if size[0] <= BATCH_READ_BYTES and len(idxs) <= 4096:
                batches.append((addr, idxs, args))
                continue
            cur: list[int] = []
            total = 0
            for k, i in enumerate(idxs):
                layout, _, _, offset, length = reads[i]
                n = layout["chunk_size"] - offset if length < 0 else min(length, layout["chunk_size"] - offset)
                if cur and (total + n > BATCH_READ_BYTES or len(cur) >= 4096):
                    batches.append((addr, cur, args[k - len(cur):k]))
                    cur, total = [], 0
                cur.append(i)
                total += max(0, n)
            batches.append((addr, cur, args[len(idxs) - len(cur):]))
        await asyncio.gather(*(node_batch(*b) for b in batches))
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            again = await asyncio.gather(*(self.read_chunk(*reads[i], into=None if segs is None else segs[i])
                                           for i in missing))
            for i, v in zip(missing, again):
                out[i] = v
        return out

    def chain_addresses(self, chain_id: int) -> list[str]:
        """Addresses of ``chain_id``'s serving replicas in the current routing (remembered per
        routing version: a batch asks for the same few chains many times)."""
        r = self.routing.routing
        if self._addrs_of[0] is not r:
            self._addrs_of = (r, {})
        amap = self._addrs_of[1]
        addrs = amap.get(chain_id)
        if addrs is None:
            addrs = amap[chain_id] = [a for a in (r.address(t["node"]) for t in r.serving(chain_id)) if a is not None]
        return addrs

    def exact_requests(self, chains: list[int], dests: list[memoryview]) -> list[tuple[str, list[int], list[int]]]:
        """:meth:`read_exact`'s requests: ``(address, read indexes, their sizes)``. Reads per chain,
        then per node (a random serving replica per read where there are several), then requests
        of at most ``BATCH_READ_BYTES`` reply bytes and 4096 reads. A chain with no serving
        replica has its reads in no request (left to the caller's retrying path)."""
        by_chain: dict[int, list[int]] = {}
        for i, c in enumerate(chains):
            lst = by_chain.get(c)
            if lst is None:
                by_chain[c] = [i]
            else:
                lst.append(i)
        by_node: dict[str, list[int]] = {}
        for c, idxs in by_chain.items():
            addrs = self.chain_addresses(c)
            if not addrs:
                continue  # left to the caller's retrying path
            if len(addrs) == 1:
                lst = by_node.get(addrs[0])
                if lst is None:
                    by_node[addrs[0]] = idxs
                else:
                    lst.extend(idxs)
            else:
                for i in idxs:
                    by_node.setdefault(random.choice(addrs), []).append(i)
        requests: list[tuple[str, list[int], list[int]]] = []
        for addr, idxs in by_node.items():
            sizes = [dests[i].nbytes for i in idxs]
            if sum(sizes) <= BATCH_READ_BYTES and len(idxs) <= 4096:
                requests.append((addr, idxs, sizes))
                continue
            start, total = 0, 0
            for j, m in enumerate(sizes):
                if j > start and (total + m > BATCH_READ_BYTES or j - start >= 4096):
                    requests.append((addr, idxs[start:j], sizes[start:j]))
                    start, total = j, 0
                total += m
            requests.append((addr, idxs[start:], sizes[start:]))
        return requests

    async def read_exact(self, chains: list[int], items: list[bytes], dests: list[memoryview]) -> list[bool | None]:
        """Batched reads whose size the caller knows (KV blocks at cached locations), with no
        per-read Python beyond a few list operations: ``items[i]`` is the msgpack encoding of one
        ``batch_read`` item ``[chain, inode, index, offset, length]`` of chain ``chains[i]``,
        ``dests[i]`` a writable byte memoryview of exactly the size that read returns when the
        bytes are there. One ``batch_read`` per storage node (split at ``BATCH_READ_BYTES``); the
        request's reads are the items joined (no per-read packing); the reply's bytes are
        received straight into ``dests``.

        Returns per read: True (``dests[i]`` holds its bytes), False (it returned another byte
        count: a hole, a chunk cut short or removed; ``dests[i]`` is untouched or holds
        unspecified bytes), or None (not read: a retriable error, on that read or its node's
        whole request; the caller goes through :meth:`read_chunk`, which retries). Raises the
        first non-retriable per-read error (a chunk failing its CRC32C, say)."""
        n = len(items)
        if len(chains) != n or len(dests) != n:
            raise ValueError(f"read_exact: {n} items, {len(chains)} chains, {len(dests)} destinations")
        out: list[bool | None] = [None] * n
        requests = self.exact_requests(chains, dests)

        async def node_batch(addr: str, idxs: list[int], want: list[int]) -> None:
            k = len(idxs)
            head = bytes((0x90 | k,)) if k < 16 else b"\xdc" + k.to_bytes(2, "big")
            parsed: list = []
            exact = [False]  # every read returned its destination's size, all received in place

            def sizes_of(res: list) -> list:
                return [one[0] if type(one) is list and len(one) == 3 else None for one in res]

            def sink(result) -> None:
                if type(result) is not dict:
                    return
                ref = result.get("data")
                if type(ref) is not BlobRef:
                    return
                try:
                    res = msgpack.unpackb(result.get("results"))
                except Exception:
                    return
                if type(res) is not list or len(res) != k:
                    return
                parsed.append(res)
                if sizes_of(res) == want:  # the common case: every read whole
                    if sum(want) == ref.nbytes:
                        ref.dest = [dests[i] for i in idxs]
                        exact[0] = True
                    return
                dest, total, cap = [], 0, ref.nbytes
                for i, one in zip(idxs, res):
                    if type(one) is list and len(one) == 3:
                        m = one[0]
                        if type(m) is not int or m <= 0:
                            continue
                        total += m
                        if total > cap:
                            return
                        d = dests[i]
                        dest.append(d if m == d.nbytes else memoryview(bytearray(m)))  # another size: scratch
                if total == cap:
                    ref.dest = dest

            try:
                res = await self.rpc.call(addr, "batch_read",
                                          {"reads": head + b"".join([items[i] for i in idxs]), "packed": True},
                                          timeout=self.io_timeout_s, sink=sink)
            except FsError as exc:
                if not exc.retriable:
                    raise
                return  # the whole request is left to the caller's retrying path
            data = res.get("data", b"") if type(res) is dict else None
            if exact[0] and isinstance(data, Placed) and data.nbytes == sum(want):
                for i in idxs:
                    out[i] = True
                return
            results = _reply_results(res, parsed, k, addr)
            placed = isinstance(data, Placed)
            if not placed:
                data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
            pos = 0
            for i, one in zip(idxs, results):
                m = _result_size(one, addr)
                if m is None:
                    continue  # None: left to the caller
                if not placed and pos + m > data.nbytes:
                    raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results add up past the data")
                d = dests[i]
                ok = m == d.nbytes
                if ok and not placed:
                    d[:] = data[pos:pos + m]
                out[i] = ok
                pos += m
            if placed and pos != data.nbytes:
                raise make_error(Code.RPC_MALFORMED, f"batch_read on {addr}: results do not add up to the data")

        if len(requests) == 1:
            await node_batch(*requests[0])
        elif requests:
            await asyncio.gather(*(node_batch(*r) for r in requests))
        return out

    async def _on_chains(self, layout: dict, method: str, args: dict) -> list[Any]:
        async def one(chain_id: int):
            async def attempt():
                r = self.routing.routing
                serving = r.serving(chain_id)
                if not serving:
                    raise FsError(Code.NO_SERVING_TARGET, f"chain {chain_id} has no serving target")
                return await self.rpc.call(self._node_address(r, serving[0]), method, dict(args, chain_id=chain_id),
                                           timeout=self.io_timeout_s)

            return await retrying(attempt, self.routing, self.retry_s, f"{method} on chain {chain_id}")

        return await asyncio.gather(*(one(c) for c in layout["chains"]))

    async def file_length(self, layout: dict, inode: int) -> int:
        """Exact length from the chains: the end of the highest chunk."""
        ends = [idx * layout["chunk_size"] + ln for res in await self._on_chains(layout, "last_chunk", {"inode": inode})
                if res for idx, ln in [res]]
        return max(ends, default=0)

    async def remove_chunks(self, layout: dict, inode: int, from_index: int = 0) -> int:
        """Remove every chunk of ``inode`` with index >= ``from_index`` (through the chains)."""
        lists = await self._on_chains(layout, "list_chunks", {"inode": inode, "from_index": from_index})
        todo = [m["index"] for lst in lists for m in lst]
        await asyncio.gather(*(self.write_chunk(layout, inode, i, 0, b"", op="remove") for i in todo))
        return len(todo)

    async def truncate_chunks(self, layout: dict, inode: int, length: int) -> None:
        """Drop the bytes of ``inode`` from ``length`` on: whole chunks removed, the boundary cut."""
        cs = layout["chunk_size"]
        boundary, cut = divmod(length, cs)
        await self.remove_chunks(layout, inode, boundary + (1 if cut else 0))
        if cut:
            lists = await self._on_chains({**layout, "chains": [chunk_chain(layout, boundary)], "stripe": 1},
                                          "list_chunks", {"inode": inode, "from_index": boundary})
            if any(m["index"] == boundary for lst in lists for m in lst):
                await self.write_chunk(layout, inode, boundary, 0, b"", op="truncate", length=cut)
