"""Bars 2-5, 7 and 8 of storage.md: faults injected into real processes (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from openinfra.fs import Code, FsError, TargetState
from openinfra.fs.cluster import call

from .conftest import chain_dumps_equal, storage_node_name

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]
MiB = 1 << 20


def _block(i: int) -> bytes:
    return random.Random(i).randbytes(MiB)


def test_bar2_sigkill_middle_target_mid_write(make_cluster):
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=60) as fs:
        fs.write_bytes("/victim", b"v" * (2 * MiB))       # deleted while the middle target is down
        victim = fs.stat("/victim")
        chain_id = victim.layout["chains"][0]
        r0 = cluster.routing()
        middle = r0.chain(chain_id)["targets"][1]
        middle_name = storage_node_name(cluster, middle["node"])
        # 128 x 1 MiB: the kill lands after 4 acks, with about two seconds of writes still to go
        nblocks = 128
        acked: list[int] = []
        errors: list[BaseException] = []
        f = fs.open("/stream", "wb")

        def writer():
            try:
                for i in range(nblocks):
                    f.pwrite(_block(i), i * MiB)
                    acked.append(i)
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 4 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.kill(middle_name)                          # SIGKILL mid-stream
        acked_at_kill = len(acked)                         # read once the process is gone
        assert 4 <= acked_at_kill < nblocks, (
            f"{acked_at_kill} of {nblocks} writes acknowledged when the kill landed: not mid-write ({errors})")
        r1 = cluster.wait_for(lambda r: any(x["id"] == middle["id"] and x["state"] == TargetState.OFFLINE
                                            for x in r.chain(chain_id)["targets"]), 30, "middle target offline")
        assert r1.chain(chain_id)["version"] > r0.chain(chain_id)["version"]
        assert r1.chain(chain_id)["targets"][-1]["id"] == middle["id"], "failed target moves to the tail"
        fs.remove("/victim")
        call(cluster.services["meta-1"]["address"], "gc", timeout=30)
        t.join(120)
        assert not errors, errors
        f.close()
        cluster.restart(middle_name)
        cluster.wait_healthy(60)
        assert acked == list(range(nblocks))
        data = fs.read_bytes("/stream")
        for i in acked:
            assert data[i * MiB:(i + 1) * MiB] == _block(i), f"acknowledged block {i} lost"
        dumps = chain_dumps_equal(cluster, chain_id)
        assert not [k for k in dumps[0] if k[0] == victim.inode], "chunk deleted while down survived the sync"


def test_bar2_unacknowledged_write_is_all_or_nothing(make_cluster):
    """A write whose client gives up while the chain is broken: later reads see all of it or none."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=60) as fs:
        fs.write_bytes("/aon", b"o" * MiB)
        st = fs.stat("/aon")
        chain = cluster.routing().chain(st.layout["chains"][0])
        tail_name = storage_node_name(cluster, chain["targets"][-1]["node"])
        cluster.kill(tail_name)
        with cluster.client(retry_s=0.3, io_timeout_s=0.5) as impatient:
            f = impatient.open("/aon", "r+b")
            with pytest.raises(FsError):
                f.pwrite(b"n" * MiB, 0)
        got = fs.read_bytes("/aon")
        assert got in (b"o" * MiB, b"n" * MiB)
        cluster.restart(tail_name)
        cluster.wait_healthy(60)
        got2 = fs.read_bytes("/aon")
        assert got2 in (b"o" * MiB, b"n" * MiB)
        chain_dumps_equal(cluster, st.layout["chains"][0])


def test_bar3_sigstop_tail_reads_never_mix(make_cluster):
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    # The reader gives up on a frozen replica after 1 s and retries another one.
    with cluster.client(retry_s=60) as fs, cluster.client(retry_s=60, io_timeout_s=1.0) as reader:
        fs.write_bytes("/mix", b"a" * MiB)
        st = fs.stat("/mix")
        chain = cluster.routing().chain(st.layout["chains"][0])
        tail_name = storage_node_name(cluster, chain["targets"][-1]["node"])
        cluster.kill(tail_name, signal.SIGSTOP)
        try:
            done = threading.Event()
            errors = []

            def write_b():
                try:
                    with fs.open("/mix", "r+b") as f:
                        f.pwrite(b"b" * MiB, 0)
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    done.set()

            t = threading.Thread(target=write_b)
            t0 = time.monotonic()
            t.start()
            seen = set()
            reads = 0
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                got = reader.read_bytes("/mix")
                assert got in (b"a" * MiB, b"b" * MiB), "a read mixed old and new bytes"
                seen.add(got[:1])
                reads += 1
            t.join(60)
            assert not errors, errors
            # The write had to wait for the frozen tail to be failed (T): reads ran meanwhile.
            assert time.monotonic() - t0 > cluster.spec.failure_timeout_s / 2 and reads >= 1
            assert reader.read_bytes("/mix") == b"b" * MiB
        finally:
            cluster.kill(tail_name, signal.SIGCONT)
        cluster.wait_healthy(60)
        chain_dumps_equal(cluster, st.layout["chains"][0])


