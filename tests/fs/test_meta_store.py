"""One metadata test suite on all three KV backends (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from openinfra.fs.errors import Code, FsError
from openinfra.fs.kv import open_kv
from openinfra.fs.meta.service import MetaConfig, MetaService
from openinfra.fs.meta.store import LayoutPolicy, MetaStore, User

pytestmark = pytest.mark.unit

ROOT, ALICE, BOB = User(), User(1000, 1000), User(2000, 2000, (1000,))


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.service)])
def kv_url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    return request.getfixturevalue("fresh_postgres_db")


class Meta:
    """MetaStore plus helpers that run each operation as its own transaction."""

    def __init__(self, kv):
        self.kv = kv
        self.store = MetaStore(kv, lambda table: (3, [11, 12, 13, 14]), LayoutPolicy(1 << 20, 2))

    async def __call__(self, op, *args, **kw):
        fn = getattr(self.store, op)
        if op in ("mkdir", "symlink", "open"):
            ino = await self.store.alloc_inode()
            if op == "open":
                return await self.kv.run(lambda t: fn(t, *args, ino, **kw))
            return await self.kv.run(lambda t: fn(t, *args, ino, **kw) if op == "mkdir" else fn(t, *args, ino))
        return await self.kv.run(lambda t: fn(t, *args, **kw))


def _run(kv_url, body):
    async def main():
        kv = await open_kv(kv_url)
        try:
            m = Meta(kv)
            await m.store.init()
            await body(m)
        finally:
            await kv.close()

    asyncio.run(main())


def test_create_stat_list_layout(kv_url):
    async def body(m):
        await m("mkdir", "/d", ROOT)
        node = await m("open", "/d/f", ROOT, write=False, read=False, create=True, exclusive=True)
        assert node["type"] == "file" and node["length"] == 0 and node["nlink"] == 1
        lay = node["layout"]
        assert lay["chunk_size"] == 1 << 20 and lay["stripe"] == 2 and lay["table_version"] == 3
        assert set(lay["chains"]) <= {11, 12, 13, 14} and len(set(lay["chains"])) == 2
        st = await m("stat", "/d/f", ROOT)
        assert st["id"] == node["id"]
        for i in range(5):
            await m("open", f"/d/g{i}", ROOT, write=False, read=False, create=True, exclusive=True)
        names = [e["name"] for e in await m("listdir", "/d", ROOT)]
        assert names == ["f", "g0", "g1", "g2", "g3", "g4"]
        with pytest.raises(FileExistsError):
            await m("open", "/d/f", ROOT, write=False, read=False, create=True, exclusive=True)
        with pytest.raises(FileExistsError):
            await m("mkdir", "/d", ROOT)
        with pytest.raises(FileNotFoundError):
            await m("stat", "/nope/f", ROOT)
        with pytest.raises(NotADirectoryError):
            await m("stat", "/d/f/x", ROOT)

    _run(kv_url, body)


def test_links_symlinks_rename_remove(kv_url):
    async def body(m):
        await m("mkdir", "/a", ROOT)
        await m("mkdir", "/a/b", ROOT)
        f = await m("open", "/a/b/f", ROOT, write=False, read=False, create=True, exclusive=True)
        await m("symlink", "/s", "a/b", ROOT)            # relative target
        assert (await m("stat", "/s/f", ROOT))["id"] == f["id"]
        assert (await m("stat", "/s", ROOT, follow=False))["type"] == "symlink"
        await m("symlink", "/loop1", "/loop2", ROOT)
        await m("symlink", "/loop2", "/loop1", ROOT)
        with pytest.raises(OSError) as ei:
            await m("stat", "/loop1", ROOT)
        assert ei.value.code == Code.ELOOP
        await m("hardlink", "/a/b/f", "/h", ROOT)
        assert (await m("stat", "/h", ROOT))["nlink"] == 2
        with pytest.raises(PermissionError):
            await m("hardlink", "/a", "/adir", ROOT)
        # rename: into own subtree refused; over an empty dir ok; file over dir refused
        with pytest.raises(OSError) as ei:
            await m("rename", "/a", "/a/b/c", ROOT)
        assert ei.value.code == Code.EINVAL
        await m("mkdir", "/empty", ROOT)
        await m("rename", "/a/b", "/empty", ROOT)
        assert (await m("stat", "/empty/f", ROOT))["id"] == f["id"]
        assert (await m("stat", "/empty", ROOT))["parent"] == 1
        with pytest.raises(IsADirectoryError):
            await m("rename", "/h", "/a", ROOT)
        g = await m("open", "/g", ROOT, write=False, read=False, create=True, exclusive=True)
        await m("rename", "/g", "/h", ROOT)                # replaces a file: its link count drops
        assert (await m("stat", "/h", ROOT))["id"] == g["id"]
        assert (await m("stat", "/empty/f", ROOT))["nlink"] == 1
        with pytest.raises(OSError) as ei:
            await m("remove", "/empty", ROOT)
        assert ei.value.code == Code.ENOTEMPTY
        await m("remove", "/empty/f", ROOT)
        await m("remove", "/empty", ROOT)
        with pytest.raises(PermissionError):
            await m("remove", "/", ROOT)
        assert sorted(e["name"] for e in await m("listdir", "/", ROOT)) == ["a", "h", "loop1", "loop2", "s"]

    _run(kv_url, body)


def test_permissions_and_setattr(kv_url):
    async def body(m):
        await m("mkdir", "/home", ROOT, mode=0o755)
        with pytest.raises(PermissionError):
            await m("mkdir", "/home/alice", ALICE)
        await m("setattr", "/home", ROOT, mode=0o777)
        await m("mkdir", "/home/alice", ALICE, mode=0o750)
        f = await m("open", "/home/alice/f", ALICE, write=False, read=False, create=True, exclusive=True, mode=0o640)
        assert (f["uid"], f["gid"]) == (1000, 1000)
        # bob is in group 1000: can read through r-x group bits, cannot write
        await m("open", "/home/alice/f", BOB, write=False, read=True, create=False, exclusive=False)
        with pytest.raises(PermissionError):
            await m("open", "/home/alice/f", BOB, write=True, read=False, create=False, exclusive=False)
        with pytest.raises(PermissionError):
            await m("setattr", "/home/alice/f", BOB, mode=0o777)
        with pytest.raises(PermissionError):
            await m("setattr", "/home/alice/f", ALICE, uid=0)
        await m("setattr", "/home/alice/f", ALICE, gid=1000, mtime=123.0)
        assert (await m("stat", "/home/alice/f", ALICE))["mtime"] == 123.0
        await m("setattr", "/home/alice", ALICE, mode=0o700)
        with pytest.raises(PermissionError):
            await m("stat", "/home/alice/f", BOB)
        await m("setattr", "/home/alice/f", ROOT, uid=2000)
        assert (await m("stat", "/home/alice/f", ROOT))["uid"] == 2000

    _run(kv_url, body)


def test_sessions_lengths_and_deferred_delete(kv_url):
    async def body(m):
        sess = b"s" * 16
        f = await m("open", "/f", ROOT, write=True, read=False, create=True, exclusive=False, session=sess, client="c")
        await m("report_length", f["id"], sess, 5000)
        await m("report_length", f["id"], sess, 100)       # reports only grow the length
        assert (await m("stat", "/f", ROOT))["length"] == 5000
        await m("remove", "/f", ROOT)                       # open for writing: GC waits for close
        gc = await m.kv.run(lambda t: t.get_range(b"GCIN", b"GCIO"))
        assert gc == []
        await m("close_session", f["id"], sess, 6000)
        gc = await m.kv.run(lambda t: t.get_range(b"GCIN", b"GCIO"))
        assert len(gc) == 1
        g = await m("open", "/g", ROOT, write=False, read=False, create=True, exclusive=True)
        await m("set_length", g["id"], 10, ROOT)
        assert (await m("stat", "/g", ROOT))["length"] == 10
        with pytest.raises(OSError):
            await m("set_length", g["id"], -1, ROOT)

    _run(kv_url, body)


def test_concurrent_creates_in_one_directory_lose_nothing(kv_url):
    async def body(m):
        await m("mkdir", "/c", ROOT)
        await asyncio.gather(*(m("open", f"/c/f{i}", ROOT, write=False, read=False, create=True, exclusive=True)
                               for i in range(40)))
        assert len(await m("listdir", "/c", ROOT)) == 40
        ids = {e["inode"] for e in await m("listdir", "/c", ROOT)}
        assert len(ids) == 40

    _run(kv_url, body)


def test_idempotent_requests_return_first_result(kv_url):
    async def main():
        kv = await open_kv(kv_url)
        svc = MetaService(MetaConfig(node_id=1, mgmtd=["127.0.0.1:1"]), kv)
        try:
            await svc.store.init()
            await svc.rpc_mkdir("/x")
            first = await svc.rpc_remove("/x", client="c1", req="r1")
            again = await svc.rpc_remove("/x", client="c1", req="r1")   # the first reply was "lost"
            assert first == again
            with pytest.raises(FileNotFoundError):
                await svc.rpc_remove("/x", client="c1", req="r2")
            with pytest.raises(ValueError, match="user"):
                await svc.rpc_stat("/", user={"uid": "root"})
        finally:
            await svc.rpc.close()
            await kv.close()

    asyncio.run(main())


def test_layout_policy_validates():
    with pytest.raises(ValueError, match="chunk_size"):
        LayoutPolicy(1000, 1)
    with pytest.raises(ValueError, match="stripe"):
        LayoutPolicy(1 << 20, 0)
    with pytest.raises(FsError):
        asyncio.run(_no_chains())


async def _no_chains():
    kv = await open_kv("memory://")
    store = MetaStore(kv, lambda t: (0, []))
    await store.init()
    ino = await store.alloc_inode()
    await kv.run(lambda t: store.open(t, "/f", ROOT, ino, write=False, read=False, create=True, exclusive=True))


def test_detach_and_empty_tree_in_small_steps(kv_url):
    """Server-side tree delete at the store level: one transaction unlinks the tree, then steps of
    a few entries each empty it depth first; every inode and dentry of the tree is gone at the end,
    files queued for chunk GC, and nothing outside the tree is touched."""
    from openinfra.fs.kv import prefix_end
    from openinfra.fs.meta.store import DENT, GCIN, INOD, TRSH

    async def body(m):
        await m("mkdir", "/keep", ROOT)
        await m("mkdir", "/t", ROOT)
        made = 0
        for d in ("/t", "/t/a", "/t/a/b", "/t/c"):
            if d != "/t":
                await m("mkdir", d, ROOT)
            for i in range(3):
                await m("open", f"{d}/f{i}", ROOT, write=False, read=False, create=True, exclusive=True)
                made += 1
        await m("symlink", "/t/a/b/link", "/keep", ROOT)
        before = await m.kv.run(lambda t: t.get_range(INOD, prefix_end(INOD)), read_only=True)
        r = await m("detach_tree", "/t", ROOT)
        assert r["queued"] and r["type"] == "dir"
        with pytest.raises(FileNotFoundError):
            await m("stat", "/t", ROOT)
        files = dirs = steps = 0
        finished = False
        while not finished:
            f, d, finished = await m("empty_tree_step", r["inode"], 2)
            files, dirs, steps = files + f, dirs + d, steps + 1
            assert steps < 100
        assert (files, dirs) == (made + 1, 4) and steps > 5
        after = await m.kv.run(lambda t: t.get_range(INOD, prefix_end(INOD)), read_only=True)
        gone = {k for k, _ in before} - {k for k, _ in after}
        assert len(gone) == 4 + 1  # the 4 directories and the symlink; files wait for chunk GC
        assert len(await m.kv.run(lambda t: t.get_range(GCIN, prefix_end(GCIN)), read_only=True)) == made
        assert await m.kv.run(lambda t: t.get_range(TRSH, prefix_end(TRSH)), read_only=True) == []
        dents = await m.kv.run(lambda t: t.get_range(DENT, prefix_end(DENT)), read_only=True)
        assert len(dents) == 1  # only /keep's entry in /
        assert [e["name"] for e in await m("listdir", "/", ROOT)] == ["keep"]
        with pytest.raises(ValueError, match="budget"):
            await m("empty_tree_step", r["inode"], 0)

    _run(kv_url, body)
