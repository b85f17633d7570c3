"""Batched multi-chunk writes (storage ``write_batch``, ``File.write_chunks``, the FUSE write-back
flush): one request per hop and one commit per replica for many chunks of a chain, with a result
per chunk. Real storage processes over loopback TCP, except the chunk-store unit tests."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from openinfra.fs.cluster import call
from openinfra.fs.errors import Code, FsError
from openinfra.fs.storage.chunk_store import BLOCK_SIZE, ChunkStore, checksum

from .conftest import chain_dumps_equal, replica_metas, storage_node_name

KiB, MiB = 1 << 10, 1 << 20


def _apply(ref: bytearray, cs: int, updates: dict) -> None:
    for idx, ranges in updates.items():
        for off, d in ranges:
            pos = idx * cs + off
            if pos > len(ref):
                ref += bytes(pos - len(ref))
            ref[pos:pos + len(d)] = d


def _metas_agree(cluster, layout: dict, inode: int, index: int) -> dict:
    metas = replica_metas(cluster, layout, inode, index)
    assert all(m is not None and m["pending_version"] is None for m in metas), metas
    assert all((m["version"], m["crc"], m["length"]) == (metas[0]["version"], metas[0]["crc"], metas[0]["length"])
               for m in metas), metas
    return metas[0]


# --- chunk store ---------------------------------------------------------------------------------

@pytest.mark.unit
def test_commit_many_is_one_transaction_of_copies_and_in_place_updates(tmp_path):
    """``commit_many`` commits copy-on-write and in-place versions of several chunks together
    (one redo record per in-place one, old files of copies unlinked); a missing pending version
    fails the whole call and commits none of them."""
    s = ChunkStore(tmp_path, fsync=True)
    rng = random.Random(5)

    async def main():
        base = {i: rng.randbytes(4 * BLOCK_SIZE) for i in range(3)}
        for i, b in base.items():
            await s.prepare(1, i, 1, "write", 0, b)
        await s.commit_many([(1, i, 1) for i in base])
        old_files = {i: s.get(1, i).file for i in base}
        want = {i: bytearray(b) for i, b in base.items()}
        c0, _ = await s.prepare(1, 0, 2, "write", 4096, b"a" * 4096)          # in place
        c1, _ = await s.prepare(1, 1, 2, "write", 0, b"b" * (5 * BLOCK_SIZE), overlap=True)  # a copy
        c2, _ = await s.prepare(1, 2, 2, "writev", ranges=[(10, b"c" * 10), (3 * BLOCK_SIZE, b"d" * 100)])
        assert c0 is None and c1 is not None and c2 is None
        want[0][4096:8192] = b"a" * 4096
        want[1] = bytearray(b"b" * (5 * BLOCK_SIZE))
        want[2][10:20] = b"c" * 10
        want[2][3 * BLOCK_SIZE:3 * BLOCK_SIZE + 100] = b"d" * 100
        # nothing visible before the commit
        assert (await s.read(1, 0, 0, MiB))[0] == base[0]
        await s.commit_many([(1, 0, 2), (1, 1, 2), (1, 2, 2)], ("c", 1, 7, b"rec"))
        for i in range(3):
            data, meta = await s.read(1, i, 0, MiB)
            assert data == bytes(want[i]) and meta.version == 2 and meta.crc == checksum(bytes(want[i]))
        assert s.get(1, 0).file == old_files[0] and s.get(1, 2).file == old_files[2]
        assert not (tmp_path / old_files[1]).exists()
        assert s.db.execute("SELECT count(*) FROM redo").fetchone()[0] == 2
        assert s.dedup_get("c", 1) == (7, b"rec")
        # all or nothing: one chunk without the pending version named
        await s.prepare(1, 0, 3, "write", 0, b"x" * 100)
        with pytest.raises(RuntimeError, match="no pending version"):
            await s.commit_many([(1, 0, 3), (1, 1, 9)])
        assert s.get(1, 0).version == 2 and s.get(1, 0).pending_version == 3
        s.abort(1, 0)
        assert (await s.read(1, 0, 0, MiB))[0] == bytes(want[0])

    asyncio.run(main())
    s.close()
    s2 = ChunkStore(tmp_path, fsync=True)  # reopen: replays the redo records, same content

    async def check():
        for i in range(3):
            data, meta = await s2.read(1, i, 0, MiB)
            assert meta.version == 2 and checksum(data) == meta.crc

    asyncio.run(check())
    s2.close()


# --- storage service ----------------------------------------------------------------------------

@pytest.mark.service
@pytest.mark.timeout(240)
def test_write_chunks_matches_a_byte_model_and_replicas_agree(make_cluster):
    """Batches mixing aligned 4 KiB pieces, unaligned and multi-range updates, whole-chunk
    overwrites and chunks past the end (new chunks) over two chains at R=3: the file equals a
    byte model, every replica holds the same committed version and CRC, no pending versions."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=2, chunk_size=MiB)
    cs = MiB
    rng = random.Random(21)
    with cluster.client(retry_s=30) as fs:
        ref = bytearray(rng.randbytes(6 * cs - 1234))
        fs.write_bytes("/wb", bytes(ref))
        layout = fs.stat("/wb").layout
        with fs.open("/wb", "r+b") as f:
            inode = f.inode
            for round_ in range(4):
                updates = {}
                for idx in rng.sample(range(8), 6):
                    kind = rng.randrange(4)
                    if kind == 0:
                        updates[idx] = [(4096 * rng.randrange(255), rng.randbytes(4096))]
                    elif kind == 1:
                        updates[idx] = [(rng.randrange(cs - 9000), rng.randbytes(rng.randrange(1, 9000)))]
                    elif kind == 2:
                        updates[idx] = sorted((rng.randrange(cs - 600), rng.randbytes(500)) for _ in range(5))
                    else:
                        updates[idx] = [(0, rng.randbytes(cs))]
                out = f.write_chunks(updates)
                assert out == {idx: None for idx in updates}
                _apply(ref, cs, updates)
                assert f.pread(len(ref) + cs, 0) == bytes(ref)
        assert fs.read_bytes("/wb") == bytes(ref)
        for idx in range(8):
            m = _metas_agree(cluster, layout, inode, idx)
            assert m["crc"] == checksum(bytes(ref[idx * cs:idx * cs + m["length"]]))
            assert not any(ref[idx * cs + m["length"]:(idx + 1) * cs])  # past a chunk's end: zeros
        for c in layout["chains"]:
            chain_dumps_equal(cluster, c)


