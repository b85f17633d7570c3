"""A storage node: its targets' chunk stores, the CRAQ write and read paths, re-sync of returning
targets, heartbeats to mgmtd and self-fencing.

Write (client -> head -> ... -> tail): every hop checks the chain version, takes the chunk lock,
applies the update as pending version u (the head picks u = committed + 1), forwards it to its
successor and commits once the successor acknowledged; the tail commits at once. A successor
whose committed version is not u - 1 answers STALE_UPDATE and receives the full chunk instead.
Requests carry (client, channel, seq): a retried request that was already applied returns the
first result (the dedup table commits with the chunk). ``write_batch`` does the same for many
chunks of one chain in one request per hop and one commit transaction per replica, with a result
per chunk (the write-back flush of the FUSE mount sends one per chain).

Read: any serving replica returns committed data. A chunk with a pending version waits for the
write holding its lock; a pending version left by a failed write (no lock held) is "dirty" and
the client is sent to the tail (CRAQ's apportioned queries).

Re-sync: the last serving target of a chain copies every chunk that differs (and deletes every
chunk it lacks) to each syncing target, under the chunk locks, then tells mgmtd.

Fencing: a node that has not reached mgmtd for ``fence_s`` (T/2) rejects all I/O; mgmtd fails it
after T, so no client can be served by a node the cluster has already replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from openinfra.fs.errors import Code, FsError
from openinfra.fs.routing import Routing, TargetState
from openinfra.fs.rpc import SLOW, BlobPieces, RpcClient, RpcServer
from openinfra.fs.storage.chunk_store import ChunkStore

__all__ = ["StorageConfig", "StorageNode", "MgmtdLink"]

log = logging.getLogger("openinfra.fs.storage")


MAX_WRITEV_RANGES = 4096


def _check_ranges(ranges) -> list[tuple[int, bytes]]:
    """``writev``'s ``ranges`` from the wire: a non-empty list of ``[offset >= 0, bytes]``."""
    if not isinstance(ranges, (list, tuple)) or not ranges:
        raise ValueError("ranges: expected a non-empty list of [offset, data] for op writev")
    if len(ranges) > MAX_WRITEV_RANGES:
        raise ValueError(f"ranges: at most {MAX_WRITEV_RANGES} per writev, got {len(ranges)}")
    out = []
    for r in ranges:
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or isinstance(r[0], bool) or not isinstance(r[0], int)
                or r[0] < 0 or not isinstance(r[1], (bytes, bytearray, memoryview))):
            raise ValueError(f"ranges: expected [offset >= 0, bytes] items, got {r!r:.80}")
        out.append((r[0], bytes(r[1])))
    return out


MAX_BATCH_ITEMS = 1024
MAX_BATCH_RANGES = 16384


def _int_ge(v, minimum: int) -> bool:
    return type(v) is int and v >= minimum


def _check_items(items) -> list[tuple]:
    """``write_batch``'s ``items`` from the wire: ``[inode, index, ranges]`` from a client, or
    ``[inode, index, ranges, update_version, crc, full]`` from a predecessor (``ranges`` None when
    ``full``, the whole chunk, is given). Distinct chunks, all items of one kind. Returns
    ``(inode, index, ranges, update_version, crc, full)`` tuples."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("items: expected a non-empty list of [inode, index, ranges] for write_batch")
    if len(items) > MAX_BATCH_ITEMS:
        raise ValueError(f"items: at most {MAX_BATCH_ITEMS} per write_batch, got {len(items)}")
    out, seen, nranges = [], set(), 0
    hop = None
    for i, it in enumerate(items):
        if not isinstance(it, (list, tuple)) or len(it) not in (3, 6):
            raise ValueError(f"items[{i}]: expected [inode, index, ranges] or [inode, index, ranges, "
                             f"update_version, crc, full], got {it!r:.80}")
        inode, index, ranges = it[0], it[1], it[2]
        u, crc, full = (it[3], it[4], it[5]) if len(it) == 6 else (None, None, None)
        if not _int_ge(inode, 0) or not _int_ge(index, 0):
            raise ValueError(f"items[{i}]: inode and index must be ints >= 0, got {inode!r}, {index!r}")
        if (inode, index) in seen:
            raise ValueError(f"items[{i}]: chunk {inode}:{index} appears twice in one write_batch")
        seen.add((inode, index))
        if u is not None and not _int_ge(u, 1):
            raise ValueError(f"items[{i}]: update_version must be an int >= 1 or None, got {u!r}")
        if crc is not None and not _int_ge(crc, 0):
            raise ValueError(f"items[{i}]: crc must be an int >= 0 or None, got {crc!r}")
        if hop is None:
            hop = u is not None
        elif hop != (u is not None):
            raise ValueError(f"items[{i}]: every item of a write_batch has an update_version, or none has")
        if full is not None:
            if u is None or not isinstance(full, (bytes, bytearray, memoryview)):
                raise ValueError(f"items[{i}]: full must be bytes, and only with an update_version")
            ranges = None
        else:
            try:
                ranges = _check_ranges(ranges)
            except ValueError as exc:
                raise ValueError(f"items[{i}]: {exc}") from None
            nranges += len(ranges)
            if nranges > MAX_BATCH_RANGES:
                raise ValueError(f"items: at most {MAX_BATCH_RANGES} ranges per write_batch")
        out.append((inode, index, ranges, u, crc, full))
    return out


def _batch_record(result: bytes) -> dict[tuple[int, int], list] | None:
    """The per-chunk results of a ``write_batch`` dedup record, or None if ``result`` is not one."""
    try:
        rec = msgpack.unpackb(result)
    except Exception:
        return None
    if type(rec) is not dict or type(rec.get("batch")) is not list:
        return None
    return {(r[0], r[1]): [r[2], r[3], r[4]] for r in rec["batch"]}


def _item_error(exc: BaseException) -> list:
    """``[code, message]`` of one chunk's failure in a ``write_batch`` reply."""
    if isinstance(exc, FsError):
        return [exc.code, exc.message]
    if isinstance(exc, (ValueError, TypeError)):
        return [Code.RPC_BAD_ARGS, str(exc)]
    log.error("write_batch: a chunk update failed: %r", exc)
    return [Code.INTERNAL, f"{type(exc).__name__}: {exc}"]


