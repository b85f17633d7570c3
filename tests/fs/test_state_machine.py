"""mgmtd's chain state machine as a pure function: failures, restarts, lastsrv, sync."""

from __future__ import annotations

import pytest

from openinfra.fs.mgmtd.state import next_chain_targets
from openinfra.fs.routing import TargetState as S

pytestmark = pytest.mark.unit


def chain(*states):
    return [{"id": 100 + i, "node": i, "state": s} for i, s in enumerate(states)]


def step(targets, dead=(), restarted=(), synced=()):
    return next_chain_targets(targets, lambda n: n not in dead, lambda n: n in restarted, lambda t: t in synced)


def states(targets):
    return [(t["node"], t["state"]) for t in targets]


def test_failed_middle_moves_to_tail_offline():
    out = step(chain(S.SERVING, S.SERVING, S.SERVING), dead={1})
    assert states(out) == [(0, S.SERVING), (2, S.SERVING), (1, S.OFFLINE)]


def test_last_serving_becomes_lastsrv_and_returns_first():
    out = step(chain(S.SERVING, S.OFFLINE, S.OFFLINE), dead={0, 1, 2})
    assert states(out) == [(0, S.LASTSRV), (1, S.OFFLINE), (2, S.OFFLINE)]
    # a stale replica comes back first: waiting, never serving
    out2 = step(out, dead={0, 2})
    assert dict(states(out2))[1] == S.WAITING
    assert not any(s == S.SERVING for _, s in states(out2))
    # the lastsrv returns: it serves, and the waiting one starts syncing
    out3 = step(step(out2, dead={2}), dead={2})
    assert dict(states(out3))[0] == S.SERVING and dict(states(out3))[1] == S.SYNCING


def test_all_serving_fail_at_once_tail_is_lastsrv():
    out = step(chain(S.SERVING, S.SERVING, S.SERVING), dead={0, 1, 2})
    assert [s for _, s in states(out)].count(S.LASTSRV) == 1
    assert dict(states(out))[2] == S.LASTSRV


def test_restarted_serving_target_resyncs_unless_alone():
    out = step(chain(S.SERVING, S.SERVING), restarted={0})
    assert dict(states(out))[0] in (S.OFFLINE, S.WAITING)
    alone = step(chain(S.SERVING, S.OFFLINE), dead={1}, restarted={0})
    assert dict(states(alone))[0] == S.SERVING


def test_sync_done_promotes_to_tail():
    out = step(chain(S.SERVING, S.SERVING, S.SYNCING), synced={102})
    assert states(out) == [(0, S.SERVING), (1, S.SERVING), (2, S.SERVING)]
    waiting = step(chain(S.SERVING, S.WAITING))
    assert dict(states(waiting))[1] == S.SYNCING
    died = step(chain(S.SERVING, S.SYNCING), dead={1})
    assert dict(states(died))[1] == S.OFFLINE


def test_stable_when_nothing_happens():
    c = chain(S.SERVING, S.SERVING, S.SERVING)
    assert step(c) == c