@pytest.mark.service
@pytest.mark.timeout(180)
def test_write_batch_bad_requests_get_clear_errors_and_the_server_survives(make_cluster):
    """Malformed ``write_batch`` arguments get RPC_BAD_ARGS naming what is wrong; the node keeps
    serving (a good batch right after succeeds) and nothing of the bad ones was applied."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=30) as fs:
        fs.write_bytes("/bad", b"\1" * (2 * MiB))
        st = fs.stat("/bad")
        chain_id = st.layout["chains"][0]
        r = cluster.routing()
        chain = r.chain(chain_id)
        head = r.address(chain["targets"][0]["node"])
        base = dict(chain_id=chain_id, chain_version=chain["version"])
        good = [st.inode, 0, [[0, b"ok"]]]
        cases = [
            ({"items": "nope"}, "items"),
            ({"items": []}, "non-empty"),
            ({"items": [good] * 2}, "appears twice"),
            ({"items": [[st.inode, 0]]}, "items[0]"),
            ({"items": [[st.inode, -1, [[0, b"x"]]]]}, "index"),
            ({"items": [[st.inode, 0, [[-5, b"x"]]]]}, "offset >= 0"),
            ({"items": [[st.inode, 0, []]]}, "non-empty list"),
            ({"items": [[st.inode, 0, [[0, "text"]]]]}, "bytes"),
            ({"items": [good, [st.inode, 1, [[0, b"x"]], 5, 1, None]]}, "every item"),
            ({"items": [[st.inode, 0, None, None, None, b"full"]]}, "only with an update_version"),
            ({"items": [[st.inode, i, [[0, b"x"]]] for i in range(2000)]}, "at most"),
            ({"items": [good], "seq": -1}, "seq"),
        ]
        for extra, words in cases:
            with pytest.raises(FsError) as ei:
                call(head, "write_batch", {**base, **extra})
            assert ei.value.code == Code.RPC_BAD_ARGS, (extra, ei.value)
            assert words in ei.value.message, (words, ei.value.message)
        # nothing applied; the node still serves, also a good batch right after
        m = replica_metas(cluster, st.layout, st.inode, 0)
        assert {x["version"] for x in m} == {1}
        res = call(head, "write_batch", {**base, "items": [good, [st.inode, 1, [[10, b"yy"]]]]})
        assert [len(x) for x in res["results"]] == [3, 3]
        assert fs.read_bytes("/bad")[:2] == b"ok"
        assert fs.read_bytes("/bad")[MiB + 10:MiB + 12] == b"yy"
        chain_dumps_equal(cluster, chain_id)


@pytest.mark.service
@pytest.mark.timeout(180)
def test_write_batch_retry_with_the_same_sequence_applies_once(make_cluster):
    """A batch sent again with the same (client, channel, seq) -- whole or a part -- returns the
    first results and applies nothing twice; an older sequence is refused."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=30) as fs:
        fs.write_bytes("/dup", b"\0" * (3 * MiB))
        st = fs.stat("/dup")
        chain_id = st.layout["chains"][0]
        r = cluster.routing()
        chain = r.chain(chain_id)
        head = r.address(chain["targets"][0]["node"])
        args = dict(chain_id=chain_id, chain_version=chain["version"], client="tester", channel=3, seq=5,
                    items=[[st.inode, i, [[100 * i, b"A" * 4096]]] for i in range(3)])
        first = call(head, "write_batch", args)["results"]
        assert [x[0] for x in first] == [2, 2, 2]
        # a later write of chunk 1 by someone else must not be undone by the retries below
        with fs.open("/dup", "r+b") as f:
            f.pwrite(b"B" * 4096, MiB + 100)
        again = call(head, "write_batch", args)["results"]
        assert again == first
        part = call(head, "write_batch", dict(args, items=args["items"][1:]))["results"]
        assert part == first[1:]
        data = fs.read_bytes("/dup")
        assert data[100 * 0:4096] == b"A" * 4096 and data[MiB + 100:MiB + 4196] == b"B" * 4096
        assert [m["version"] for m in replica_metas(cluster, st.layout, st.inode, 1)] == [3, 3, 3]
        with pytest.raises(FsError) as ei:
            call(head, "write_batch", dict(args, seq=4))
        assert ei.value.code == Code.EINVAL
        chain_dumps_equal(cluster, chain_id)