def _batch_results(reply, count: int) -> list[list]:
    """The per-chunk results of a ``write_batch`` reply: ``count`` of ``[version, crc, length]``
    (ints) or ``[code, message]`` (strs), else RPC_MALFORMED."""
    res = reply.get("results") if type(reply) is dict else None
    if type(res) is not list or len(res) != count:
        raise FsError(Code.RPC_MALFORMED, f"write_batch: expected {count} results, got "
                      f"{len(res) if type(res) is list else type(reply).__name__}")
    for r in res:
        if not ((type(r) is list and len(r) == 3 and all(type(x) is int for x in r))
                or (type(r) is list and len(r) == 2 and type(r[0]) is str and type(r[1]) is str)):
            raise FsError(Code.RPC_MALFORMED, f"write_batch: bad result {r!r:.80}")
    return res


@dataclass
class StorageConfig:
    node_id: int
    targets: dict[int, str]            # target id -> directory
    mgmtd: list[str]                   # mgmtd addresses
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_s: float = 10.0
    fence_s: float = 15.0              # T/2
    fsync: bool = True
    forward_timeout_s: float = 10.0

    def __post_init__(self):
        if not isinstance(self.node_id, int) or self.node_id <= 0:
            raise ValueError(f"node_id: expected a positive int, got {self.node_id!r}")
        if not self.targets:
            raise ValueError("targets: a storage node needs at least one target")
        if not self.mgmtd:
            raise ValueError("mgmtd: expected at least one mgmtd address")
        if self.fence_s <= self.heartbeat_s:
            raise ValueError("fence_s must exceed heartbeat_s")


class MgmtdLink:
    """Calls the primary mgmtd, finding it among ``addresses`` (NOT_PRIMARY names the holder)."""

    def __init__(self, rpc: RpcClient, addresses: list[str], timeout: float = 2.0):
        self.rpc, self.addresses, self.timeout = rpc, list(addresses), timeout
        self.primary: str | None = None

    async def call(self, method: str, args: dict | None = None, timeout: float | None = None):
        order = ([self.primary] if self.primary else []) + [a for a in self.addresses if a != self.primary]
        last: Exception | None = None
        for addr in order:
            try:
                result = await self.rpc.call(addr, method, args or {}, timeout=timeout or self.timeout)
                self.primary = addr
                return result
            except FsError as exc:
                if exc.code not in (Code.NOT_PRIMARY, Code.RPC_CONNECT, Code.RPC_TIMEOUT):
                    raise
                last = exc
        self.primary = None
        raise last if last else FsError(Code.NOT_PRIMARY, "no mgmtd address")


