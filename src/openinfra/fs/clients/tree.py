"""Fast delete of a whole directory tree.

3FS deletes a tree on the server: the directory is first moved into a trash directory (one atomic
metadata operation, so readers see the whole tree vanish at once) and then emptied. Our meta
service has no tree-delete RPC yet, so the emptying runs here, batched: the tree is listed level by
level with many ``listdir`` calls in flight, every file of a level is unlinked in parallel, and the
directories go bottom-up, each level in parallel. Chunks of the unlinked files are reclaimed by the
meta service's background GC, as for any remove. Compared with the native client's recursive
``remove`` (one request at a time) this is ``concurrency`` times fewer round trips on the critical
path.

    from openinfra.fs.clients import remove_tree
    with Client("127.0.0.1:8000") as fs:
        print(remove_tree(fs, "/runs/old"))   # RemoveTreeResult(files=..., dirs=..., seconds=...)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from openinfra.fs.client.native import AsyncClient, Client
from openinfra.fs.meta.paths import split_path

__all__ = ["remove_tree", "remove_tree_async", "RemoveTreeResult", "TRASH_DIR"]

TRASH_DIR = "/.trash"


@dataclass(frozen=True)
class RemoveTreeResult:
    """What was removed: ``files`` (files and symlinks), ``dirs`` (directories, the root included)."""

    files: int
    dirs: int
    seconds: float


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name


async def _bounded(coros, concurrency: int) -> list:
    sem = asyncio.Semaphore(concurrency)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def _unlink(fs: AsyncClient, path: str) -> int:
    try:
        await fs.remove(path)
        return 1
    except FileNotFoundError:  # removed concurrently by someone else: the goal is met
        return 0


async def remove_tree_async(fs: AsyncClient, path: str, *, concurrency: int = 32, trash: bool = True) -> RemoveTreeResult:
    """Remove ``path`` and everything under it (a file or symlink is simply removed).

    ``trash=True`` first renames the tree into ``/.trash`` so it disappears atomically, then
    empties it; ``concurrency`` bounds the metadata requests in flight.
    """
    parts = split_path(path)
    if not parts:
        raise ValueError("path: refusing to remove the root directory '/'")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency: expected an int >= 1, got {concurrency!r}")
    t0 = time.perf_counter()
    st = await fs.stat(path, follow_symlinks=False)  # FileNotFoundError names the path
    if not st.is_dir:
        await fs.remove(path)
        return RemoveTreeResult(1, 0, time.perf_counter() - t0)
    root = path
    if trash and "/" + parts[0] != TRASH_DIR:
        await fs.mkdir(TRASH_DIR, mode=0o1777, exist_ok=True)
        root = f"{TRASH_DIR}/{int(time.time())}-{uuid.uuid4().hex[:12]}"
        await fs.rename(path, root)
    levels: list[list[str]] = [[root]]
    files = 0
    while levels[-1]:
        listings = await _bounded((fs.listdir(d, detail=True) for d in levels[-1]), concurrency)
        subdirs, leaves = [], []
        for d, entries in zip(levels[-1], listings):
            for name, est in entries:
                (subdirs if est.is_dir else leaves).append(_join(d, name))
        files += sum(await _bounded((_unlink(fs, p) for p in leaves), concurrency))
        levels.append(subdirs)
    dirs = 0
    for level in reversed(levels):
        dirs += sum(await _bounded((_unlink(fs, d) for d in level), concurrency))
    return RemoveTreeResult(files, dirs, time.perf_counter() - t0)


def remove_tree(fs: Client, path: str, *, concurrency: int = 32, trash: bool = True) -> RemoveTreeResult:
    """Synchronous :func:`remove_tree_async` on a :class:`Client`."""
    if not isinstance(fs, Client):
        raise TypeError(f"fs: expected an openinfra.fs.Client, got {type(fs).__name__}")
    return fs._run(remove_tree_async(fs.aio, path, concurrency=concurrency, trash=trash))