def test_bar4_fencing_and_mgmtd_failover(make_cluster):
    cluster = make_cluster(storage_nodes=3, replication=3, mgmtd_count=2, stripe=1)
    T = cluster.spec.failure_timeout_s
    with cluster.client(retry_s=60) as fs:
        fs.write_bytes("/before", b"1" * MiB)
        # Cut every storage node off from mgmtd: they fence within T/2 (+ one heartbeat of slack).
        for m in cluster.names("mgmtd"):
            cluster.kill(m, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            addr = cluster.services["storage-1"]["address"]
            while not call(addr, "node_info")["fenced"]:
                assert time.monotonic() - t0 < T / 2 + 3 * cluster.spec.heartbeat_s + 1.0, "did not fence in time"
                time.sleep(0.02)
            fenced_after = time.monotonic() - t0
            with pytest.raises(FsError) as ei:
                call(addr, "read", {"chain_id": 1, "inode": 1, "index": 0})
            assert ei.value.code == Code.FENCED
        finally:
            for m in cluster.names("mgmtd"):
                cluster.kill(m, signal.SIGCONT)
        assert fenced_after <= T / 2 + 3 * cluster.spec.heartbeat_s + 1.0
        cluster.wait_healthy(60)
        # Failover: SIGKILL the primary; the other instance takes the lease; versions never go back.
        r0 = cluster.routing()
        primary = r0.info["primary"]
        pname = next(n for n in cluster.names("mgmtd") if cluster.services[n]["address"] == primary)
        cluster.kill(pname)
        r1 = cluster.wait_for(lambda r: r.info["primary"] != primary, 30, "new mgmtd primary")
        assert r1.version > r0.version
        assert all(r1.chain(c)["version"] >= r0.chain(c)["version"] for c in r0.chains)
        fs.write_bytes("/after", b"2" * MiB)
        assert fs.read_bytes("/before") == b"1" * MiB and fs.read_bytes("/after") == b"2" * MiB
        # The new primary still detects failures.
        cluster.kill("storage-2")
        cluster.wait_for(lambda r: any(t["node"] == 2 and t["state"] != TargetState.SERVING
                                       for c in r.chains.values() for t in c["targets"]), 30, "storage-2 failed")
        assert fs.read_bytes("/after") == b"2" * MiB
        cluster.restart("storage-2")
        cluster.restart(pname)
        cluster.wait_healthy(60)


def test_bar5_kill_all_replicas_lastsrv_first(make_cluster):
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=60) as fs:
        fs.write_bytes("/f", b"1" * MiB)
        chain_id = fs.stat("/f").layout["chains"][0]
        order = [t["node"] for t in cluster.routing().chain(chain_id)["targets"]]
        names = [storage_node_name(cluster, n) for n in order]

        def state_of(r, node):
            return next(t["state"] for t in r.chain(chain_id)["targets"] if t["node"] == node)

        for i, (node, name) in enumerate(zip(order, names)):
            cluster.kill(name)
            want = TargetState.LASTSRV if i == 2 else TargetState.OFFLINE
            cluster.wait_for(lambda r: state_of(r, node) == want, 30, f"{name} {want}")
            if i < 2:
                fs.write_bytes("/f", str(i + 2).encode() * MiB)  # newer data on fewer replicas
        # The stalest replica comes back first: it must not serve.
        cluster.restart(names[0])
        cluster.wait_for(lambda r: state_of(r, order[0]) == TargetState.WAITING, 30, "stale replica waiting")
        time.sleep(1.0)
        assert state_of(cluster.routing(), order[0]) == TargetState.WAITING
        with pytest.raises(FsError) as ei:
            call(cluster.services[names[0]]["address"], "read", {"chain_id": chain_id, "inode": fs.stat("/f").inode,
                                                                 "index": 0})
        assert ei.value.code == Code.TARGET_NOT_SERVING
        with cluster.client(retry_s=1.0) as impatient:
            with pytest.raises(FsError) as ei:
                impatient.read_bytes("/f")
            assert ei.value.code == Code.NO_SERVING_TARGET
        # The last serving replica returns: it serves the newest data and re-syncs the others.
        cluster.restart(names[2])
        cluster.restart(names[1])
        cluster.wait_healthy(60)
        assert fs.read_bytes("/f") == b"3" * MiB
        chain_dumps_equal(cluster, chain_id)