def _corrupt(cluster, target: dict, inode: int, index: int, version: int, at: int) -> None:
    """Flip bytes of one replica's chunk file in place (the committed version's file)."""
    info = call(cluster.routing().address(target["node"]), "node_info")
    root = info["targets"][target["id"]]["path"] if target["id"] in info["targets"] else \
        info["targets"][str(target["id"])]["path"]
    path = os.path.join(root, f"chunks/{inode % 256:02x}/{inode:x}.{index}.{version}")
    with open(path, "r+b") as fh:
        fh.seek(at)
        old = fh.read(16)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.service
@pytest.mark.timeout(180)
def test_write_batch_reports_each_chunk_failure_and_commits_the_others(make_cluster):
    """One chunk corrupt on the head, another corrupt on the tail: both are reported as
    CHECKSUM_MISMATCH (from the head's own check and from the tail's, forwarded back), left
    unchanged and without a pending version on every replica; the other chunks of the same batch
    commit everywhere."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    rng = random.Random(31)
    with cluster.client(retry_s=30) as fs:
        ref = bytearray(rng.randbytes(4 * MiB))
        fs.write_bytes("/pc", bytes(ref))
        st = fs.stat("/pc")
        chain = cluster.routing().chain(st.layout["chains"][0])
        head, tail = chain["targets"][0], chain["targets"][-1]
        _corrupt(cluster, head, st.inode, 0, 1, 100)
        _corrupt(cluster, tail, st.inode, 2, 1, 8192 + 100)
        # each update covers its corrupt 4 KiB piece only partly: the old bytes are read and checked
        updates = {0: [(50, b"x" * 10)], 1: [(4096, b"y" * 4096)], 2: [(8192 + 10, b"z" * 10)],
                   3: [(0, b"w" * 4096), (700_000, b"v" * 3000)]}
        with fs.open("/pc", "r+b") as f:
            out = f.write_chunks(updates)
        assert out[1] is None and out[3] is None, out
        for idx in (0, 2):
            assert isinstance(out[idx], FsError) and out[idx].code == Code.CHECKSUM_MISMATCH, out[idx]
        for idx in (0, 2):
            metas = replica_metas(cluster, st.layout, st.inode, idx)
            assert [(m["version"], m["pending_version"]) for m in metas] == [(1, None)] * 3, metas
        for idx in (1, 3):
            m = _metas_agree(cluster, st.layout, st.inode, idx)
            assert m["version"] == 2
        _apply(ref, MiB, {1: updates[1], 3: updates[3]})
        with fs.open("/pc", "rb") as f:
            for idx in (1, 3):
                data = f.pread(MiB, idx * MiB)
                assert data == bytes(ref[idx * MiB:(idx + 1) * MiB])


@pytest.mark.service
@pytest.mark.timeout(300)
def test_replica_killed_mid_batch_then_resynced(make_cluster):
    """SIGKILL of the middle replica while batches of small updates to many chunks stream in:
    every acknowledged batch reads back, the in-flight one is retried through the new chain, the
    restarted replica is resynced and all replicas end equal."""
    from openinfra.fs import TargetState

    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    cs = MiB
    nchunks = 12
    rng = random.Random(41)
    with cluster.client(retry_s=60) as fs:
        want = bytearray(rng.randbytes(nchunks * cs))
        fs.write_bytes("/kill", bytes(want))
        chain_id = fs.stat("/kill").layout["chains"][0]
        middle = cluster.routing().chain(chain_id)["targets"][1]
        # 200 batches: the kill lands after 8 acks, with seconds of batches still to go
        batches = [{idx: [(4096 * rng.randrange(256), rng.randbytes(4096)),
                          (rng.randrange(cs - 700), rng.randbytes(rng.choice([1, 300, 700])))]
                    for idx in rng.sample(range(nchunks), 10)} for _ in range(200)]
        acked: list[int] = []
        errors: list[BaseException] = []
        f = fs.open("/kill", "r+b")

        def writer():
            try:
                for i, b in enumerate(batches):
                    out = f.write_chunks(b)
                    bad = {k: v for k, v in out.items() if v is not None}
                    if bad:
                        raise AssertionError(f"batch {i}: {bad}")
                    acked.append(i)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 8 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        cluster.kill(storage_node_name(cluster, middle["node"]))
        acked_at_kill = len(acked)                         # read once the process is gone
        assert 8 <= acked_at_kill < len(batches), (
            f"{acked_at_kill} of {len(batches)} batches acknowledged when the kill landed: not mid-write ({errors})")
        cluster.wait_for(lambda r: any(x["id"] == middle["id"] and x["state"] == TargetState.OFFLINE
                                       for x in r.chain(chain_id)["targets"]), 30, "middle target offline")
        t.join(150)
        assert not t.is_alive()
        assert not errors, errors
        f.close()
        assert acked == list(range(len(batches)))
        for b in batches:
            _apply(want, cs, b)
        assert fs.read_bytes("/kill") == bytes(want)
        cluster.restart(storage_node_name(cluster, middle["node"]))
        cluster.wait_healthy(60)
        chain_dumps_equal(cluster, chain_id)
        with fs.open("/kill", "r+b") as g:
            assert g.write_chunks({3: [(5, b"after")], 7: [(9, b"again")]}) == {3: None, 7: None}
        _apply(want, cs, {3: [(5, b"after")], 7: [(9, b"again")]})
        assert fs.read_bytes("/kill") == bytes(want)
        chain_dumps_equal(cluster, chain_id)


@pytest.mark.service
@pytest.mark.timeout(180)
def test_stale_successor_gets_whole_chunks_and_replicas_converge(make_cluster):
    """A tail whose chunk took another update under the same version number (a forward whose
    predecessor then failed, say) answers STALE_UPDATE for it inside a batch; its predecessor
    resends that chunk whole, the other chunk of the batch goes through as ranges, and every
    replica ends with the same version, CRC and bytes."""
    cluster = make_cluster(storage_nodes=3, replication=3, stripe=1)
    with cluster.client(retry_s=30) as fs:
        ref = bytearray(random.Random(51).randbytes(2 * MiB))
        fs.write_bytes("/stale", bytes(ref))
        st = fs.stat("/stale")
        r = cluster.routing()
        chain = r.chain(st.layout["chains"][0])
        tail = r.address(chain["targets"][-1]["node"])
        # the tail alone gets a version-2 update of chunk 0 that the rest of the chain never saw
        res = call(tail, "write_batch", dict(chain_id=chain["id"], chain_version=chain["version"],
                                             items=[[st.inode, 0, [[0, b"T" * 100]], 2, 0, None]]))
        assert len(res["results"][0]) == 3
        assert [m["version"] for m in replica_metas(cluster, st.layout, st.inode, 0)] == [1, 1, 2]
        with fs.open("/stale", "r+b") as f:
            assert f.write_chunks({0: [(5000, b"a" * 4096)], 1: [(7, b"b" * 10)]}) == {0: None, 1: None}
        ref[5000:9096] = b"a" * 4096
        ref[MiB + 7:MiB + 17] = b"b" * 10
        for idx in (0, 1):
            m = _metas_agree(cluster, st.layout, st.inode, idx)
            assert m["version"] == 2 and m["crc"] == checksum(bytes(ref[idx * MiB:(idx + 1) * MiB]))
        assert fs.read_bytes("/stale") == bytes(ref)
        chain_dumps_equal(cluster, chain["id"])
