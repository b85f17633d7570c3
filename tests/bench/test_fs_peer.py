"""``openinfra bench fs_peer``: the pure-Python parts (no MooseFS, no root, no namespaces needed)."""

import argparse

import pytest

from openinfra.bench.harness import routines
from openinfra.bench.routines import fs_peer
from openinfra.bench.routines.fs_peer import (GOALS, PeerUnavailable, missing_requirements, ratio_table, require,
                                              summarize, validate)

pytestmark = pytest.mark.unit


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    fs_peer._add_arguments(p)
    return p.parse_args(list(argv))


def test_registered_with_its_arguments():
    r = routines()["fs_peer"]
    assert "MooseFS" in r.help and not r.needs_gpu


def test_defaults_validate():
    plan = validate(_args())
    assert plan.size == 256 << 20 and plan.io == 1 << 20
    assert plan.replication == (1, 3) and plan.chunkservers == 3 and plan.subnet == "10.77.0"


@pytest.mark.parametrize("argv, words", [
    (["--size-mib", "0"], "--size-mib"),
    (["--io-kib", "6"], "--io-kib"),
    (["--size-mib", "1", "--io-kib", "768"], "multiple of --io-kib"),
    (["--rand-ops", "0"], "--rand-ops"),
    (["--rand-seconds", "0"], "--rand-seconds"),
    (["--chunkservers", "0"], "--chunkservers"),
    (["--replication", "1,x"], "comma-separated"),
    (["--replication", "4"], "1..3"),
    (["--chunkservers", "2", "--replication", "3"], "1..2"),
    (["--chunkservers", "3", "--replication", "2"], "multiple of every replication"),
    (["--subnet", "10.77"], "three octets"),
    (["--subnet", "10.300.0"], "three octets"),
    (["--subnet", "127.0.0"], "non-loopback"),
    (["--subnet", "8.8.8"], "private"),
    (["--time-limit", "-1"], "--time-limit"),
])
def test_bad_arguments_name_the_problem(argv, words):
    with pytest.raises(ValueError, match=words):
        validate(_args(*argv))


def test_requirements_all_present():
    assert missing_requirements(euid=0, which=lambda c: f"/usr/bin/{c}", exists=lambda p: True, have_pyfuse3=True) == []


def test_requirements_say_what_is_missing_and_how_to_get_it():
    problems = missing_requirements(euid=1000, which=lambda c: None if c.startswith("mfs") else f"/usr/bin/{c}",
                                    exists=lambda p: False, have_pyfuse3=False)
    text = "\n".join(problems)
    assert "root" in problems[0]
    assert "apt-get install moosefs-chunkserver moosefs-client moosefs-master" in text and "--install" in text
    assert "/dev/fuse" in text and "pyfuse3" in text
    with pytest.raises(PeerUnavailable) as exc:
        require(problems)
    assert "cannot run the MooseFS comparison" in exc.value.code and "must run as root" in exc.value.code
    require([])  # nothing missing: no error


def test_the_routine_exits_cleanly_before_touching_anything(monkeypatch, tmp_path):
    monkeypatch.setattr(fs_peer.os, "geteuid", lambda: 1000)
    created = []
    monkeypatch.setattr(fs_peer.Netns, "create", lambda self: created.append(self))
    with pytest.raises(PeerUnavailable, match="must run as root"):
        fs_peer.bench_fs_peer(_args("--dir", str(tmp_path)))
    with pytest.raises(PeerUnavailable, match="--size-mib"):  # bad arguments are reported first, same way
        fs_peer.bench_fs_peer(_args("--size-mib", "0"))
    assert created == [] and list(tmp_path.iterdir()) == []


def _values():
    return {
        ("MooseFS", 1, "seq_write"): 100.0, ("3FS FUSE", 1, "seq_write"): 60.0, ("3FS native", 1, "seq_write"): 80.0,
        ("MooseFS", 1, "seq_read"): 200.0, ("3FS FUSE", 1, "seq_read"): 150.0, ("3FS native", 1, "seq_read"): 250.0,
        ("MooseFS", 3, "rand_read"): 1000.0, ("3FS FUSE", 3, "rand_read"): 1200.0,  # no native value: skipped
        ("MooseFS", 3, "rand_write"): 0.0, ("3FS FUSE", 3, "rand_write"): 10.0,  # peer 0: no ratio at all
    }


def test_ratios_are_ours_over_moosefs_against_the_goals():
    t = ratio_table(_values(), ("3FS FUSE", "3FS native"))
    assert set(t) == {"seq_write_R1", "seq_read_R1", "rand_read_R3"}
    w = t["seq_write_R1"]
    assert w["3FS FUSE_over_peer"] == pytest.approx(0.6) and w["3FS native_over_peer"] == pytest.approx(0.8)
    assert w["best_over_peer"] == pytest.approx(0.8) and w["goal"] == GOALS["seq_write"] == 0.7
    assert w["fuse_meets"] is False and w["best_meets"] is True
    r = t["seq_read_R1"]
    assert r["goal"] == 1.0 and r["fuse_meets"] is False and r["best_meets"] is True
    rr = t["rand_read_R3"]
    assert "3FS native_over_peer" not in rr and rr["best_over_peer"] == pytest.approx(1.2) and rr["fuse_meets"]


def test_summary_is_flat_and_has_an_overall_verdict():
    s = summarize(_values(), ("3FS FUSE", "3FS native"))
    assert s["goal_seq_read"] == 1.0 and s["goal_seq_write"] == 0.7
    assert s["seq_read_R1_3FS native_over_peer"] == 1.25
    assert s["all_goals_met_fuse"] is False and s["all_goals_met_best"] is True
    assert summarize({}, ("3FS FUSE",)) == {f"goal_{w}": g for w, g in GOALS.items()}
