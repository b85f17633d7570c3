"""Multi-range chunk updates (storage ``writev``, ``File.pwritev``) against a real cluster (R=2)."""

from __future__ import annotations

import random

import pytest

from tests.fs.conftest import replica_metas

pytestmark = pytest.mark.service


def test_pwritev_matches_a_byte_model_and_replicas_agree(cluster, fs_client, workdir):
    cs = 1 << 20
    rng = random.Random(7)
    model = bytearray(rng.randbytes(2 * cs + 5000))
    path = f"{workdir}/v"
    fs_client.write_bytes(path, bytes(model))
    pieces = []
    for _ in range(40):  # many small pieces per chunk, some overlapping, in every chunk
        off = rng.randrange(0, len(model) - 4096)
        pieces.append((off, rng.randbytes(rng.choice([1, 100, 4096]))))
    pieces.append((cs - 10, b"A" * 20))  # across a chunk boundary
    pieces.append((len(model) + 3000, b"tail"))  # past EOF inside the last chunk: a zero gap
    with fs_client.open(path, "r+b") as f:
        assert f.pwritev(pieces) == sum(len(d) for _, d in pieces)
    for off, data in pieces:  # in order: a later piece wins where they overlap
        if off > len(model):
            model += bytes(off - len(model))
        model[off:off + len(data)] = data
    assert fs_client.read_bytes(path) == bytes(model)
    st = fs_client.stat(path)
    assert st.size == len(model)
    for index in range(3):
        metas = replica_metas(cluster, st.layout, st.inode, index)
        assert all(m is not None for m in metas)
        assert len({(m["version"], m["crc"], m["length"]) for m in metas}) == 1, metas


def test_writev_rejects_bad_ranges(cluster, fs_client, workdir):
    from openinfra.fs.client.storage_client import chunk_chain
    from openinfra.fs.cluster import call

    path = f"{workdir}/bad"
    fs_client.write_bytes(path, b"x" * 100)
    st = fs_client.stat(path)
    r = cluster.routing()
    chain_id = chunk_chain(st.layout, 0)
    head = r.serving(chain_id)[0]
    args = dict(chain_id=chain_id, chain_version=r.chain(chain_id)["version"], inode=st.inode, index=0, op="writev")
    for bad in (None, [], [[-1, b"x"]], [[0, "text"]], [[0]], [[True, b"x"]]):
        with pytest.raises(Exception, match="ranges"):
            call(r.address(head["node"]), "write", {**args, "ranges": bad})
    assert fs_client.read_bytes(path) == b"x" * 100  # nothing applied, the node still serves
    with fs_client.open(path, "r+b") as f:
        with pytest.raises(TypeError):
            f.pwritev([(0, "text")])
        with pytest.raises(TypeError):
            f.pwritev("nope")
