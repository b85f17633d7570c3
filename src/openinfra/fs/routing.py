"""Routing info: what mgmtd publishes and every service and client routes by.

A plain dict on the wire (msgpack), wrapped here for lookups::

    {"version": int, "primary": "host:port",
     "nodes":  {node_id: {"id", "type": "storage"|"meta", "address", "alive": bool, "metrics"}},
     "chains": {chain_id: {"id", "version", "targets": [{"id", "node", "state"}, ...]}},
     "tables": {table_id: {"id", "version", "chains": [chain_id, ...]}}}

A chain's targets are ordered: serving targets first (the first is the head, the last the tail
that reads fall back to), then syncing (they receive forwarded writes but serve no reads), then
waiting, lastsrv and offline targets.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TargetState", "Routing", "order_targets"]


class TargetState:
    """Public target states (3FS): who serves reads, who receives writes, who must sync first."""

    SERVING = "serving"    # up to date: in the write chain, serves reads
    SYNCING = "syncing"    # back, receiving forwarded writes and a full sync from the last serving target
    WAITING = "waiting"    # back, waiting for a serving target to sync from; serves nothing
    LASTSRV = "lastsrv"    # was the last serving target when it failed: holds the newest data
    OFFLINE = "offline"    # down, or stale
    ALL = (SERVING, SYNCING, WAITING, LASTSRV, OFFLINE)
    WRITE = (SERVING, SYNCING)


_ORDER = {s: i for i, s in enumerate(TargetState.ALL)}


def order_targets(targets: list[dict]) -> list[dict]:
    """Stable sort by state rank: serving, syncing, waiting, lastsrv, offline."""
    return sorted(targets, key=lambda t: _ORDER[t["state"]])


class Routing:
    """Read-only view of a routing-info dict."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self.version: int = info.get("version", 0)
        self.nodes: dict[int, dict] = {int(k): v for k, v in info.get("nodes", {}).items()}
        self.chains: dict[int, dict] = {int(k): v for k, v in info.get("chains", {}).items()}
        self.tables: dict[int, dict] = {int(k): v for k, v in info.get("tables", {}).items()}

    @classmethod
    def empty(cls) -> "Routing":
        return cls({"version": 0, "nodes": {}, "chains": {}, "tables": {}})

    def chain(self, chain_id: int) -> dict | None:
        return self.chains.get(int(chain_id))

    def serving(self, chain_id: int) -> list[dict]:
        c = self.chain(chain_id)
        return [t for t in c["targets"] if t["state"] == TargetState.SERVING] if c else []

    def write_targets(self, chain_id: int) -> list[dict]:
        c = self.chain(chain_id)
        return [t for t in c["targets"] if t["state"] in TargetState.WRITE] if c else []

    def address(self, node_id: int) -> str | None:
        n = self.nodes.get(int(node_id))
        return n["address"] if n else None

    def meta_addresses(self) -> list[str]:
        return [n["address"] for _, n in sorted(self.nodes.items()) if n["type"] == "meta" and n.get("alive")]

    def target_location(self, target_id: int) -> tuple[int, dict] | None:
        """``(chain_id, target dict)`` for a target, or None."""
        for cid, c in self.chains.items():
            for t in c["targets"]:
                if t["id"] == target_id:
                    return cid, t
        return None
