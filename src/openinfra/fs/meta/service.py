"""The meta service: stateless RPC front of :class:`MetaStore`; several can serve one KV store.

Beyond the namespace operations it keeps write sessions (a file opened for writing has one until
close; sessions not refreshed by their client for ``session_timeout_s`` are pruned), makes file
lengths exact at close/fsync by asking the chains for the last chunk, removes the chunks of
deleted files in the background (deferred delete, ``GCIN`` queue), empties directory trees removed
with ``remove_tree`` in the background (``TRSH`` queue), and records the first result of
every non-idempotent request under ``IDEM`` so a retry after a lost reply gets the same answer.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgpack

from openinfra.fs.client.storage_client import RoutingCache, StorageClient
from openinfra.fs.errors import Code, FsError
from openinfra.fs.kv import KVEngine, Transaction, prefix_end
from openinfra.fs.meta.store import GCIN, IDEM, INOS, TRSH, LayoutPolicy, MetaStore, User, inode_key
from openinfra.fs.rpc import RpcClient, RpcServer
from openinfra.fs.storage.service import MgmtdLink

__all__ = ["MetaConfig", "MetaService"]

log = logging.getLogger("openinfra.fs.meta")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


@dataclass
class MetaConfig:
    node_id: int
    mgmtd: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_s: float = 10.0
    session_timeout_s: float = 60.0
    gc_interval_s: float = 5.0
    idem_ttl_s: float = 600.0
    chunk_size: int = 1 << 20
    stripe: int = 16

    def __post_init__(self):
        if not isinstance(self.node_id, int) or self.node_id <= 0:
            raise ValueError(f"node_id: expected a positive int, got {self.node_id!r}")
        if not self.mgmtd:
            raise ValueError("mgmtd: expected at least one mgmtd address")


def _session(s: Any) -> bytes:
    if isinstance(s, str):
        s = bytes.fromhex(s)
    if not isinstance(s, (bytes, bytearray)) or len(s) != 16:
        raise ValueError("session: expected 16 bytes (or 32 hex digits)")
    return bytes(s)


class MetaService:
    def __init__(self, cfg: MetaConfig, kv: KVEngine, server: RpcServer | None = None, metrics=None):
        self.cfg, self.kv, self.metrics = cfg, kv, metrics
        self.server = server or RpcServer(cfg.host, cfg.port, name=f"meta-{cfg.node_id}")
        self.server.add_service(self)
        self.rpc = RpcClient(default_timeout=10.0)
        self.mgmtd = MgmtdLink(self.rpc, cfg.mgmtd)
        self.routing = RoutingCache(self.mgmtd)
        self.storage = StorageClient(self.rpc, self.routing, client_id=f"meta-{cfg.node_id}-{uuid.uuid4().hex[:8]}",
                                     retry_s=30.0)
        self.store = MetaStore(kv, self._chain_table, LayoutPolicy(cfg.chunk_size, cfg.stripe))
        self.incarnation = uuid.uuid4().hex
        self._tasks: list[asyncio.Task] = []
        self._emptying = asyncio.Lock()  # one tree emptier per service at a time

    @property
    def address(self) -> str:
        return self.server.address

    def _chain_table(self, table: int) -> tuple[int, list[int]]:
        t = self.routing.routing.tables.get(table)
        return (t["version"], list(t["chains"])) if t else (0, [])

    async def start(self) -> str:
        await self.store.init()
        await self.server.start()
        self._tasks += [asyncio.ensure_future(self._heartbeat_loop()), asyncio.ensure_future(self._gc_loop())]
        return self.address

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.server.close()
        await self.rpc.close()

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                reply = await self.mgmtd.call("heartbeat", {
                    "node_id": self.cfg.node_id, "node_type": "meta", "address": self.address,
                    "incarnation": self.incarnation, "metrics": getattr(self.metrics, "address", "") or ""})
                if reply["routing_version"] > self.routing.routing.version:
                    await self.routing.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.cfg.heartbeat_s)

    # --- helpers -------------------------------------------------------------------------------

    async def _idem(self, client: str, req: str, fn: Callable[[Transaction], Awaitable[Any]]) -> Any:
        """Run ``fn`` once per (client, req): a retried request returns the recorded result."""
        if not client or not req:
            return await self.kv.run(fn)
        if len(client) > 128 or len(req) > 128:
            raise ValueError("client and req ids must be at most 128 characters")
        key = IDEM + client.encode() + b"\x00" + req.encode()

        async def wrapped(txn: Transaction):
            raw = await txn.get(key)
            if raw is not None:
                return _unpack(raw)["result"]
            result = await fn(txn)
            await txn.set(key, _pack({"result": result, "ts": time.time()}))
            return result

        return await self.kv.run(wrapped)

    async def _ensure_routing(self) -> None:
        if not self.routing.routing.tables:
            await self.routing.refresh()

    # --- namespace RPCs ------------------------------------------------------------------------

    async def rpc_stat(self, path: str, user: dict | None = None, follow: bool = True) -> dict:
        u = User.from_wire(user)
        return await self.kv.run(lambda t: self.store.stat(t, path, u, follow), read_only=True)

    async def rpc_stat_inode(self, inode: int) -> dict:
        node = await self.kv.run(lambda t: self.store.get_inode(t, inode), read_only=True)
        if node is None:
            raise FsError(Code.ENOENT, f"inode {inode} does not exist")
        return node

    async def rpc_listdir(self, path: str, user: dict | None = None, with_attrs: bool = False, limit: int = 0) -> list:
        u = User.from_wire(user)
        return await self.kv.run(lambda t: self.store.listdir(t, path, u, with_attrs, limit), read_only=True)

    async def rpc_mkdir(self, path: str, user: dict | None = None, mode: int = 0o755, parents: bool = False,
                        exist_ok: bool = False, client: str = "", req: str = "", layout: dict | None = None) -> dict:
        from openinfra.fs.meta.paths import split_path

        u = User.from_wire(user)
        parts = split_path(path)
        if not parts:
            if exist_ok or parents:
                return await self.rpc_stat("/", user)
            raise FsError(Code.EEXIST, "/ exists")
        if layout is not None:
            LayoutPolicy(layout.get("chunk_size", self.cfg.chunk_size), layout.get("stripe", self.cfg.stripe))
        prefixes = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)] if parents else ["/" + "/".join(parts)]
        node = None
        for i, p in enumerate(prefixes):
            ino = await self.store.alloc_inode()
            last = i == len(prefixes) - 1
            node = await self._idem(client, f"{req}#{i}" if req else "", lambda t, p=p, ino=ino, last=last: self.store.mkdir(
                t, p, u, ino, mode, exist_ok=(not last) or exist_ok, layout=layout if last else None))
        return node

    async def rpc_symlink(self, path: str, target: str, user: dict | None = None, client: str = "", req: str = "") -> dict:
        u = User.from_wire(user)
        ino = await self.store.alloc_inode()
        return await self._idem(client, req, lambda t: self.store.symlink(t, path, target, u, ino))

    async def rpc_hardlink(self, src: str, dst: str, user: dict | None = None, client: str = "", req: str = "") -> dict:
        u = User.from_wire(user)
        return await self._idem(client, req, lambda t: self.store.hardlink(t, src, dst, u))

    async def rpc_remove(self, path: str, user: dict | None = None, client: str = "", req: str = "") -> dict:
        u = User.from_wire(user)
        result = await self._idem(client, req, lambda t: self.store.remove(t, path, u))
        return result

    async def rpc_remove_tree(self, path: str, user: dict | None = None, wait: bool = False, client: str = "",
                              req: str = "") -> dict:
        """Remove ``path`` and everything under it on the server (3FS's fast tree delete).

        The tree leaves the namespace in one transaction (permissions as ``rm -r`` needs them);
        the emptying runs here in batched transactions, in the background unless ``wait``.
        Returns ``{"inode", "type", "queued"}`` plus, with ``wait``, ``"files"`` and ``"dirs"``
        removed (the directory itself included)."""
        if not isinstance(wait, bool):
            raise ValueError(f"wait: expected a bool, got {wait!r}")
        u = User.from_wire(user)
        result = dict(await self._idem(client, req, lambda t: self.store.detach_tree(t, path, u)))
        if not result["queued"]:
            result.update(files=1, dirs=0)
        elif wait:
            files, dirs = await self._empty_tree(result["inode"])
            result.update(files=files, dirs=dirs)
        else:
            self._tasks.append(asyncio.ensure_future(self._empty_queued_trees()))
            self._tasks = [t for t in self._tasks if not t.done()]
        return result

    async def rpc_trash_pending(self) -> int:
        """Trees removed with ``remove_tree`` whose emptying has not finished (admin, tests)."""
        return len(await self.kv.run(lambda t: t.get_range(TRSH, prefix_end(TRSH), 100_000), read_only=True))

    async def _empty_tree(self, root: int, budget: int = 512) -> tuple[int, int]:
        files = dirs = 0
        while True:
            f, d, finished = await self.kv.run(lambda t: self.store.empty_tree_step(t, root, budget))
            files, dirs = files + f, dirs + d
            if finished:
                return files, dirs

    async def _empty_queued_trees(self) -> int:
        """Empty every queued tree; several services may share the queue (steps are transactions,
        so two emptiers of one tree only cost retries). Returns the trees finished here."""
        async with self._emptying:
            queue = await self.kv.run(lambda t: t.get_range(TRSH, prefix_end(TRSH), 1000), read_only=True)
            for key, _ in queue:
                (ino,) = struct.unpack("<Q", key[4:12])
                await self._empty_tree(ino)
            return len(queue)

    async def rpc_rename(self, src: str, dst: str, user: dict | None = None, client: str = "", req: str = "") -> dict:
        u = User.from_wire(user)
        return await self._idem(client, req, lambda t: self.store.rename(t, src, dst, u))

    async def rpc_setattr(self, path: str, user: dict | None = None, mode: int | None = None, uid: int | None = None,
                          gid: int | None = None, atime: float | None = None, mtime: float | None = None,
                          follow: bool = True) -> dict:
        u = User.from_wire(user)
        return await self.kv.run(lambda t: self.store.setattr(t, path, u, mode, uid, gid, atime, mtime, follow))

    # --- files ---------------------------------------------------------------------------------

    async def rpc_open(self, path: str, user: dict | None = None, read: bool = True, write: bool = False,
                       create: bool = False, exclusive: bool = False, mode: int = 0o644, client: str = "",
                       session: Any = None, req: str = "", chunk_size: int | None = None,
                       stripe: int | None = None) -> dict:
        """Open ``path``; ``write`` opens need ``session`` (16 bytes) and get a write session."""
        u = User.from_wire(user)
        sess = _session(session) if write else None
        if write and not client:
            raise ValueError("client: write opens need the client id (for session pruning)")
        await self._ensure_routing()
        ino = await self.store.alloc_inode() if create else 0
        fn = lambda t: self.store.open(t, path, u, ino, write=write, read=read, create=create, exclusive=exclusive,
                                       mode=mode, session=sess, client=client, chunk_size=chunk_size, stripe=stripe)
        return await (self._idem(client, req, fn) if create else self.kv.run(fn))

    async def _exact_length(self, node: dict) -> int | None:
        try:
            return await asyncio.wait_for(self.storage.file_length(node["layout"], node["id"]), 15.0)
        except (FsError, asyncio.TimeoutError) as exc:
            log.warning("exact length of inode %s unavailable: %s", node["id"], exc)
            return None

    async def rpc_close(self, inode: int, session: Any, length_hint: int | None = None) -> dict | None:
        """End a write session; the length becomes max(recorded, chains' last chunk end)."""
        sess = _session(session)
        node = await self.rpc_stat_inode(inode)
        length = await self._exact_length(node) if node["type"] == "file" else None
        if length is None:
            length = length_hint
        return await self.kv.run(lambda t: self.store.close_session(t, inode, sess, length))

    async def rpc_sync(self, inode: int, session: Any, length_hint: int | None = None) -> dict:
        """fsync: make the recorded length exact now (the session stays open)."""
        sess = _session(session)
        node = await self.rpc_stat_inode(inode)
        length = await self._exact_length(node)
        if length is None:
            length = length_hint or 0
        await self.kv.run(lambda t: self.store.report_length(t, inode, sess, length))
        return await self.rpc_stat_inode(inode)

    async def rpc_report(self, client: str, items: list) -> int:
        """Periodic report of a client's write sessions: ``[[inode, session, max_written_end], ...]``."""
        for ino, sess, length in items:
            s = _session(sess)
            await self.kv.run(lambda t, ino=ino, s=s, length=length: self.store.report_length(t, ino, s, length))
        return len(items)

    async def rpc_set_length(self, inode: int, length: int, user: dict | None = None) -> dict:
        """Truncate to ``length`` after the client trimmed the chunks past it."""
        u = User.from_wire(user)
        return await self.kv.run(lambda t: self.store.set_length(t, inode, length, u))

    # --- background: session pruning, chunk GC, IDEM expiry ------------------------------------

    async def rpc_gc(self) -> dict:
        """Run one GC pass now (admin, tests); returns what it did."""
        return await self._gc_once()

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gc_interval_s)
            try:
                await self._gc_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gc pass failed")

    async def _gc_once(self) -> dict:
        now = time.time()
        pruned = collected = expired = 0
        trees = await self._empty_queued_trees()  # trees left by a restart or a failed emptier
        sessions = await self.kv.run(lambda t: t.get_range(INOS, prefix_end(INOS), 10_000), read_only=True)
        for key, raw in sessions:
            if now - _unpack(raw)["ts"] <= self.cfg.session_timeout_s:
                continue
            (ino,) = struct.unpack("<Q", key[4:12])
            node = await self.kv.run(lambda t: self.store.get_inode(t, ino), read_only=True)
            length = await self._exact_length(node) if node and node["type"] == "file" else None
            await self.kv.run(lambda t: self.store.close_session(t, ino, key[12:], length))
            pruned += 1
        queue = await self.kv.run(lambda t: t.get_range(GCIN, prefix_end(GCIN), 1000), read_only=True)
        for key, _ in queue:
            (ino,) = struct.unpack("<Q", key[4:12])
            node = await self.kv.run(lambda t: self.store.get_inode(t, ino), read_only=True)
            if node is not None and node["nlink"] == 0 and node["type"] == "file":
                try:
                    await self.storage.remove_chunks(node["layout"], ino)
                except FsError as exc:
                    log.warning("gc of inode %s postponed: %s", ino, exc)
                    continue

            async def drop(t: Transaction, key=key, ino=ino):
                cur = await self.store.get_inode(t, ino)
                if cur is None or cur["nlink"] == 0:
                    await t.clear(inode_key(ino))
                await t.clear(key)

            await self.kv.run(drop)
            collected += 1
        idem = await self.kv.run(lambda t: t.get_range(IDEM, prefix_end(IDEM), 10_000), read_only=True)
        old = [k for k, v in idem if now - _unpack(v)["ts"] > self.cfg.idem_ttl_s]
        if old:
            async def clear(t: Transaction):
                for k in old:
                    await t.clear(k)

            await self.kv.run(clear)
            expired = len(old)
        return {"sessions_pruned": pruned, "files_collected": collected, "idem_expired": expired,
                "trees_emptied": trees}
