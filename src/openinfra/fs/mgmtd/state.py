"""The chain state machine of mgmtd, as a pure function (unit-tested without services).

Inputs per target: its public state, whether its node is alive (heard from within T), whether its
node restarted since the last decision (a new incarnation lost whatever was pending), and whether
a sync to it finished at the current chain version. Output: the new ordered target list.

Rules (3FS's, in our words):
* a serving target that fails becomes offline, or lastsrv when no other serving target is left;
  when all serving targets fail at once the tail (last in order) is the lastsrv;
* a serving target whose node restarted is re-synced if another serving target exists, and keeps
  serving if it is the only one (nothing could commit without it);
* lastsrv comes back serving; an offline target comes back waiting; a waiting target starts
  syncing once the chain has a serving target; syncing becomes serving when its sync is done;
* syncing and waiting targets whose node dies go offline.
"""

from __future__ import annotations

from typing import Callable

from openinfra.fs.routing import TargetState as S
from openinfra.fs.routing import order_targets

__all__ = ["next_chain_targets"]


def next_chain_targets(targets: list[dict], alive: Callable[[int], bool], restarted: Callable[[int], bool],
                       synced: Callable[[int], bool]) -> list[dict]:
    """One step of the state machine for one chain. ``alive``/``restarted`` take a node id,
    ``synced`` a target id. Returns a new ordered list (same dicts copied)."""
    ts = [dict(t) for t in targets]
    serving = [t for t in ts if t["state"] == S.SERVING]
    failing = [t for t in serving if not alive(t["node"])]
    survivors = [t for t in serving if t not in failing]
    for t in failing:
        last = not survivors and t is failing[-1]
        t["state"] = S.LASTSRV if last else S.OFFLINE
    for t in survivors:
        if restarted(t["node"]) and len(survivors) > 1:
            # Its pending updates are gone; others carried on: re-sync it from them.
            t["state"] = S.OFFLINE
            survivors = [s for s in survivors if s is not t]
    has_serving = any(t["state"] == S.SERVING for t in ts)
    promoted: list[dict] = []
    for t in ts:
        up = alive(t["node"])
        st = t["state"]
        if st == S.LASTSRV and up and not has_serving:
            t["state"] = S.SERVING
            has_serving = True
        elif st == S.LASTSRV and up:  # another target serves already: this one is stale now
            t["state"] = S.WAITING
        elif st == S.OFFLINE and up and t not in failing:
            t["state"] = S.WAITING
        elif st == S.WAITING and not up:
            t["state"] = S.OFFLINE
        elif st == S.SYNCING and (not up or restarted(t["node"])):
            t["state"] = S.OFFLINE
        elif st == S.SYNCING and synced(t["id"]):
            t["state"] = S.SERVING
            promoted.append(t)
    if any(t["state"] == S.SERVING for t in ts):
        for t in ts:
            if t["state"] == S.WAITING and alive(t["node"]) and not restarted(t["node"]):
                t["state"] = S.SYNCING
    # Promoted targets join the serving list at its end (they become the tail).
    rest = [t for t in ts if t not in promoted]
    ordered = order_targets(rest)
    n_serving = sum(t["state"] == S.SERVING for t in ordered)
    return ordered[:n_serving] + promoted + ordered[n_serving:]