class StorageNode:
    """``await StorageNode(cfg).start()``; the process serves until :meth:`stop`."""

    def __init__(self, cfg: StorageConfig, server: RpcServer | None = None, metrics=None):
        self.cfg = cfg
        self.incarnation = uuid.uuid4().hex
        self.stores = {tid: ChunkStore(Path(p), fsync=cfg.fsync) for tid, p in cfg.targets.items()}
        self.server = server or RpcServer(cfg.host, cfg.port, name=f"storage-{cfg.node_id}")
        self.server.add_service(self)
        self.rpc = RpcClient(default_timeout=cfg.forward_timeout_s, connections_per_address=4)
        self.mgmtd = MgmtdLink(self.rpc, cfg.mgmtd)
        self.metrics = metrics
        # Counter children looked up once: labels() costs ~15 us, paid on every read otherwise.
        self._bytes = ({d: metrics.bytes.labels(direction=d) for d in ("read", "write")}
                       if metrics is not None else None)
        self.routing = Routing.empty()
        self._targets_of: Routing | None = None  # the routing that _targets was computed from
        self._targets: dict[int, tuple[dict, dict]] = {}
        self._acked_version = -1     # routing version mgmtd reported after seeing this incarnation
        self._last_ok = 0.0          # monotonic time of the last successful heartbeat
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._syncs: dict[tuple, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._routing_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> str:
        await self.server.start()
        self._tasks.append(asyncio.ensure_future(self._heartbeat_loop()))
        return self.address

    async def stop(self) -> None:
        for t in self._tasks + list(self._syncs.values()):
            t.cancel()
        await self.server.close()
        await self.rpc.close()
        for s in self.stores.values():
            s.close()

    # --- membership ----------------------------------------------------------------------------

    @property
    def fenced(self) -> bool:
        return (self._acked_version < 0 or time.monotonic() - self._last_ok > self.cfg.fence_s
                or self.routing.version < self._acked_version)

    async def _heartbeat_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                reply = await self.mgmtd.call("heartbeat", {
                    "node_id": self.cfg.node_id, "node_type": "storage", "address": self.address,
                    "incarnation": self.incarnation, "targets": sorted(self.stores),
                    "metrics": getattr(self.metrics, "address", "") or ""},
                    timeout=max(0.2, self.cfg.heartbeat_s))
                if reply["routing_version"] > self.routing.version:
                    await self.refresh_routing()
                self._acked_version = max(self._acked_version, reply["routing_version"])
                self._last_ok = t0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            if self.metrics is not None:
                self.metrics.gauge.labels(name="fenced").set(1 if self.fenced else 0)
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def refresh_routing(self) -> None:
        async with self._routing_lock:
            info = await self.mgmtd.call("get_routing")
            if info["version"] >= self.routing.version:
                self.routing = Routing(info)
                self._start_syncs()

    def _check_fence(self) -> None:
        if self.fenced:
            raise FsError(Code.FENCED, f"storage node {self.cfg.node_id} cannot confirm its membership with mgmtd")

    async def _chain(self, chain_id: int, chain_version: int | None) -> tuple[dict, dict, list[dict]]:
        """(chain, this node's target in it, write targets); checks the chain version."""
        chain = self.routing.chain(chain_id)
        if chain_version is not None and (chain is None or chain["version"] < chain_version):
            try:
                await self.refresh_routing()
            except FsError:
                pass
            chain = self.routing.chain(chain_id)
        if chain is None:
            raise FsError(Code.CHAIN_VERSION_MISMATCH, f"chain {chain_id} unknown on node {self.cfg.node_id}")
        if chain_version is not None and chain["version"] != chain_version:
            raise FsError(Code.CHAIN_VERSION_MISMATCH,
                          f"chain {chain_id}: request at version {chain_version}, node at {chain['version']}")
        mine = [t for t in chain["targets"] if t["id"] in self.stores]
        if not mine:
            raise FsError(Code.TARGET_NOT_SERVING, f"node {self.cfg.node_id} holds no target of chain {chain_id}")
        return chain, mine[0], [t for t in chain["targets"] if t["state"] in TargetState.WRITE]

    def _read_target(self, chain_id: int) -> tuple[dict, dict]:
        """(chain, this node's target in it) for a read: what :meth:`_chain` returns without a
        version check, remembered per routing version (a batch of reads asks for the same few
        chains thousands of times)."""
        routing = self.routing
        if self._targets_of is not routing:
            self._targets_of, self._targets = routing, {}
        hit = self._targets.get(chain_id)
        if hit is None:
            chain = routing.chain(chain_id)
            if chain is None:
                raise FsError(Code.CHAIN_VERSION_MISMATCH, f"chain {chain_id} unknown on node {self.cfg.node_id}")
            mine = [t for t in chain["targets"] if t["id"] in self.stores]
            if not mine:
                raise FsError(Code.TARGET_NOT_SERVING, f"node {self.cfg.node_id} holds no target of chain {chain_id}")
            hit = self._targets[chain_id] = (chain, mine[0])
        return hit

    def _lock(self, target_id: int, inode: int, index: int) -> asyncio.Lock:
        key = (target_id, inode, index)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
            if len(self._locks) > 100_000:  # forget idle locks
                for k in [k for k, v in self._locks.items() if not v.locked()][:50_000]:
                    del self._locks[k]
        return lock

    # --- CRAQ write path -----------------------------------------------------------------------

    async def rpc_write(self, chain_id: int, chain_version: int, inode: int, index: int, op: str = "write",
                        offset: int = 0, data: bytes = b"", length: int = 0, client: str = "", channel: int = 0,
                        seq: int = 0, update_version: int | None = None, full: bytes | None = None,
                        crc: int | None = None, ranges: list | None = None) -> dict:
        """Apply one chunk update. Client requests omit ``update_version`` and must reach the head.
        ``op``: ``write`` (``data`` at ``offset``), ``writev`` (every ``[offset, data]`` of
        ``ranges``, in order, as one update: one copy-on-write of the chunk per replica and only
        the ranges' bytes down the chain), ``truncate`` (to ``length``), ``remove``.
        Returns ``{"version", "crc", "length"}``."""
        self._check_fence()
        if op not in ("write", "writev", "truncate", "remove"):
            raise ValueError(f"op: expected write, writev, truncate or remove, got {op!r}")
        if inode < 0 or index < 0 or offset < 0 or length < 0:
            raise ValueError("inode, index, offset and length must be >= 0")
        if op == "writev" and full is None:  # (a resend of the whole chunk to a stale replica has none)
            ranges = _check_ranges(ranges)
        chain, me, wchain = await self._chain(chain_id, chain_version)
        if me["state"] not in TargetState.WRITE:
            raise FsError(Code.TARGET_NOT_SERVING, f"target {me['id']} is {me['state']}")
        pos = next(i for i, t in enumerate(wchain) if t["id"] == me["id"])
        if update_version is None and (pos != 0 or me["state"] != TargetState.SERVING):
            raise FsError(Code.NOT_HEAD, f"target {me['id']} is not the head of chain {chain_id}")
        store = self.stores[me["id"]]
        async with self._lock(me["id"], inode, index):
            if client and update_version is None:
                prior = store.dedup_get(client, channel)
                if prior is not None and prior[0] == seq:
                    return msgpack.unpackb(prior[1])  # a retry of an applied request
                if prior is not None and prior[0] > seq:
                    raise FsError(Code.EINVAL, f"channel {channel}: sequence {seq} is older than the last applied")
            meta = store.get(inode, index)
            current = meta.version if meta else 0
            successor = wchain[pos + 1] if pos + 1 < len(wchain) else None
            if op == "remove":
                if successor is not None:
                    await self._forward(successor, dict(chain_id=chain_id, chain_version=chain["version"], inode=inode,
                                                        index=index, op="remove", client=client, channel=channel,
                                                        seq=seq, update_version=current + 1))
                result = {"version": 0, "crc": 0, "length": 0}
                await store.remove(inode, index, self._dedup(client, channel, seq, result))
                return result
            if update_version is None:
                u = current + 1
            else:
                u = update_version
                if full is None and current == u and crc is not None and meta.crc == crc:
                    # This very update committed here before its acknowledgement was lost.
                    return {"version": current, "crc": meta.crc, "length": meta.length}
                if full is None and current != u - 1:
                    # Behind, ahead, or the same version with other bytes (a different update got
                    # that number after an aborted one): the predecessor sends the whole chunk.
                    raise FsError(Code.STALE_UPDATE, f"chunk {inode}:{index} at v{current}, update is v{u}")
            # A copy is written and synced while the update travels down the chain (commit waits for it).
            content, crc = await store.prepare(inode, index, u, op, offset, data, length, full, ranges=ranges,
                                               overlap=successor is not None)
            # (None: an in-place update, nothing copied; the whole content is built only for a resend)
            new_length = len(content) if content is not None else store.get(inode, index).pending_length
            if successor is not None:
                args = dict(chain_id=chain_id, chain_version=chain["version"], inode=inode, index=index, op=op,
                            offset=offset, data=data, length=length, client=client, channel=channel, seq=seq,
                            update_version=u, crc=crc)
                if op == "writev":
                    args["ranges"] = ranges
                try:
                    try:
                        await self._forward(successor, args)
                    except FsError as exc:
                        if exc.code != Code.STALE_UPDATE:
                            raise
                        if content is None:
                            content = await store.pending_content(inode, index)
                        args.update(full=content, data=b"", ranges=None)
                        await self._forward(successor, args)
                except FsError:
                    store.abort(inode, index)  # never acknowledged: leave the committed version
                    raise
            result = {"version": u, "crc": crc, "length": new_length}
            await store.commit(inode, index, u, self._dedup(client, channel, seq, result))
        if self._bytes is not None and op in ("write", "writev"):
            self._bytes["write"].inc(len(data) if op == "write" else sum(len(d) for _, d in ranges))
        return result

    async def rpc_write_batch(self, chain_id: int, chain_version: int, items: list, client: str = "",
                              channel: int = 0, seq: int = 0) -> dict:
        """Apply updates of many chunks of one chain as one request (a write-back flush): one
        request per hop and one commit transaction per replica for all of them.

        ``items``: ``[[inode, index, ranges], ...]`` from a client (``ranges`` as ``writev``'s:
        ``[[offset, bytes], ...]`` within the chunk, applied in order), distinct chunks, at most
        ``MAX_BATCH_ITEMS``. Each chunk's update is what ``write`` (one range) or ``writev`` would
        do, with its own version (committed + 1 at the head), CRC32C check and chain-replication
        steps; the batch travels down the chain as one request (items then carry their
        ``update_version`` and ``crc``; a successor that answers STALE_UPDATE for some receives their
        whole chunks). A chunk that fails (a corrupt piece, a successor's per-chunk error) is
        reported as failed and aborted on this replica; the others still commit. A failure of the
        whole forward (successor gone, chain changed) fails the request; nothing of it is
        committed here then.

        ``client``/``channel``/``seq``: as for ``write``; the dedup record of a batch holds each
        committed chunk's result, so a retry with the same ``seq`` (all or some of the chunks)
        returns those and applies only the rest.

        Returns ``{"results": [...]}``, one per item in order: ``[version, crc, length]`` or
        ``[code, message]``."""
        self._check_fence()
        items = _check_items(items)
        if type(client) is not str or not _int_ge(channel, 0) or not _int_ge(seq, 0):
            raise ValueError("client must be a str, channel and seq ints >= 0")
        hop = items[0][3] is not None
        chain, me, wchain = await self._chain(chain_id, chain_version)
        if me["state"] not in TargetState.WRITE:
            raise FsError(Code.TARGET_NOT_SERVING, f"target {me['id']} is {me['state']}")
        pos = next(i for i, t in enumerate(wchain) if t["id"] == me["id"])
        if not hop and (pos != 0 or me["state"] != TargetState.SERVING):
            raise FsError(Code.NOT_HEAD, f"target {me['id']} is not the head of chain {chain_id}")
        store = self.stores[me["id"]]
        successor = wchain[pos + 1] if pos + 1 < len(wchain) else None
        results: list = [None] * len(items)
        async with contextlib.AsyncExitStack() as held:
            for key in sorted((it[0], it[1]) for it in items):  # one order for every request: no deadlock
                await held.enter_async_context(self._lock(me["id"], *key))
            done: dict[tuple[int, int], list] = {}  # chunk -> result already committed under this seq
            record = bool(client)  # write this request's dedup record (not over a newer one at a hop)
            if client:
                prior = store.dedup_get(client, channel)
                if prior is not None and prior[0] > seq:
                    if not hop:
                        raise FsError(Code.EINVAL, f"channel {channel}: sequence {seq} is older than the last applied")
                    record = False
                elif prior is not None and prior[0] == seq:
                    rec = _batch_record(prior[1])
                    if rec is None and not hop:
                        raise FsError(Code.EINVAL, f"channel {channel}: sequence {seq} was applied to a single write")
                    done = rec or {}
            todo: list[int] = []
            for i, (inode, index, ranges, u, crc, full) in enumerate(items):
                hit = done.get((inode, index))
                if hit is not None and not hop:
                    results[i] = hit  # a retry of an applied chunk
                    continue
                meta = store.get(inode, index)
                current = meta.version if meta else 0
                if u is None:
                    u = current + 1
                elif full is None and current == u and crc is not None and meta.crc == crc:
                    results[i] = [current, meta.crc, meta.length]  # committed here before its ack was lost
                    continue
                elif full is None and current != u - 1:
                    results[i] = [Code.STALE_UPDATE, f"chunk {inode}:{index} at v{current}, update is v{u}"]
                    continue
                items[i] = (inode, index, ranges, u, crc, full)
                todo.append(i)

            async def prepare(i: int):
                inode, index, ranges, u, _, full = items[i]
                if full is not None:
                    return await store.prepare(inode, index, u, "write", full=full, overlap=True)
                if len(ranges) == 1:
                    return await store.prepare(inode, index, u, "write", ranges[0][0], ranges[0][1], overlap=True)
                return await store.prepare(inode, index, u, "writev", ranges=ranges, overlap=True)

            prepared = await asyncio.gather(*(prepare(i) for i in todo), return_exceptions=True)
            ok: dict[int, tuple] = {}  # item -> (content or None, crc): pending here
            for i, r in zip(todo, prepared):
                if isinstance(r, BaseException):
                    if isinstance(r, asyncio.CancelledError):
                        raise r
                    results[i] = _item_error(r)
                else:
                    ok[i] = r
            try:
                if successor is not None and ok:
                    await self._forward_batch(successor, chain_id, chain, items, ok, results, store, client, channel,
                                              seq)
                for i in list(ok):
                    inode, index, _, u, _, _ = items[i]
                    try:
                        await store.written(inode, index, u)
                    except Exception as exc:  # this chunk's file write failed: the others still commit
                        store.abort(inode, index)
                        del ok[i]
                        results[i] = _item_error(exc)
            except BaseException:
                for i in ok:
                    store.abort(items[i][0], items[i][1])  # never acknowledged: leave the committed versions
                raise
            # (from here on no abort: a commit cancelled while its transaction runs still lands)
            for i, (content, crc) in ok.items():
                inode, index, _, u, _, _ = items[i]
                results[i] = [u, crc, len(content) if content is not None else store.get(inode, index).pending_length]
            if ok:
                dedup = None
                if record:
                    rec = dict(done)
                    for i, r in enumerate(results):
                        if len(r) == 3:
                            rec[(items[i][0], items[i][1])] = r
                    dedup = (client, channel, seq, msgpack.packb({"batch": [[k[0], k[1], *v] for k, v in rec.items()]}))
                await store.commit_many([(items[i][0], items[i][1], items[i][3]) for i in ok], dedup)
        if self._bytes is not None:
            self._bytes["write"].inc(sum(len(d) for i in ok for _, d in (items[i][2] or ())))
        return {"results": results}

    async def _forward_batch(self, successor: dict, chain_id: int, chain: dict, items: list, ok: dict,
                             results: list, store: ChunkStore, client: str, channel: int, seq: int) -> None:
        """Send the pending chunks ``ok`` (item -> (content, crc)) down the chain as one
        ``write_batch``; chunks the successor rejects as STALE_UPDATE go again whole. A chunk the
        successor fails leaves ``ok`` (aborted here, its error in ``results``); a failure of the
        whole first request raises."""
        order = list(ok)
        args = dict(chain_id=chain_id, chain_version=chain["version"], client=client, channel=channel, seq=seq)
        args["items"] = [[items[i][0], items[i][1], items[i][2], items[i][3], ok[i][1], items[i][5]] for i in order]
        reply = await self._forward(successor, args, "write_batch")
        got = _batch_results(reply, len(order))
        stale = []
        for i, r in zip(order, got):
            if len(r) == 3:
                continue  # committed downstream
            if r[0] == Code.STALE_UPDATE and items[i][5] is None:
                stale.append(i)
                continue
            store.abort(items[i][0], items[i][1])
            del ok[i]
            results[i] = [r[0], r[1]]

        async def resend(i: int) -> None:
            # one chunk per request: a whole chunk may be up to 64 MiB (the frame limit is ~72)
            inode, index, _, u, _, _ = items[i]
            content = ok[i][0] if ok[i][0] is not None else await store.pending_content(inode, index)
            one = dict(args, items=[[inode, index, None, u, ok[i][1], content]])
            r = _batch_results(await self._forward(successor, one, "write_batch"), 1)[0]
            if len(r) != 3:
                raise FsError(r[0], r[1])

        outcome = await asyncio.gather(*(resend(i) for i in stale), return_exceptions=True)
        for i, r in zip(stale, outcome):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                store.abort(items[i][0], items[i][1])
                del ok[i]
                results[i] = _item_error(r)

    @staticmethod
    def _dedup(client: str, channel: int, seq: int, result: dict):
        return (client, channel, seq, msgpack.packb(result)) if client else None

    async def _forward(self, target: dict, args: dict, method: str = "write") -> dict:
        addr = self.routing.address(target["node"])
        if addr is None:
            raise FsError(Code.RPC_CONNECT, f"no address for node {target['node']}")
        return await self.rpc.call(addr, method, args, timeout=self.cfg.forward_timeout_s)

    # --- read path -----------------------------------------------------------------------------

    async def rpc_read(self, chain_id: int, inode: int, index: int, offset: int = 0, length: int = -1,
                       chain_version: int | None = None) -> dict:
        """Committed bytes of one chunk: ``{"data", "version", "chunk_length"}`` (empty data and
        version 0 for a chunk never written: a hole)."""
        self._check_fence()
        data, version, chunk_length = await self._read_one(chain_id, inode, index, offset, length)
        return {"data": data, "version": version, "chunk_length": chunk_length}

    def fast_read(self, chain_id: int, inode: int, index: int, offset: int = 0, length: int = -1,
                  chain_version: int | None = None):
        """:meth:`rpc_read` served in the RPC server's read loop (no task, no loop turn) when it
        needs no waiting: a small read of a committed chunk with no pending version on a serving
        target (:meth:`_read_now`, the same checks and CRC32C verification as :meth:`_read_one`).
        Everything else (holes, pending writes, big reads, bad arguments) returns SLOW and takes
        :meth:`rpc_read`."""
        self._check_fence()
        if type(chain_id) is not int or type(inode) is not int or type(index) is not int \
                or type(offset) is not int or type(length) is not int:
            return SLOW
        hit = self._read_now(chain_id, inode, index, offset, length)
        if hit is None:
            return SLOW
        data, version, chunk_length = hit
        if self._bytes is not None:
            self._bytes["read"].inc(len(data))
        return {"data": data, "version": version, "chunk_length": chunk_length}

    async def rpc_batch_read(self, reads: list, packed: bool = False) -> list | dict:
        """Many reads in one request (3FS's batched read: one request per storage node per batch).

        ``reads``: ``[[chain_id, inode, index, offset, length], ...]`` (at most 4096), or that list
        as msgpack bytes (the KV client joins cached per-block encodings). Returns one
        entry per read, in order: ``{"data", "version", "chunk_length"}`` as :meth:`rpc_read`, or
        ``{"code", "message"}`` for a read that failed (the others are still served), so the
        client retries only the failed ones (a dirty chunk at the tail, say).

        ``packed``: reply ``{"data": blob, "results": msgpack bytes}`` instead: ``results``
        unpacks to one entry per read, ``[nbytes, version, chunk_length]`` or ``[code, message]``,
        and ``data`` holds the bytes of the reads that succeeded back to back (sent as one blob
        without joining them). The client knows from ``results`` where each read's bytes go
        before they arrive; there is no per-read map or blob marker to build and parse, and the
        RPC layer's blob scan does not walk thousands of small lists (they travel as bytes)."""
        self._check_fence()
        if isinstance(reads, (bytes, memoryview)):  # the items packed by the client (a KV batch)
            try:
                reads = msgpack.unpackb(reads)
            except Exception:
                raise ValueError("reads: packed reads are not msgpack") from None
        if not isinstance(reads, list) or len(reads) > 4096:
            raise ValueError("reads: expected a list of at most 4096 [chain_id, inode, index, offset, length]")
        if type(packed) is not bool:
            raise ValueError(f"packed: expected a bool, got {packed!r}")
        if packed:
            return await self._batch_read_packed(reads)
        results, pieces = [], []
        nbytes = 0
        for i, r in enumerate(reads):
            if (type(r) is not list or len(r) != 5 or type(r[0]) is not int or type(r[1]) is not int
                    or type(r[2]) is not int or type(r[3]) is not int or type(r[4]) is not int):
                raise ValueError(f"reads[{i}]: expected [chain_id, inode, index, offset, length] ints, got {r!r}")
            try:
                hit = self._read_now(*r)
                if hit is None:
                    data, version, chunk_length = await self._read_one(*r, count=False)
                else:
                    data, version, chunk_length = hit
            except FsError as exc:
                results.append({"code": exc.code, "message": exc.message} if not packed else [exc.code, exc.message])
                continue
            except ValueError as exc:
                msg = f"reads[{i}]: {exc}"
                results.append({"code": Code.RPC_BAD_ARGS, "message": msg} if not packed else [Code.RPC_BAD_ARGS, msg])
                continue
            nbytes += len(data)
            if packed:
                results.append([len(data), version, chunk_length])
                if data:
                    pieces.append(data)
            else:
                results.append({"data": data, "version": version, "chunk_length": chunk_length})
        if self._bytes is not None:
            self._bytes["read"].inc(nbytes)  # once per batch: a metric update costs ~10 us
        if packed:
            return {"data": BlobPieces(pieces, nbytes), "results": msgpack.packb(results)}
        return results

    def fast_batch_read(self, reads, packed: bool = False):
        """:meth:`rpc_batch_read` served in the RPC server's read loop (no task, no timeout
        handle, no loop turn) when it needs no waiting: a packed batch (a KV batch, say) whose
        reads are all small reads of committed chunks with no pending version on serving targets
        (:meth:`ChunkStore.read_now`: the same reads and CRC32C checks as
        :meth:`_batch_read_packed`, a failing check a per-read error as there). Anything else
        (a read that would wait, bad arguments) returns SLOW, having changed nothing, and takes
        :meth:`rpc_batch_read`."""
        self._check_fence()
        if packed is not True:
            return SLOW
        if type(reads) is bytes:
            try:
                reads = msgpack.unpackb(reads)
            except Exception:
                return SLOW
        if type(reads) is not list or len(reads) > 4096:
            return SLOW
        results, pieces = [], []
        nbytes = 0
        stores: dict[int, ChunkStore | None] = {}
        serving = TargetState.SERVING
        for r in reads:
            if type(r) is not list or len(r) != 5:
                return SLOW
            chain_id, inode, index, offset, length = r
            if (type(chain_id) is not int or type(inode) is not int or type(index) is not int
                    or type(offset) is not int or type(length) is not int
                    or inode < 0 or index < 0 or offset < 0):
                return SLOW
            store = stores.get(chain_id, False)
            if store is False:
                try:
                    _, me = self._read_target(chain_id)
                except FsError:
                    return SLOW
                store = stores[chain_id] = self.stores[me["id"]] if me["state"] == serving else None
            if store is None:
                return SLOW
            meta = store.get(inode, index)
            if meta is None or meta.pending_version is not None or not meta.version or offset >= meta.length:
                return SLOW
            try:
                data = store.read_now(meta, offset, 2**62 if length < 0 else length)
            except FsError as exc:
                results.append([exc.code, exc.message])
                continue
            if data is None:
                return SLOW
            n = len(data)
            nbytes += n
            results.append([n, meta.version, meta.length])
            if n:
                pieces.append(data)
        if self._bytes is not None:
            self._bytes["read"].inc(nbytes)
        return {"data": BlobPieces(pieces, nbytes), "results": msgpack.packb(results)}

    async def _batch_read_packed(self, reads: list) -> dict:
        """:meth:`rpc_batch_read` with ``packed``, as one loop: the serving store of each chain
        is looked up once per batch (again after any ``await``), and a small read of a committed
        chunk is :meth:`ChunkStore.read_now` right here (``pread`` and, for whole chunks and
        reads to the end of a small chunk, the CRC32C check); everything else (holes, pending
        versions, big reads, a target not serving) takes :meth:`_read_one`, as before."""
        results, pieces = [], []
        nbytes = 0
        stores: dict[int, ChunkStore | None] = {}
        serving = TargetState.SERVING
        for i, r in enumerate(reads):
            if type(r) is not list or len(r) != 5:
                raise ValueError(f"reads[{i}]: expected [chain_id, inode, index, offset, length] ints, got {r!r}")
            chain_id, inode, index, offset, length = r
            if (type(chain_id) is not int or type(inode) is not int or type(index) is not int
                    or type(offset) is not int or type(length) is not int):
                raise ValueError(f"reads[{i}]: expected [chain_id, inode, index, offset, length] ints, got {r!r}")
            data = None
            store = stores.get(chain_id, False)
            if store is False:
                try:
                    _, me = self._read_target(chain_id)
                    store = self.stores[me["id"]] if me["state"] == serving else None
                except FsError:
                    store = None
                stores[chain_id] = store
            try:
                if store is not None and inode >= 0 and index >= 0 and offset >= 0:
                    meta = store.get(inode, index)
                    if (meta is not None and meta.pending_version is None and meta.version
                            and offset < meta.length):
                        data = store.read_now(meta, offset, 2**62 if length < 0 else length)
                        if data is not None:
                            version, chunk_length = meta.version, meta.length
                if data is None:
                    data, version, chunk_length = await self._read_one(chain_id, inode, index, offset, length,
                                                                       count=False)
                    stores.clear()  # routing may have changed while it waited
            except FsError as exc:
                results.append([exc.code, exc.message])
                continue
            except ValueError as exc:
                results.append([Code.RPC_BAD_ARGS, f"reads[{i}]: {exc}"])
                continue
            n = len(data)
            nbytes += n
            results.append([n, version, chunk_length])
            if n:
                pieces.append(data)
        if self._bytes is not None:
            self._bytes["read"].inc(nbytes)  # once per batch: a metric update costs ~10 us
        return {"data": BlobPieces(pieces, nbytes), "results": msgpack.packb(results)}

    def _read_now(self, chain_id: int, inode: int, index: int, offset: int, length: int) -> tuple | None:
        """The common batched read, with no coroutine per read: a small read of a committed
        chunk with no pending version, on a serving target. Returns what :meth:`_read_one`
        returns, or None for everything else (holes, pending writes, big reads, errors), which
        then takes :meth:`_read_one`. Raises only a chunk's CRC32C mismatch."""
        if inode < 0 or index < 0 or offset < 0:
            return None
        try:
            _, me = self._read_target(chain_id)
        except FsError:
            return None
        if me["state"] != TargetState.SERVING:
            return None
        store = self.stores[me["id"]]
        meta = store.get(inode, index)
        if meta is None or meta.pending_version is not None or meta.version == 0 or offset >= meta.length:
            return None
        data = store.read_now(meta, offset, 2**62 if length < 0 else length)
        return None if data is None else (data, meta.version, meta.length)

    async def _read_one(self, chain_id: int, inode: int, index: int, offset: int,
                        length: int | None, count: bool = True) -> tuple[bytes, int, int]:
        """``(data, version, chunk_length)`` of one read of committed bytes (``count``: add them
        to the read-bytes metric; a batch adds its total once)."""
        if inode < 0 or index < 0 or offset < 0:
            raise ValueError("inode, index and offset must be >= 0")
        length = 2**62 if length is None or length < 0 else length
        chain, me = self._read_target(chain_id)
        if me["state"] != TargetState.SERVING:
            raise FsError(Code.TARGET_NOT_SERVING, f"target {me['id']} is {me['state']}")
        store = self.stores[me["id"]]
        meta = store.get(inode, index)
        if meta is not None and meta.pending_version is not None:
            lock = self._lock(me["id"], inode, index)
            if lock.locked():  # a write is in flight: its outcome is moments away
                async with lock:
                    pass
                meta = store.get(inode, index)
            serving = [t for t in chain["targets"] if t["state"] == TargetState.SERVING]
            if meta is not None and meta.pending_version is not None and serving[-1]["id"] != me["id"]:
                raise FsError(Code.CHUNK_DIRTY, f"chunk {inode}:{index} has an unacknowledged version; read the tail")
        data, meta = await store.read(inode, index, offset, length, meta)  # meta is current: no await since
        if count and self._bytes is not None:
            self._bytes["read"].inc(len(data))
        return data, (meta.version if meta else 0), (meta.length if meta else 0)

    async def rpc_chunk_meta(self, target_id: int, inode: int, index: int) -> dict | None:
        """Admin/tests: one target's metadata of one chunk (version, length, crc, pending)."""
        store = self._store(target_id)
        meta = store.get(inode, index)
        return None if meta is None else meta.as_dict()

    async def rpc_list_chunks(self, chain_id: int, inode: int, from_index: int = 0) -> list[dict]:
        """Committed chunks of ``inode`` on this node's target of ``chain_id``."""
        self._check_fence()
        _, me, _ = await self._chain(chain_id, None)
        return [m.as_dict() for m in self.stores[me["id"]].list(inode, from_index)]

    async def rpc_last_chunk(self, chain_id: int, inode: int) -> list | None:
        """``[index, length]`` of the highest committed chunk of ``inode`` on this chain, or None."""
        self._check_fence()
        _, me, _ = await self._chain(chain_id, None)
        if me["state"] != TargetState.SERVING:
            raise FsError(Code.TARGET_NOT_SERVING, f"target {me['id']} is {me['state']}")
        last = self.stores[me["id"]].last_chunk(inode)
        return list(last) if last else None

    async def rpc_dump_target(self, target_id: int) -> list[list]:
        """Every committed chunk of a target as ``[inode, index, version, crc]`` (sync, admin)."""
        return [[m.inode, m.index, m.version, m.crc] for m in self._store(target_id).list()]

    async def rpc_node_info(self) -> dict:
        return {"node_id": self.cfg.node_id, "incarnation": self.incarnation, "fenced": self.fenced,
                "routing_version": self.routing.version,
                "targets": {tid: {"path": str(s.path), "chunks": len(s.list())} for tid, s in self.stores.items()}}

    def _store(self, target_id: int) -> ChunkStore:
        store = self.stores.get(target_id)
        if store is None:
            raise FsError(Code.ENOENT, f"node {self.cfg.node_id} has no target {target_id}")
        return store

    # --- re-sync -------------------------------------------------------------------------------

    async def rpc_sync_write(self, target_id: int, chain_id: int, chain_version: int, inode: int, index: int,
                             version: int, content: bytes | None) -> dict:
        """Sync from the last serving target: replace a chunk (or delete it when ``content`` is None)."""
        self._check_fence()
        chain, me, _ = await self._chain(chain_id, chain_version)
        if me["id"] != target_id or me["state"] != TargetState.SYNCING:
            raise FsError(Code.TARGET_NOT_SERVING, f"target {target_id} is not syncing in chain {chain_id}")
        store = self.stores[target_id]
        async with self._lock(target_id, inode, index):
            if content is None:
                await store.remove(inode, index)
            else:
                await store.replace(inode, index, version, content)
        return {"ok": True}

    def _start_syncs(self) -> None:
        for cid, chain in self.routing.chains.items():
            serving = [t for t in chain["targets"] if t["state"] == TargetState.SERVING]
            if not serving or serving[-1]["id"] not in self.stores:
                continue
            for t in chain["targets"]:
                if t["state"] != TargetState.SYNCING:
                    continue
                key = (cid, t["id"], chain["version"])
                if key not in self._syncs:
                    self._syncs[key] = asyncio.ensure_future(self._sync(cid, serving[-1]["id"], t, chain["version"]))

    async def _sync(self, chain_id: int, source_id: int, target: dict, version: int) -> None:
        store = self.stores[source_id]
        t0, copied, removed = time.monotonic(), 0, 0
        for attempt in range(1000):
            chain = self.routing.chain(chain_id)
            if chain is None or chain["version"] != version:
                return  # the chain changed; a newer routing starts a new sync if still needed
            addr = self.routing.address(target["node"])
            try:
                remote = {(i, x): (v, c) for i, x, v, c in await self.rpc.call(
                    addr, "dump_target", {"target_id": target["id"]}, timeout=30)}
                local = {(m.inode, m.index): (m.version, m.crc) for m in store.list()}
                for key, vc in local.items():
                    if remote.get(key) == vc:
                        continue
                    async with self._lock(source_id, *key):
                        content, meta = await store.committed_content(*key)
                        if meta is None or meta.version == 0:
                            continue
                        await self.rpc.call(addr, "sync_write", dict(
                            target_id=target["id"], chain_id=chain_id, chain_version=version, inode=key[0],
                            index=key[1], version=meta.version, content=content), timeout=30)
                        copied += 1
                for key in remote.keys() - local.keys():
                    async with self._lock(source_id, *key):
                        if store.get(*key) is not None:
                            continue
                        await self.rpc.call(addr, "sync_write", dict(
                            target_id=target["id"], chain_id=chain_id, chain_version=version, inode=key[0],
                            index=key[1], version=0, content=None), timeout=30)
                        removed += 1
                await self.mgmtd.call("sync_done", {"chain_id": chain_id, "target_id": target["id"],
                                                    "chain_version": version})
                log.info("sync done", extra={"fields": {"chain": chain_id, "target": target["id"], "copied": copied,
                                                        "removed": removed, "seconds": time.monotonic() - t0}})
                return
            except asyncio.CancelledError:
                raise
            except FsError as exc:
                if exc.code == Code.CHAIN_VERSION_MISMATCH:
                    return
                log.warning("sync of target %s failed (attempt %d): %s", target["id"], attempt, exc)
                await asyncio.sleep(min(1.0, 0.05 * (attempt + 1)))
                try:
                    await self.refresh_routing()
                except FsError:
                    pass