def test_bar7_concurrent_creates_from_two_meta_processes(make_cluster):
    cluster = make_cluster(storage_nodes=2, replication=2, meta_count=2)
    metas = [cluster.services[n]["address"] for n in cluster.names("meta")]
    call(metas[0], "mkdir", {"path": "/shared"})
    errors = []

    def create(k: int):
        try:
            for i in range(60):
                call(metas[k], "open", {"path": f"/shared/m{k}-{i}", "create": True, "write": False})
                call(metas[k], "mkdir", {"path": f"/shared/d{i}", "exist_ok": True})  # both race on these
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    names = {e["name"] for e in call(metas[1], "listdir", {"path": "/shared"})}
    assert names == {f"m{k}-{i}" for k in range(2) for i in range(60)} | {f"d{i}" for i in range(60)}
    # Crossing renames of two directories into each other: one wins, never a cycle.
    call(metas[0], "mkdir", {"path": "/x"})
    call(metas[0], "mkdir", {"path": "/y"})
    results = []

    def mv(k, src, dst):
        try:
            call(metas[k], "rename", {"src": src, "dst": dst})
            results.append("ok")
        except FsError as exc:
            results.append(exc.code)

    ts = [threading.Thread(target=mv, args=(0, "/x", "/y/x")), threading.Thread(target=mv, args=(1, "/y", "/x/y"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(results) in (["EINVAL", "ok"], ["ENOENT", "ok"]), results
    with pytest.raises(FsError) as ei:
        call(metas[1], "rename", {"src": "/shared", "dst": "/shared/d1/inside"})
    assert ei.value.code == Code.EINVAL


def test_bar8_bounded_chaos(make_cluster):
    """Random SIGKILL/restart of storage and meta processes for a bounded time while two clients
    write and verify: no acknowledged write lost, replicas converge."""
    cluster = make_cluster(storage_nodes=3, replication=2, targets_per_node=2, meta_count=2, stripe=3,
                           chunk_size=256 << 10)
    rng = random.Random(8)
    stop = threading.Event()
    acked: dict[str, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(k: int):
        try:
            with cluster.client(retry_s=60) as fs:
                fs.mkdir(f"/c{k}", exist_ok=True)
                i = 0
                while not stop.is_set():
                    path = f"/c{k}/f{i}"
                    data = random.Random(k * 1000 + i).randbytes(random.Random(i).randrange(1, 900_000))
                    fs.write_bytes(path, data)
                    with lock:
                        acked[path] = data
                    if i % 3 == 0:
                        old = f"/c{k}/f{rng.randrange(i + 1)}"
                        with lock:
                            want = acked.get(old)
                        if want is not None:
                            assert fs.read_bytes(old) == want, f"{old} differs during chaos"
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    clients = [threading.Thread(target=client_loop, args=(k,)) for k in range(2)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 20
    kills = 0
    try:
        while time.monotonic() < deadline and not errors:
            victim = rng.choice(cluster.names("storage") + cluster.names("meta"))
            cluster.kill(victim)
            kills += 1
            time.sleep(rng.uniform(0.2, 1.5))
            cluster.restart(victim)
            if victim.startswith("storage"):
                cluster.wait_healthy(60)  # one storage failure at a time: R=2 keeps a copy
            time.sleep(rng.uniform(0.2, 1.0))
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    assert not errors, errors
    assert kills >= 3 and len(acked) >= 10
    cluster.wait_healthy(60)
    with cluster.client(retry_s=60) as fs:
        for path, data in acked.items():
            assert fs.read_bytes(path) == data, f"acknowledged {path} lost"
    for chain_id in cluster.routing().chains:
        chain_dumps_equal(cluster, chain_id)
