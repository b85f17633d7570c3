"""mgmtd, the cluster manager: lease-elected primary, heartbeats, failure detection, chain tables,
target states and routing info.

Several mgmtd processes share one KV store. Each tries to take the lease row (``SING`` key) when
it has expired and extends it while it holds it; only the holder answers heartbeats and routing
requests (others reply NOT_PRIMARY with the holder's address). The lease expiry only moves
forward, and every state change is written in a transaction that re-checks the lease, so a
deposed primary cannot overwrite its successor. A primary that cannot renew steps down before its
lease runs out (self-fencing).

Nodes (storage and meta) heartbeat every ``heartbeat_s``; a node silent for ``failure_timeout_s``
(T) is failed; its targets change state through :func:`next_chain_targets` and every changed
chain gets a new version. A new primary gives every node a full T of grace before failing it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from openinfra.fs.errors import Code, FsError
from openinfra.fs.kv import KVEngine, prefix_end
from openinfra.fs.mgmtd.state import next_chain_targets
from openinfra.fs.routing import TargetState, order_targets
from openinfra.fs.rpc import RpcServer

__all__ = ["MgmtdConfig", "Mgmtd"]

log = logging.getLogger("openinfra.fs.mgmtd")

LEASE_KEY = b"SINGmgmtd-lease"
ROUTING_VERSION_KEY = b"SINGrouting-version"
NODE, CHAIN_INFO, CHAIN_TABLE = b"NODE", b"CHIF", b"CHIT"


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _k(prefix: bytes, ident: int) -> bytes:
    return prefix + struct.pack(">I", ident)


@dataclass
class MgmtdConfig:
    """``lease_s``: primary lease; ``heartbeat_s``: how often nodes report; ``failure_timeout_s``:
    T, silence after which a node is failed (nodes fence themselves after T/2)."""

    kv_url: str
    host: str = "127.0.0.1"
    port: int = 0
    name: str = field(default_factory=lambda: f"mgmtd-{uuid.uuid4().hex[:8]}")
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    failure_timeout_s: float = 30.0

    def __post_init__(self):
        for f in ("lease_s", "heartbeat_s", "failure_timeout_s"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f}: expected > 0 seconds, got {getattr(self, f)}")
        if self.failure_timeout_s <= self.heartbeat_s:
            raise ValueError("failure_timeout_s must exceed heartbeat_s (a node needs several chances to report)")


class Mgmtd:
    """One mgmtd instance. ``await Mgmtd(cfg, kv).start()``; serve until :meth:`stop`."""

    def __init__(self, cfg: MgmtdConfig, kv: KVEngine, server: RpcServer | None = None):
        self.cfg, self.kv = cfg, kv
        self.server = server or RpcServer(cfg.host, cfg.port, name="mgmtd")
        self.server.add_service(self)
        self.primary = False
        self.primary_address: str | None = None
        self.term = 0
        self._renewed_at = 0.0
        # Primary-only, in memory: rebuilt on every takeover.
        self.nodes: dict[int, dict] = {}
        self.chains: dict[int, dict] = {}
        self.tables: dict[int, dict] = {}
        self.routing_version = 0
        self.last_seen: dict[int, float] = {}
        self.restarted: set[int] = set()
        self.synced: dict[int, int] = {}  # target id -> chain version its sync finished at
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> str:
        await self.server.start()
        await self._lease_step()
        self._tasks.append(asyncio.ensure_future(self._loop()))
        return self.address

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.server.close()

    # --- lease ---------------------------------------------------------------------------------

    async def _lease_step(self) -> None:
        me, lease_s = self.address, self.cfg.lease_s

        async def txn_fn(txn):
            now = time.time()
            raw = await txn.get(LEASE_KEY)
            lease = _unpack(raw) if raw else None
            if lease is None or lease["holder"] == me or lease["expires"] < now:
                term = (lease["term"] if lease else 0) + (0 if lease and lease["holder"] == me else 1)
                expires = max(now + lease_s, lease["expires"] if lease and lease["holder"] == me else 0)
                await txn.set(LEASE_KEY, _pack({"holder": me, "expires": expires, "term": term}))
                return True, me, term
            return False, lease["holder"], lease["term"]

        t0 = time.monotonic()
        try:
            got, holder, term = await self.kv.run(txn_fn, max_retries=20)
        except Exception as exc:  # KV unreachable: keep the old view until the lease runs out
            log.warning("lease renewal failed: %s", exc)
            if self.primary and time.monotonic() - self._renewed_at > 0.8 * lease_s:
                log.warning("stepping down: lease could not be renewed in time")
                self.primary = False
            return
        self.primary_address = holder
        if got:
            self._renewed_at = t0
            if not self.primary or term != self.term:
                self.term = term
                await self._take_over()
        elif self.primary:
            log.warning("lost the lease to %s", holder)
            self.primary = False

    async def _take_over(self) -> None:
        async def load(txn):
            nodes = {(_unpack(v)["id"]): _unpack(v) for _, v in await txn.get_range(NODE, prefix_end(NODE))}
            chains = {(_unpack(v)["id"]): _unpack(v) for _, v in await txn.get_range(CHAIN_INFO, prefix_end(CHAIN_INFO))}
            tables = {(_unpack(v)["id"]): _unpack(v) for _, v in await txn.get_range(CHAIN_TABLE, prefix_end(CHAIN_TABLE))}
            rv = await txn.get(ROUTING_VERSION_KEY)
            return nodes, chains, tables, int(rv or b"0")

        self.nodes, self.chains, self.tables, self.routing_version = await self.kv.run(load, read_only=True)
        now = time.monotonic()
        self.last_seen = {nid: now for nid in self.nodes}  # a full T of grace after failover
        self.restarted.clear()
        self.synced.clear()
        self.primary = True
        log.info("became primary", extra={"fields": {"term": self.term, "nodes": len(self.nodes),
                                                     "chains": len(self.chains)}})
        await self._persist(bump=True)

    async def _loop(self) -> None:
        tick = min(self.cfg.lease_s / 4, self.cfg.heartbeat_s / 2, self.cfg.failure_timeout_s / 6)
        next_lease = 0.0
        while True:
            try:
                now = time.monotonic()
                if now >= next_lease:
                    await self._lease_step()
                    next_lease = now + self.cfg.lease_s / 4
                if self.primary:
                    await self._update_chains()
            except asyncio.CancelledError:
                raise
            except FsError as exc:
                if exc.code == Code.NOT_PRIMARY:
                    self.primary = False
                else:
                    log.exception("mgmtd tick failed")
            except Exception:
                log.exception("mgmtd tick failed")
            await asyncio.sleep(tick)

    def _require_primary(self) -> None:
        if not self.primary or time.monotonic() - self._renewed_at > self.cfg.lease_s:
            raise FsError(Code.NOT_PRIMARY, f"primary is {self.primary_address}")

    # --- state changes -------------------------------------------------------------------------

    async def _persist(self, chains: list[int] = (), nodes: list[int] = (), tables: list[int] = (),
                       bump: bool = True) -> None:
        """Write changed records and bump the routing version, in one lease-checked transaction."""
        me, term = self.address, self.term
        rv = self.routing_version + (1 if bump else 0)

        async def txn_fn(txn):
            raw = await txn.get(LEASE_KEY)
            lease = _unpack(raw) if raw else None
            if lease is None or lease["holder"] != me or lease["term"] != term:
                raise FsError(Code.NOT_PRIMARY, "lease lost")
            cur = int(await txn.get(ROUTING_VERSION_KEY) or b"0")
            version = max(rv, cur + 1) if bump else cur
            for cid in chains:
                await txn.set(_k(CHAIN_INFO, cid), _pack(self.chains[cid]))
            for nid in nodes:
                await txn.set(_k(NODE, nid), _pack(self.nodes[nid]))
            for tid in tables:
                await txn.set(_k(CHAIN_TABLE, tid), _pack(self.tables[tid]))
            await txn.set(ROUTING_VERSION_KEY, str(version).encode())
            return version

        try:
            self.routing_version = await self.kv.run(txn_fn)
        except FsError as exc:
            if exc.code == Code.NOT_PRIMARY:
                self.primary = False
            raise

    def _alive(self, node_id: int) -> bool:
        seen = self.last_seen.get(node_id)
        return seen is not None and time.monotonic() - seen < self.cfg.failure_timeout_s

    async def _update_chains(self) -> None:
        async with self._lock:
            changed = []
            for cid, chain in self.chains.items():
                targets = chain["targets"]
                for _ in range(4):  # a few steps reach the fixpoint (offline -> waiting -> syncing)
                    new = next_chain_targets(targets, self._alive, lambda n: n in self.restarted,
                                             lambda t, v=chain["version"]: self.synced.get(t) == v)
                    if new == targets:
                        break
                    targets = new
                if targets != chain["targets"]:
                    log.info("chain changed", extra={"fields": {"chain": cid, "version": chain["version"] + 1,
                                                                "targets": [(t["id"], t["state"]) for t in targets]}})
                    chain["targets"], chain["version"] = targets, chain["version"] + 1
                    changed.append(cid)
            self.restarted.clear()
            alive_changed = [nid for nid, n in self.nodes.items() if n.get("alive") != self._alive(nid)]
            for nid in alive_changed:
                self.nodes[nid]["alive"] = self._alive(nid)
            if changed or alive_changed:
                await self._persist(chains=changed, nodes=alive_changed)

    # --- RPC -----------------------------------------------------------------------------------

    async def rpc_get_primary(self) -> dict:
        """Answered by every instance: who holds the lease."""
        return {"primary": self.primary_address, "is_primary": self.primary, "address": self.address}

    async def rpc_heartbeat(self, node_id: int, node_type: str, address: str, incarnation: str,
                            targets: list | None = None, metrics: str = "") -> dict:
        """A node reports itself; returns the routing version it should catch up to."""
        self._require_primary()
        if not isinstance(node_id, int) or node_id <= 0:
            raise ValueError(f"node_id: expected a positive int, got {node_id!r}")
        if node_type not in ("storage", "meta"):
            raise ValueError(f"node_type: expected 'storage' or 'meta', got {node_type!r}")
        async with self._lock:
            node = self.nodes.get(node_id)
            fresh = node is None
            changed = fresh or node["address"] != address or node["incarnation"] != incarnation or not node.get("alive")
            if node is not None and node["incarnation"] != incarnation:
                self.restarted.add(node_id)
            self.nodes[node_id] = {"id": node_id, "type": node_type, "address": address, "incarnation": incarnation,
                                   "alive": True, "metrics": metrics}
            self.last_seen[node_id] = time.monotonic()
        if changed:
            await self._persist(nodes=[node_id])
            await self._update_chains()
        return {"routing_version": self.routing_version, "primary": self.address}

    async def rpc_get_routing(self) -> dict:
        self._require_primary()
        return {
            "version": self.routing_version,
            "primary": self.address,
            "nodes": {nid: dict(n, alive=self._alive(nid)) for nid, n in self.nodes.items()},
            "chains": self.chains,
            "tables": self.tables,
        }

    async def rpc_sync_done(self, chain_id: int, target_id: int, chain_version: int) -> dict:
        """The last serving target finished syncing ``target_id`` at ``chain_version``."""
        self._require_primary()
        chain = self.chains.get(chain_id)
        if chain is None:
            raise FsError(Code.EINVAL, f"chain {chain_id} does not exist")
        if chain["version"] != chain_version:
            raise FsError(Code.CHAIN_VERSION_MISMATCH, f"chain {chain_id} is at version {chain['version']}")
        self.synced[target_id] = chain_version
        await self._update_chains()
        return {"version": self.chains[chain_id]["version"]}

    async def rpc_create_chain_table(self, table_id: int, chains: list) -> dict:
        """Admin: create chains and a chain table. ``chains``: ``[{"id": int, "targets": [[target_id,
        node_id], ...]}]``; each chain's targets must be on distinct nodes; existing chain ids are
        kept as they are (so the call is idempotent)."""
        self._require_primary()
        if not isinstance(table_id, int) or table_id <= 0:
            raise ValueError(f"table_id: expected a positive int, got {table_id!r}")
        if not chains:
            raise ValueError("chains: expected at least one chain")
        new = []
        for c in chains:
            cid, targets = c["id"], c["targets"]
            nodes = [n for _, n in targets]
            if len(set(nodes)) != len(nodes):
                raise ValueError(f"chain {cid}: targets must be on distinct nodes, got nodes {nodes}")
            if cid not in self.chains:
                self.chains[cid] = {"id": cid, "version": 1, "targets": order_targets(
                    [{"id": t, "node": n, "state": TargetState.SERVING} for t, n in targets])}
                new.append(cid)
        ids = [c["id"] for c in chains]
        old = self.tables.get(table_id)
        if old is None or old["chains"] != ids:
            self.tables[table_id] = {"id": table_id, "version": (old["version"] + 1) if old else 1, "chains": ids}
            await self._persist(chains=new, tables=[table_id])
        elif new:
            await self._persist(chains=new)
        return {"table": self.tables[table_id], "created_chains": new}

    async def rpc_set_target_state(self, target_id: int, state: str) -> dict:
        """Admin: force a target's state (``offline`` for a drill; ``serving`` only to recover a chain
        whose last serving target is lost for good: it may serve older data)."""
        self._require_primary()
        if state not in TargetState.ALL:
            raise ValueError(f"state: expected one of {TargetState.ALL}, got {state!r}")
        async with self._lock:
            for cid, chain in self.chains.items():
                for t in chain["targets"]:
                    if t["id"] == target_id:
                        t["state"] = state
                        chain["targets"] = order_targets(chain["targets"])
                        chain["version"] += 1
                        await self._persist(chains=[cid])
                        return {"chain": cid, "version": chain["version"]}
        raise FsError(Code.ENOENT, f"target {target_id} is in no chain")
