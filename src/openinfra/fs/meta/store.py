"""Metadata operations, each one serializable KV transaction (runs on memory, SQLite, PostgreSQL).

Key layout (3FS's prefixes): ``INOD`` + inode id (8 bytes LE) -> inode; ``DENT`` + parent id +
name -> entry (one directory = one contiguous key range); ``INOS`` + inode + session -> write
session; ``IDEM`` + client + request id -> the first result of a non-idempotent request;
``GCIN`` + inode -> a deleted file whose chunks still have to be removed; ``CONF`` -> counters.

Inode (msgpack map): ``id, type ("file"|"dir"|"symlink"), mode (permission bits), uid, gid, nlink,
atime, mtime, ctime`` and ``length, layout`` for files, ``parent`` for directories (rename walks
it to refuse moving a directory under itself), ``target`` for symlinks. Layout: ``table,
table_version, chunk_size, stripe, chains``; chunk i of a file is on ``chains[i % stripe]``.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from openinfra.fs.errors import Code, FsError
from openinfra.fs.kv import KVEngine, Transaction, prefix_end
from openinfra.fs.meta.paths import split_path

__all__ = ["MetaStore", "User", "ROOT_INODE", "LayoutPolicy", "inode_key", "dent_prefix", "TRSH"]

ROOT_INODE = 1
INOD, DENT, INOS, IDEM, GCIN, CONF = b"INOD", b"DENT", b"INOS", b"IDEM", b"GCIN", b"CONF"
TRSH = b"TRSH"  # trees unlinked by detach_tree and not yet emptied: TRSH + inode -> {"ts", "path"}
NEXT_INODE = CONF + b"next-inode"
MAX_SYMLINK_DEPTH = 8
R, W, X = 4, 2, 1


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def inode_key(ino: int) -> bytes:
    return INOD + struct.pack("<Q", ino)


def dent_prefix(parent: int) -> bytes:
    return DENT + struct.pack("<Q", parent)


def _dent_key(parent: int, name: str) -> bytes:
    return dent_prefix(parent) + name.encode()


def _err(code: str, msg: str) -> FsError:
    from openinfra.fs.errors import make_error

    return make_error(code, msg)


@dataclass(frozen=True)
class User:
    """Who asks: uid, primary gid and supplementary gids. uid 0 passes permission checks."""

    uid: int = 0
    gid: int = 0
    gids: tuple[int, ...] = ()

    @classmethod
    def from_wire(cls, d: dict | None) -> "User":
        if d is None:
            return cls()
        if not isinstance(d, dict) or not isinstance(d.get("uid", 0), int) or not isinstance(d.get("gid", 0), int):
            raise ValueError(f"user: expected {{'uid': int, 'gid': int, 'gids': [int]}}, got {d!r}")
        return cls(d.get("uid", 0), d.get("gid", 0), tuple(d.get("gids", ())))

    def wire(self) -> dict:
        return {"uid": self.uid, "gid": self.gid, "gids": list(self.gids)}


@dataclass
class LayoutPolicy:
    """Defaults for new files: chunk size (bytes), stripe (chains per file), and the chain table."""

    chunk_size: int = 1 << 20
    stripe: int = 16
    table: int = 1

    def __post_init__(self):
        if not (512 << 10) // 8 <= self.chunk_size <= 64 << 20 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two from 64 KiB to 64 MiB, got {self.chunk_size}")
        if self.stripe < 1:
            raise ValueError(f"stripe: expected >= 1, got {self.stripe}")


def check_access(inode: dict, user: User, want: int) -> None:
    if user.uid == 0:
        if want & X and inode["type"] == "file" and not inode["mode"] & 0o111:
            raise _err(Code.EACCES, f"inode {inode['id']}: no execute bit set")
        return
    mode = inode["mode"]
    if user.uid == inode["uid"]:
        bits = (mode >> 6) & 7
    elif inode["gid"] == user.gid or inode["gid"] in user.gids:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    if bits & want != want:
        need = "".join(c for c, b in (("r", R), ("w", W), ("x", X)) if want & b)
        raise _err(Code.EACCES, f"uid {user.uid} lacks '{need}' permission on inode {inode['id']}")


@dataclass
class MetaStore:
    """The namespace on a KV engine. ``chain_table(table_id) -> (version, [chain ids])`` gives the
    chains new files are spread over (mgmtd's chain table, via routing info)."""

    kv: KVEngine
    chain_table: Any = None
    policy: LayoutPolicy = field(default_factory=LayoutPolicy)
    _ids: list[int] = field(default_factory=list)
    _id_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    id_block: int = 256

    # --- setup and ids -------------------------------------------------------------------------

    async def init(self) -> None:
        """Create the root directory (mode 0o777 like /tmp without the sticky bit) once."""

        async def fn(txn: Transaction):
            if await txn.get(inode_key(ROOT_INODE)) is None:
                now = time.time()
                await txn.set(inode_key(ROOT_INODE), _pack({
                    "id": ROOT_INODE, "type": "dir", "mode": 0o777, "uid": 0, "gid": 0, "nlink": 2,
                    "atime": now, "mtime": now, "ctime": now, "parent": ROOT_INODE}))
                if await txn.get(NEXT_INODE) is None:
                    await txn.set(NEXT_INODE, b"2")

        await self.kv.run(fn)

    async def alloc_inode(self) -> int:
        """A fresh inode id; ids come in blocks so concurrent creates do not all fight over one key."""
        async with self._id_lock:
            return await self._alloc_locked()

    async def _alloc_locked(self) -> int:
        if not self._ids:
            block = self.id_block

            async def fn(txn: Transaction):
                start = int(await txn.get(NEXT_INODE) or b"2")
                await txn.set(NEXT_INODE, str(start + block).encode())
                return start

            start = await self.kv.run(fn)
            self._ids = list(range(start + block - 1, start - 1, -1))
        return self._ids.pop()

    def _layout(self, ino: int, parent: dict, chunk_size: int | None, stripe: int | None) -> dict:
        pol = parent.get("dir_layout") or {}
        cs = chunk_size or pol.get("chunk_size") or self.policy.chunk_size
        st = stripe or pol.get("stripe") or self.policy.stripe
        LayoutPolicy(cs, st)  # validates
        table = pol.get("table") or self.policy.table
        version, chains = self.chain_table(table) if self.chain_table else (0, [])
        if not chains:
            raise _err(Code.EIO, f"chain table {table} has no chains (is the cluster's storage set up?)")
        # A shuffled window of the table, seeded by the inode: files spread over all chains.
        rng = random.Random(ino)
        start = rng.randrange(len(chains))
        st = min(st, len(chains))
        picked = [chains[(start + i) % len(chains)] for i in range(st)]
        rng.shuffle(picked)
        return {"table": table, "table_version": version, "chunk_size": cs, "stripe": st, "chains": picked}

    # --- lookup --------------------------------------------------------------------------------

    @staticmethod
    async def get_inode(txn: Transaction, ino: int) -> dict | None:
        raw = await txn.get(inode_key(ino))
        return None if raw is None else _unpack(raw)

    async def _must_inode(self, txn: Transaction, ino: int) -> dict:
        node = await self.get_inode(txn, ino)
        if node is None:
            raise _err(Code.ENOENT, f"inode {ino} does not exist")
        return node

    async def _lookup(self, txn: Transaction, parent: int, name: str) -> dict | None:
        raw = await txn.get(_dent_key(parent, name))
        return None if raw is None else _unpack(raw)

    async def resolve(self, txn: Transaction, path: str, user: User, follow: bool = True,
                      _depth: int = 0) -> tuple[dict, str, dict | None]:
        """``(parent dir inode, last name, inode or None)``; for ``/`` the parent is root and name ''."""
        parts = split_path(path)
        cur = await self._must_inode(txn, ROOT_INODE)
        if not parts:
            return cur, "", cur
        walked = "/"
        for i, name in enumerate(parts):
            if cur["type"] != "dir":
                raise _err(Code.ENOTDIR, f"{walked} is not a directory")
            check_access(cur, user, X)
            last = i == len(parts) - 1
            ent = await self._lookup(txn, cur["id"], name)
            if last:
                node = await self._must_inode(txn, ent["inode"]) if ent else None
                if node is not None and node["type"] == "symlink" and follow:
                    return await self._follow(txn, walked, node, user, True, _depth)
                return cur, name, node
            if ent is None:
                raise _err(Code.ENOENT, f"{walked.rstrip('/')}/{name} does not exist")
            node = await self._must_inode(txn, ent["inode"])
            if node["type"] == "symlink":
                _, _, node = await self._follow(txn, walked, node, user, True, _depth)
                if node is None:
                    raise _err(Code.ENOENT, f"dangling symlink {walked.rstrip('/')}/{name}")
            cur = node
            walked = walked.rstrip("/") + "/" + name
        raise AssertionError("unreachable")

    async def _follow(self, txn, base: str, link: dict, user: User, follow: bool, depth: int):
        if depth >= MAX_SYMLINK_DEPTH:
            raise _err(Code.ELOOP, f"more than {MAX_SYMLINK_DEPTH} symlinks")
        target = link["target"]
        path = target if target.startswith("/") else base.rstrip("/") + "/" + target
        return await self.resolve(txn, path, user, follow, depth + 1)

    # --- operations (each is run inside kv.run by the caller) ----------------------------------

    async def stat(self, txn: Transaction, path: str, user: User, follow: bool = True) -> dict:
        _, _, node = await self.resolve(txn, path, user, follow)
        if node is None:
            raise _err(Code.ENOENT, f"{path} does not exist")
        return node

    async def listdir(self, txn: Transaction, path: str, user: User, with_attrs: bool = False,
                      limit: int = 0) -> list:
        node = await self.stat(txn, path, user)
        if node["type"] != "dir":
            raise _err(Code.ENOTDIR, f"{path} is not a directory")
        check_access(node, user, R)
        p = dent_prefix(node["id"])
        out = []
        for k, v in await txn.get_range(p, prefix_end(p), limit):
            ent = _unpack(v)
            item = {"name": k[len(p):].decode(), "inode": ent["inode"], "type": ent["type"]}
            if with_attrs:
                item["attrs"] = await self.get_inode(txn, ent["inode"])
            out.append(item)
        return out

    async def _new_entry(self, txn: Transaction, path: str, user: User, ino: int, kind: str, mode: int,
                         extra: dict, exist_ok: bool = False, resolved: tuple | None = None) -> tuple[dict, bool]:
        parent, name, node = resolved or await self.resolve(txn, path, user, follow=False)
        if not name:
            raise _err(Code.EEXIST, "/ exists")
        if node is not None:
            if exist_ok:
                return node, False
            raise _err(Code.EEXIST, f"{path} exists")
        check_access(parent, user, W | X)
        now = time.time()
        inode = {"id": ino, "type": kind, "mode": mode & 0o7777, "uid": user.uid, "gid": user.gid,
                 "nlink": 2 if kind == "dir" else 1, "atime": now, "mtime": now, "ctime": now, **extra}
        if kind == "dir":
            inode["parent"] = parent["id"]
        if kind == "file":
            inode["length"] = 0
            inode["layout"] = self._layout(ino, parent, extra.pop("chunk_size", None), extra.pop("stripe", None))
            inode.pop("chunk_size", None)
            inode.pop("stripe", None)
        await txn.set(inode_key(ino), _pack(inode))
        await txn.set(_dent_key(parent["id"], name), _pack({"inode": ino, "type": kind}))
        return inode, True

    async def mkdir(self, txn: Transaction, path: str, user: User, ino: int, mode: int = 0o755,
                    exist_ok: bool = False, layout: dict | None = None) -> dict:
        extra = {"dir_layout": layout} if layout else {}
        node, _ = await self._new_entry(txn, path, user, ino, "dir", mode, extra, exist_ok)
        if node["type"] != "dir":
            raise _err(Code.EEXIST, f"{path} exists and is not a directory")
        return node

    async def symlink(self, txn: Transaction, path: str, target: str, user: User, ino: int) -> dict:
        if not isinstance(target, str) or not target or "\x00" in target or len(target) > 4096:
            raise _err(Code.EINVAL, f"target: expected a non-empty path without NUL, got {target!r}")
        node, _ = await self._new_entry(txn, path, user, ino, "symlink", 0o777, {"target": target})
        return node

    async def open(self, txn: Transaction, path: str, user: User, ino: int, *, write: bool, read: bool,
                   create: bool, exclusive: bool, mode: int = 0o644, session: bytes | None = None,
                   client: str = "", chunk_size: int | None = None, stripe: int | None = None) -> dict:
        """Open (and maybe create) a file; a write open records a session. Returns the inode."""
        parent, name, node = await self.resolve(txn, path, user, follow=True)
        if node is None:
            if not create:
                raise _err(Code.ENOENT, f"{path} does not exist")
            node, _ = await self._new_entry(txn, path, user, ino, "file", mode,
                                            {"chunk_size": chunk_size, "stripe": stripe}, resolved=(parent, name, None))
        else:
            if create and exclusive:
                raise _err(Code.EEXIST, f"{path} exists")
            if node["type"] == "dir":
                if write:
                    raise _err(Code.EISDIR, f"{path} is a directory")
                raise _err(Code.EISDIR, f"{path} is a directory; use listdir")
            check_access(node, user, (R if read else 0) | (W if write else 0))
        if write and session is not None:
            await txn.set(INOS + struct.pack("<Q", node["id"]) + session, _pack({"client": client, "ts": time.time()}))
        return node

    async def close_session(self, txn: Transaction, ino: int, session: bytes, length: int | None) -> dict | None:
        """End a write session; ``length`` (exact, from storage) grows the file. A file unlinked
        while open is queued for chunk GC when its last session ends."""
        node = await self.get_inode(txn, ino)
        await txn.clear(INOS + struct.pack("<Q", ino) + session)
        if node is None:
            return None
        if length is not None and length > node.get("length", 0):
            node["length"] = length
            node["mtime"] = time.time()
            await txn.set(inode_key(ino), _pack(node))
        if node["nlink"] == 0:
            p = INOS + struct.pack("<Q", ino)
            if not await txn.get_range(p, prefix_end(p), 1):
                await txn.set(GCIN + struct.pack("<Q", ino), _pack({"ts": time.time()}))
        return node

    async def report_length(self, txn: Transaction, ino: int, session: bytes, length: int) -> None:
        """A writer's periodic report: the file is at least ``length`` bytes; the session is alive."""
        key = INOS + struct.pack("<Q", ino) + session
        raw = await txn.get(key)
        if raw is not None:
            s = _unpack(raw)
            s["ts"] = time.time()
            await txn.set(key, _pack(s))
        node = await self.get_inode(txn, ino)
        if node is not None and node["type"] == "file" and length > node["length"]:
            node["length"] = length
            node["mtime"] = time.time()
            await txn.set(inode_key(ino), _pack(node))

    async def set_length(self, txn: Transaction, ino: int, length: int, user: User) -> dict:
        """Truncate/extend to exactly ``length`` (the caller already trimmed chunks past it)."""
        if not isinstance(length, int) or length < 0:
            raise _err(Code.EINVAL, f"length: expected an int >= 0, got {length!r}")
        node = await self._must_inode(txn, ino)
        if node["type"] != "file":
            raise _err(Code.EISDIR, f"inode {ino} is not a file")
        check_access(node, user, W)
        node["length"] = length
        node["mtime"] = node["ctime"] = time.time()
        await txn.set(inode_key(ino), _pack(node))
        return node

    async def _drop_link(self, txn: Transaction, node: dict) -> None:
        node["nlink"] -= 1
        node["ctime"] = time.time()
        if node["nlink"] > 0 or node["type"] == "dir":
            if node["type"] == "dir":
                await txn.clear(inode_key(node["id"]))
            else:
                await txn.set(inode_key(node["id"]), _pack(node))
            return
        if node["type"] == "symlink":
            await txn.clear(inode_key(node["id"]))
            return
        await txn.set(inode_key(node["id"]), _pack(node))
        p = INOS + struct.pack("<Q", node["id"])
        if not await txn.get_range(p, prefix_end(p), 1):  # not open for writing: collect now
            await txn.set(GCIN + struct.pack("<Q", node["id"]), _pack({"ts": time.time()}))

    async def _removable(self, txn: Transaction, path: str, user: User) -> tuple[dict, str, dict]:
        """``(parent, name, node)`` of ``path`` once it may be unlinked: not ``/``, existing, and
        write + search permission on its parent."""
        parent, name, node = await self.resolve(txn, path, user, follow=False)
        if not name:
            raise _err(Code.EPERM, "cannot remove /")
        if node is None:
            raise _err(Code.ENOENT, f"{path} does not exist")
        check_access(parent, user, W | X)
        return parent, name, node

    async def remove(self, txn: Transaction, path: str, user: User) -> dict:
        parent, name, node = await self._removable(txn, path, user)
        if node["type"] == "dir":
            p = dent_prefix(node["id"])
            if await txn.get_range(p, prefix_end(p), 1):
                raise _err(Code.ENOTEMPTY, f"{path} is not empty")
        await txn.clear(_dent_key(parent["id"], name))
        await self._drop_link(txn, node)
        return {"inode": node["id"], "type": node["type"]}

    async def detach_tree(self, txn: Transaction, path: str, user: User) -> dict:
        """Server-side ``rm -r``, step 1: unlink ``path`` from the namespace and, for a directory,
        queue its whole tree for :meth:`empty_tree_step` -- one transaction, so every reader sees
        the tree vanish at once. Permissions as ``rm -r`` would need them: write + search on the
        parent and on every directory of the tree (checked here, before anything changes; root
        needs none). A file or symlink is simply removed. Returns ``{"inode", "type", "queued"}``."""
        parent, name, node = await self._removable(txn, path, user)
        if node["type"] != "dir":
            return {**await self.remove(txn, path, user), "queued": False}
        if user.uid != 0:
            stack = [node]
            while stack:
                d = stack.pop()
                check_access(d, user, W | X)
                p = dent_prefix(d["id"])
                for _, raw in await txn.get_range(p, prefix_end(p)):
                    ent = _unpack(raw)
                    if ent["type"] == "dir":
                        stack.append(await self._must_inode(txn, ent["inode"]))
        await txn.clear(_dent_key(parent["id"], name))
        await txn.set(TRSH + struct.pack("<Q", node["id"]), _pack({"ts": time.time(), "path": path}))
        return {"inode": node["id"], "type": "dir", "queued": True}

    async def empty_tree_step(self, txn: Transaction, root: int, budget: int = 512) -> tuple[int, int, bool]:
        """Server-side ``rm -r``, step 2: remove up to ``budget`` entries of the tree detached at
        inode ``root``, depth first (a directory goes once it is empty), in this transaction.
        Files lose one link each (their chunks follow through the usual GC queue, or at last close
        when open for writing; a hard link outside the tree keeps the file). Returns
        ``(files, dirs, finished)``; ``finished`` means the tree and its queue entry are gone."""
        if budget < 1:
            raise ValueError(f"budget: expected >= 1, got {budget}")
        files = dirs = 0
        stack: list[tuple[int, bytes | None]] = [(root, None)]  # (directory inode, its dentry key)
        while stack and budget > 0:
            d, d_key = stack[-1]
            p = dent_prefix(d)
            rows = await txn.get_range(p, prefix_end(p), budget)
            if not rows:  # empty: the directory itself goes
                stack.pop()
                await txn.clear(inode_key(d))
                if d_key is None:
                    await txn.clear(TRSH + struct.pack("<Q", root))
                    return files, dirs + 1, True
                await txn.clear(d_key)
                dirs += 1
                budget -= 1
                continue
            for key, raw in rows:
                ent = _unpack(raw)
                if ent["type"] == "dir":
                    stack.append((ent["inode"], key))  # descend first; the rest of d comes after
                    break
                await txn.clear(key)
                child = await self.get_inode(txn, ent["inode"])
                if child is not None:
                    await self._drop_link(txn, child)
                files += 1
                budget -= 1
        return files, dirs, False

    async def hardlink(self, txn: Transaction, src: str, dst: str, user: User) -> dict:
        _, _, node = await self.resolve(txn, src, user, follow=False)
        if node is None:
            raise _err(Code.ENOENT, f"{src} does not exist")
        if node["type"] == "dir":
            raise _err(Code.EPERM, f"{src}: hard links to directories are not allowed")
        parent, name, existing = await self.resolve(txn, dst, user, follow=False)
        if existing is not None:
            raise _err(Code.EEXIST, f"{dst} exists")
        check_access(parent, user, W | X)
        node["nlink"] += 1
        node["ctime"] = time.time()
        await txn.set(inode_key(node["id"]), _pack(node))
        await txn.set(_dent_key(parent["id"], name), _pack({"inode": node["id"], "type": node["type"]}))
        return node

    async def rename(self, txn: Transaction, src: str, dst: str, user: User) -> dict:
        sparent, sname, snode = await self.resolve(txn, src, user, follow=False)
        if snode is None:
            raise _err(Code.ENOENT, f"{src} does not exist")
        if not sname:
            raise _err(Code.EINVAL, "cannot rename /")
        dparent, dname, dnode = await self.resolve(txn, dst, user, follow=False)
        if not dname:
            raise _err(Code.EEXIST, "cannot rename onto /")
        check_access(sparent, user, W | X)
        check_access(dparent, user, W | X)
        if snode["type"] == "dir":
            # Refuse moving a directory under itself: walk up from the destination's parent.
            cur = dparent
            for _ in range(4096):
                if cur["id"] == snode["id"]:
                    raise _err(Code.EINVAL, f"cannot move {src} into its own subtree {dst}")
                if cur["id"] == ROOT_INODE:
                    break
                cur = await self._must_inode(txn, cur["parent"])
        if dnode is not None:
            if dnode["id"] == snode["id"]:
                return snode
            if snode["type"] == "dir" and dnode["type"] != "dir":
                raise _err(Code.ENOTDIR, f"{dst} is not a directory")
            if snode["type"] != "dir" and dnode["type"] == "dir":
                raise _err(Code.EISDIR, f"{dst} is a directory")
            if dnode["type"] == "dir":
                p = dent_prefix(dnode["id"])
                if await txn.get_range(p, prefix_end(p), 1):
                    raise _err(Code.ENOTEMPTY, f"{dst} is not empty")
            await self._drop_link(txn, dnode)
        await txn.clear(_dent_key(sparent["id"], sname))
        await txn.set(_dent_key(dparent["id"], dname), _pack({"inode": snode["id"], "type": snode["type"]}))
        snode["ctime"] = time.time()
        if snode["type"] == "dir":
            snode["parent"] = dparent["id"]
        await txn.set(inode_key(snode["id"]), _pack(snode))
        return snode

    async def setattr(self, txn: Transaction, path: str, user: User, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, atime: float | None = None,
                      mtime: float | None = None, follow: bool = True) -> dict:
        node = await self.stat(txn, path, user, follow)
        owner = user.uid == 0 or user.uid == node["uid"]
        if mode is not None:
            if not owner:
                raise _err(Code.EPERM, f"only the owner or root may chmod {path}")
            if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise _err(Code.EINVAL, f"mode: expected 0..0o7777, got {mode!r}")
            node["mode"] = mode
        if uid is not None and uid != node["uid"]:
            if user.uid != 0:
                raise _err(Code.EPERM, f"only root may chown {path}")
            node["uid"] = uid
        if gid is not None and gid != node["gid"]:
            if not (user.uid == 0 or (owner and (gid == user.gid or gid in user.gids))):
                raise _err(Code.EPERM, f"uid {user.uid} may not chgrp {path} to {gid}")
            node["gid"] = gid
        if atime is not None or mtime is not None:
            if not owner:
                check_access(node, user, W)
            node["atime"] = atime if atime is not None else node["atime"]
            node["mtime"] = mtime if mtime is not None else node["mtime"]
        node["ctime"] = time.time()
        await txn.set(inode_key(node["id"]), _pack(node))
        return node
