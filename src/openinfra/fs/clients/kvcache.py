"""KVCache on 3FS: KV blocks (torch tensors) stored by key, batched, read straight into tensors.

Like 3FS's KVCache for inference, each block is one file named by a hash of its key, spread over
256 shard directories, so any client of the cluster can reuse what another stored::

    from openinfra.fs.clients import KVCache
    kv = KVCache("127.0.0.1:8000", root="/kvcache", capacity_bytes=8 << 30, max_age_s=3600)
    kv.put_batch([b"k1", b"k2"], [t1, t2])                       # tensors of any dtype/shape
    out = [torch.empty_like(t1), torch.empty_like(t2)]
    hits = kv.get_into([b"k1", b"k2"], out)                      # [True, True]: read into ``out``
    kv.gc()                                                      # drop blocks by age and capacity

Block file: a 128-byte header (magic, dtype, shape, payload size, key digest) then the raw bytes.
Keys name content (the serving engine's keys are hashes of the token prefix), so a block never
changes once written: ``put`` creates exclusively and skips keys that exist, and a reader may keep
a key's inode and layout and read the chunks directly next time (no metadata request; the
blocks of a batch at cached locations go out as one ``batch_read`` per storage node). A block
deleted since reads short once its chunks are gone (or fails its header check) and is looked up
again. ``get_into`` of a cached block into a CPU tensor asks for the payload only and receives it
straight from the socket into the tensor (the kernel's copy is the only one); CUDA tensors and
uncached blocks go through a reply buffer and one copy. For ``bytes`` keys the location is found
by the key itself (no digest per read) and each block's ``batch_read`` item is packed once; a
batch's items are joined per storage node (``StorageClient.read_exact``). After a miss or an error
the contents of ``outs`` are unspecified.
GC removes blocks older than ``max_age_s`` (time since put) and then the oldest until the total
is under ``capacity_bytes``.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import struct
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import msgpack
import torch

from openinfra.fs.client.native import AsyncClient, AsyncFile, Client
from openinfra.fs.clients.common import resolve_mgmtd
from openinfra.fs.meta.paths import split_path

__all__ = ["KVCache", "KVCacheBlockStore", "GCResult", "HEADER_BYTES"]

HEADER_BYTES = 128
_MAGIC = b"OIKV"
_PREFIX = struct.Struct("<4sI")  # magic, msgpack length
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass(frozen=True)
class GCResult:
    """One GC pass: blocks removed (``by_age`` + ``by_capacity``), bytes freed, what remains."""

    by_age: int
    by_capacity: int
    freed_bytes: int
    remaining_blocks: int
    remaining_bytes: int


def _digest(key: bytes) -> str:
    """The hex name of ``key``'s block file (BLAKE2b, 16 bytes)."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key: expected bytes, got {type(key).__name__}")
    if len(key) == 0:
        raise ValueError("key: expected non-empty bytes")
    return hashlib.blake2b(key if type(key) is bytes else bytes(key), digest_size=16).hexdigest()


def _header(t: torch.Tensor, digest: str) -> bytes:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise TypeError(f"value: dtype {t.dtype} is not supported; use one of {sorted(_DTYPES)}")
    body = msgpack.packb({"d": dtype, "s": list(t.shape), "n": t.numel() * t.element_size(), "k": digest})
    if _PREFIX.size + len(body) > HEADER_BYTES:
        raise ValueError(f"value: shape {tuple(t.shape)} has too many dimensions for the block header")
    return (_PREFIX.pack(_MAGIC, len(body)) + body).ljust(HEADER_BYTES, b"\0")


def _parse_header(raw: bytes | memoryview, digest: str, total: int | None = None) -> dict | None:
    """The header of a block read as ``raw`` (its first ``HEADER_BYTES`` at least), or None if it
    is not a complete block of key ``digest``. ``total``: the block's byte count when ``raw`` holds
    only the header (the payload went elsewhere), else ``len(raw)``."""
    total = len(raw) if total is None else total
    if len(raw) < HEADER_BYTES:
        return None
    magic, n = _PREFIX.unpack_from(raw)
    if magic != _MAGIC or n > HEADER_BYTES - _PREFIX.size:
        return None
    try:
        h = msgpack.unpackb(bytes(raw[_PREFIX.size:_PREFIX.size + n]))
    except Exception:
        return None
    if not isinstance(h, dict) or h.get("k") != digest or h.get("d") not in _DTYPES:
        return None
    if not isinstance(h.get("n"), int) or total < HEADER_BYTES + h["n"]:
        return None  # a block still being written, or cut short
    return h


def _payload_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 tensor (``t`` must be contiguous)."""
    return t.reshape(-1).view(torch.uint8)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of contiguous CPU tensor ``t``'s storage (no copy)."""
    if t.dtype is torch.uint8 and t.dim() == 1 and not t.requires_grad:
        return memoryview(t.numpy())  # the common KV buffer: skip the view/reshape tensors
    return memoryview(_payload_view(t.detach()).numpy())


def _as_bytes_tensor(raw: bytes, start: int, n: int) -> torch.Tensor:
    """A read-only uint8 view of ``raw[start:start + n]`` (no copy; only ever read from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write it
        return torch.frombuffer(memoryview(raw)[start:start + n], dtype=torch.uint8)


def _fill_from(out: torch.Tensor, raw: bytes, start: int, n: int) -> None:
    """Copy ``raw[start:start + n]`` into contiguous ``out`` (``n`` bytes). A CPU tensor is filled
    through a memoryview (one memcpy); ``Tensor.copy_`` of a 64 KiB block measured 1.4 ms here
    (its intra-op thread pool wakes up for every copy on a busy 2-core box) against 18 us."""
    if out.device.type == "cpu":
        memoryview(_payload_view(out.detach()).numpy())[:] = memoryview(raw)[start:start + n]
    else:
        _payload_view(out).copy_(_as_bytes_tensor(raw, start, n))


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    return t


class KVCache:
    """KV blocks in 3FS under ``root``. ``mgmtd``: the cluster (see :func:`resolve_mgmtd`), or pass
    ``client=`` (a connected :class:`Client`). ``concurrency``: requests in flight per batch.
    ``capacity_bytes`` / ``max_age_s``: the defaults of :meth:`gc` (None: no limit)."""

    def __init__(self, mgmtd: str | list[str] | None = None, *, root: str = "/kvcache", client: Client | None = None,
                 capacity_bytes: int | None = None, max_age_s: float | None = None, concurrency: int = 64,
                 location_cache: int = 1 << 16):
        split_path(root, "root")
        if client is not None and not isinstance(client, Client):
            raise TypeError(f"client: expected an openinfra.fs.Client, got {type(client).__name__}")
        for name, v in (("capacity_bytes", capacity_bytes), ("max_age_s", max_age_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name}: expected a number >= 0 or None, got {v!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: expected an int >= 1, got {concurrency!r}")
        self._own = client is None
        self.client = client or Client(resolve_mgmtd(mgmtd))
        self.root = root.rstrip("/") or "/"
        self.capacity_bytes, self.max_age_s, self.concurrency = capacity_bytes, max_age_s, concurrency
        self._dirs: set[str] = set()
        self._where: OrderedDict[str, dict] = OrderedDict()  # digest -> inode (layout, length)
        self._where_max = location_cache
        # key -> its node in ``_where`` (for bytes keys read by ``get_into``): no digest per read.
        # A node dropped from ``_where`` is marked ``gone`` and this entry is then skipped.
        self._by_key: dict[bytes, dict] = {}
        # get_into's reads at cached locations from the calling thread (BlockingReads, made on
        # first use); OPENINFRA_FS_KV_BLOCKING=0 sends them through the event loop instead.
        self._blocking = None
        # Byte views of get_into's destination tensors, by id (see _view_of).
        self._views: dict[int, tuple] = {}
        self._blocking_on = os.environ.get("OPENINFRA_FS_KV_BLOCKING", "1") != "0"

    def close(self) -> None:
        if self._blocking is not None:
            self._blocking.close()
        if self._own:
            self.client.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- paths and helpers ---------------------------------------------------------------------

    def _dir(self, digest: str) -> str:
        return f"{self.root.rstrip('/')}/{digest[:2]}"

    def _path(self, digest: str) -> str:
        return f"{self._dir(digest)}/{digest}"

    @property
    def _aio(self) -> AsyncClient:
        return self.client.aio

    async def _gather(self, coros) -> list:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(c):
            async with sem:
                return await c

        return await asyncio.gather(*(one(c) for c in coros))

    def _remember(self, digest: str, node: dict) -> None:
        old = self._where.get(digest)
        if old is not None and old is not node:
            old["gone"] = True
        node["gone"] = False
        self._where[digest] = node
        self._where.move_to_end(digest)
        while len(self._where) > self._where_max:
            self._where.popitem(last=False)[1]["gone"] = True

    def _forget(self, digest: str) -> None:
        """Drop ``digest``'s cached location (and every key-indexed entry that points at it)."""
        node = self._where.pop(digest, None)
        if node is not None:
            node["gone"] = True

    # --- put -----------------------------------------------------------------------------------

    async def _put_one(self, key: bytes, t: torch.Tensor, overwrite: bool) -> bool:
        digest = _digest(key)
        head = _header(t, digest)
        payload = _payload_view(t.detach().to("cpu", copy=False).contiguous())
        d = self._dir(digest)
        if d not in self._dirs:
            await self._aio.mkdir(d, parents=True, exist_ok=True)
            self._dirs.add(d)
        try:
            f = await self._aio.open(self._path(digest), "wb" if overwrite else "xb")
        except FileExistsError:
            return False  # stored already (keys name content)
        try:
            await f.pwrite(head + payload.numpy().tobytes(), 0)
        finally:
            await f.close()
        self._forget(digest)
        return True

    def put_batch(self, keys: Sequence[bytes], values: Sequence[torch.Tensor], *, overwrite: bool = False) -> list[bool]:
        """Store ``values[i]`` under ``keys[i]``; returns per key whether it was written (False: it
        existed and ``overwrite`` is off)."""
        if len(keys) != len(values):
            raise ValueError(f"values: expected {len(keys)} tensors (one per key), got {len(values)}")
        ts = [_check_tensor(v, f"values[{i}]") for i, v in enumerate(values)]
        return self.client._run(self._gather(self._put_one(k, t, overwrite) for k, t in zip(keys, ts)))

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Store one block (no-op when ``key`` is stored already)."""
        self.put_batch([key], [value])

    # --- get -----------------------------------------------------------------------------------

    async def _read_at(self, node: dict) -> bytes:
        if node["length"] <= node["layout"]["chunk_size"]:
            # One chunk: one storage request, without the general read path's bookkeeping.
            return await self._aio.storage.read_chunk(node["layout"], node["id"], 0, 0, node["length"])
        return await AsyncFile(self._aio, "", node, None, True, False).pread(node["length"], 0)

    async def _read_block(self, digest: str) -> tuple[dict, bytes] | None:
        """``(header, raw bytes)`` of a block, or None if it does not exist (or is incomplete)."""
        node = self._where.get(digest)
        if node is not None:
            raw = await self._read_at(node)
            h = _parse_header(raw, digest)
            if h is not None:
                return h, raw
            self._forget(digest)  # deleted since: ask meta again
        try:
            # stat, not open: a read-only transaction on meta (read opens are not tracked anyway).
            st = await self._aio.stat(self._path(digest), follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not st.is_file or st.layout is None:
            return None
        node = {"id": st.inode, "type": "file", "layout": st.layout, "length": st.size}
        raw = await self._read_at(node)
        h = _parse_header(raw, digest)
        if h is not None:
            self._remember(digest, node)
            return h, raw
        return None

    def _cached_one_chunk(self, digest: str, total: int | None = None) -> dict | None:
        """The cached location of a block that fits in one chunk (of ``total`` bytes with its
        header, when given), else None."""
        node = self._where.get(digest)
        if node is None or node["length"] > node["layout"]["chunk_size"]:
            return None
        if total is not None and node["length"] != total:
            return None
        return node

    async def _read_cached_into(self, todo: list[tuple[str, dict, memoryview]]) -> list[dict | None]:
        """Read blocks at cached locations straight into their destinations: ``todo`` holds
        ``(digest, node, payload buffer)`` with the buffer exactly the block's payload size.
        One ``batch_read`` per storage node; each reply's header goes to a small buffer and its
        payload into the caller's buffer, so the payload is copied once (socket to tensor).
        Each read is of the whole chunk, so storage checks it against its CRC32C.

        Returns per block its header, or None where the block was not read whole or its header
        does not match (deleted or replaced since): the location is forgotten, the payload buffer
        holds unspecified bytes, and the caller goes to meta."""
        heads = memoryview(bytearray(HEADER_BYTES * len(todo)))
        into = [[heads[j * HEADER_BYTES:(j + 1) * HEADER_BYTES], payload] for j, (_, _, payload) in enumerate(todo)]
        got = await self._aio.storage.read_chunks([(n["layout"], n["id"], 0, 0, n["length"]) for _, n, _ in todo], into)
        out: list[dict | None] = []
        for j, ((d, node, _), n) in enumerate(zip(todo, got)):
            h = None
            if n == node["length"]:
                raw = heads[j * HEADER_BYTES:(j + 1) * HEADER_BYTES]
                seen = node.get("head")
                if seen is not None and seen[0] == raw:  # the header read last time: parsed already
                    h = seen[1]
                else:
                    h = _parse_header(raw, d, n)
                    if h is not None and HEADER_BYTES + h["n"] != n:
                        h = None
                    if h is not None:
                        node["head"] = (bytes(raw), h)
            if h is None:
                self._forget(d)
            out.append(h)
        return out

    async def _read_cached_payloads(self, todo: list[tuple[str, dict, memoryview]]) -> list[bool]:
        """Like :meth:`_read_cached_into` for callers that know the payload size (``get_into``):
        only the payload is asked for, so each reply goes into the caller's buffer in one piece.
        The header is not read: a cached location names one inode, ids are never reused, and
        the inode holds this key's block for as long as its chunks exist (keys name content);
        once it is deleted and its chunks are gone the read comes back short, and the block is
        looked up again. Storage still checks the chunk's CRC32C (a read to the end of a small
        chunk is checked whole, see ``ChunkStore.read``).

        Returns per block whether its payload is now in the buffer (False: the location is
        forgotten and the buffer holds unspecified bytes)."""
        reads = [(n["layout"], n["id"], 0, HEADER_BYTES, n["length"] - HEADER_BYTES) for _, n, _ in todo]
        got = await self._aio.storage.read_chunks(reads, [payload for _, _, payload in todo])
        out = []
        for (d, node, _), n in zip(todo, got):
            ok = n == node["length"] - HEADER_BYTES
            if not ok:
                self._forget(d)
            out.append(ok)
        return out

    def _fast_node(self, key: bytes, nbytes: int) -> dict | None:
        """The cached one-chunk location of ``key``'s block of ``nbytes`` payload bytes with its
        ``batch_read`` item precomputed (``node["kv"]``: chain, packed item), or None."""
        node = self._by_key.get(key)
        if node is None or node["gone"]:
            node = self._cached_one_chunk(_digest(key), HEADER_BYTES + nbytes)
            if node is None:
                self._by_key.pop(key, None)
                return None
            if len(self._by_key) >= self._where_max:
                self._by_key.clear()  # bounded; entries come back on the next reads
            self._by_key[key] = node
        elif node["length"] != HEADER_BYTES + nbytes:
            return None
        if "kv" not in node:
            cid = node["layout"]["chains"][0]  # chunk 0's chain
            node["kv"] = (cid, msgpack.packb([cid, node["id"], 0, HEADER_BYTES, nbytes]))
        return node

    async def _get_into_fast(self, keys: Sequence[bytes], outs: list[torch.Tensor], hits: list) -> None:
        """``get_into`` of the blocks at cached locations (bytes keys, non-empty CPU tensors): per
        block a dict lookup, a byte view of the tensor and a few list appends; the reads go out
        as :meth:`StorageClient.read_exact` (one ``batch_read`` per storage node of the joined
        items, the payloads received straight into the tensors). Sets ``hits[i] = True`` for the
        blocks read; a block that read another byte count (deleted since) has its location
        forgotten; the rest stay None for the general path."""
        plan = self._fast_plan(keys, outs)
        if plan is not None:
            where, nodes, dests = plan
            got = await self._aio.storage.read_exact([kv[0] for kv in nodes], [kv[1] for kv in nodes], dests)
            self._fast_settle(keys, where, got, hits)

    def _get_into_blocking(self, keys: Sequence[bytes], outs: list[torch.Tensor], hits: list) -> None:
        """:meth:`_get_into_fast` on the calling thread (:class:`BlockingReads`: no hand-off to
        the event-loop thread and back, no event-loop work per reply piece)."""
        plan = self._fast_plan(keys, outs)
        if plan is not None:
            where, nodes, dests = plan
            if self._blocking is None:
                from openinfra.fs.client.blocking_reads import BlockingReads

                rpc = self._aio.rpc
                self._blocking = BlockingReads(self._aio.storage, connect_timeout=rpc.connect_timeout,
                                               max_frame=rpc.max_frame)
            got = self._blocking.read_exact([kv[0] for kv in nodes], [kv[1] for kv in nodes], dests)
            self._fast_settle(keys, where, got, hits)

    def _fast_plan(self, keys: Sequence[bytes], outs: list[torch.Tensor]):
        """``(indexes, (chain, item) per read, destinations)`` of the blocks at cached locations,
        or None when there are none."""
        where, nodes, dests = [], [], []
        fast = self._by_key
        views = self._views
        for i, k, t in zip(range(len(keys)), keys, outs):
            if type(k) is not bytes or not t.is_cpu:
                continue
            n = t.nbytes
            node = fast.get(k)
            if node is None or node["gone"] or node["length"] != HEADER_BYTES + n or "kv" not in node:
                if not n:
                    continue  # (an empty payload reads as 0 bytes whether or not the block exists)
                node = self._fast_node(k, n)
                if node is None:
                    continue
            where.append(i)
            nodes.append(node["kv"])
            v = views.get(id(t))
            if v is None or v[0]() is not t or v[1] != t.data_ptr() or v[2] != n:
                v = self._view_of(t, n)
            dests.append(v[3])
        return (where, nodes, dests) if where else None

    def _view_of(self, t: torch.Tensor, n: int) -> tuple:
        """``(weak ref, data_ptr, nbytes, byte view)`` of contiguous CPU tensor ``t``, remembered
        by ``id(t)`` (``_byte_view`` costs ~2 us a block; a remembered view ~0.6 us). The view
        is of the raw memory at ``data_ptr`` (no reference to ``t``: a remembered view must not
        keep a caller's tensor alive); it is used only while ``t`` itself is alive with the same
        ``data_ptr`` and size (checked per use), i.e. while that memory is ``t``'s."""
        if len(self._views) >= self._where_max:
            self._views.clear()  # bounded; views come back on the next reads
        p = t.data_ptr()
        v = (weakref.ref(t), p, n, memoryview((ctypes.c_char * n).from_address(p)).cast("B") if n else _byte_view(t))
        self._views[id(t)] = v
        return v

    def _fast_settle(self, keys: Sequence[bytes], where: list[int], got: list, hits: list) -> None:
        fast = self._by_key
        if all(got):
            for i in where:
                hits[i] = True
            return
        for i, ok in zip(where, got):
            if ok:
                hits[i] = True
            elif ok is False:
                node = fast.get(keys[i])
                if node is not None and not node["gone"]:
                    self._forget(_digest(keys[i]))  # read short: deleted since, ask meta again

    async def _get_into_many(self, keys: Sequence[bytes], outs: list[torch.Tensor],
                             hits: list | None = None) -> list[bool]:
        """``hits``: the fast path was tried already (on the calling thread): only the rest."""
        if hits is None:
            hits = [None] * len(keys)
            await self._get_into_fast(keys, outs, hits)
        if all(hits):
            return hits
        todo, where = [], []
        for i, (k, t) in enumerate(zip(keys, outs)):
            if hits[i]:
                continue
            d = _digest(k)
            # (an empty payload would read as 0 bytes whether or not the block still exists)
            node = self._cached_one_chunk(d, HEADER_BYTES + t.nbytes) if t.is_cpu and t.nbytes else None
            if node is not None:
                todo.append((d, node, _byte_view(t)))
                where.append(i)
        if todo:
            for i, ok in zip(where, await self._read_cached_payloads(todo)):
                if ok:
                    hits[i] = True
        rest = [i for i, v in enumerate(hits) if v is None]
        if rest:
            found = await self._gather(self._get_into_one(keys[i], outs[i], f"outs[{i}]") for i in rest)
            for i, v in zip(rest, found):
                hits[i] = v
        return hits

    async def _get_many(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        got: list = [None] * len(keys)
        todo, where, bufs = [], [], []
        for i, k in enumerate(keys):
            d = _digest(k)
            node = self._cached_one_chunk(d)
            if node is not None:
                buf = torch.empty(node["length"] - HEADER_BYTES, dtype=torch.uint8)
                todo.append((d, node, memoryview(buf.numpy())))
                where.append(i)
                bufs.append(buf)
        done = set()
        if todo:
            for i, buf, h in zip(where, bufs, await self._read_cached_into(todo)):
                if h is not None:
                    got[i] = buf.view(_DTYPES[h["d"]]).reshape(h["s"])
                    done.add(i)
        rest = [i for i in range(len(keys)) if i not in done]
        if rest:
            for i, t in zip(rest, await self._gather(self._get_one(keys[i]) for i in rest)):
                got[i] = t
        return got

    async def _get_into_one(self, key: bytes, out: torch.Tensor, name: str) -> bool:
        digest = _digest(key)
        got = await self._read_block(digest)
        if got is None:
            return False
        h, raw = got
        want = out.numel() * out.element_size()
        if h["n"] != want:
            raise ValueError(f"{name}: block holds {h['n']} bytes ({h['d']} {tuple(h['s'])}), "
                             f"the tensor has {want} bytes ({out.dtype} {tuple(out.shape)})")
        if want:
            _fill_from(out, raw, HEADER_BYTES, want)
        return True

    def get_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Read block ``keys[i]`` into ``outs[i]`` (same byte size; any device); per key: found?
        Where a key is not found, ``outs[i]`` may have been written (unspecified contents)."""
        if len(keys) != len(outs):
            raise ValueError(f"outs: expected {len(keys)} tensors (one per key), got {len(outs)}")
        ts = [_check_tensor(o, f"outs[{i}]") for i, o in enumerate(outs)]
        if self._blocking_on:
            hits: list[bool | None] = [None] * len(keys)
            self._get_into_blocking(keys, ts, hits)
            if all(hits):
                return hits
            return self.client._run(self._get_into_many(keys, ts, hits))
        return self.client._run(self._get_into_many(keys, ts))

    async def _get_one(self, key: bytes) -> torch.Tensor | None:
        digest = _digest(key)
        got = await self._read_block(digest)
        if got is None:
            return None
        h, raw = got
        t = torch.empty(h["s"], dtype=_DTYPES[h["d"]])
        if h["n"]:
            _fill_from(t, raw, HEADER_BYTES, h["n"])
        return t

    def get_batch(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """New CPU tensors (dtype and shape as stored), None where a key is missing."""
        return self.client._run(self._get_many(keys))

    def get(self, key: bytes) -> torch.Tensor | None:
        return self.get_batch([key])[0]

    # --- exists / delete -----------------------------------------------------------------------

    def exists_batch(self, keys: Sequence[bytes]) -> list[bool]:
        paths = [self._path(_digest(k)) for k in keys]
        return self.client._run(self._gather(self._aio.exists(p) for p in paths))

    def exists(self, key: bytes) -> bool:
        return self.exists_batch([key])[0]

    async def _delete_one(self, digest: str) -> bool:
        self._forget(digest)
        try:
            await self._aio.remove(self._path(digest))
            return True
        except FileNotFoundError:
            return False

    def delete_batch(self, keys: Sequence[bytes]) -> list[bool]:
        """Remove blocks; per key whether it existed."""
        digests = [_digest(k) for k in keys]
        return self.client._run(self._gather(self._delete_one(d) for d in digests))

    def delete(self, key: bytes) -> bool:
        return self.delete_batch([key])[0]

    # --- listing and GC ------------------------------------------------------------------------

    async def _blocks(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, digest)`` of every block."""
        if not await self._aio.exists(self.root):
            return []
        shards = [n for n in await self._aio.listdir(self.root) if len(n) == 2]
        listings = await self._gather(self._aio.listdir(f"{self.root.rstrip('/')}/{s}", detail=True) for s in shards)
        return [(st.mtime, st.size, name) for entries in listings for name, st in entries if st.is_file]

    def stats(self) -> dict:
        """``{"blocks", "bytes"}`` stored under ``root`` (bytes include the 128-byte headers)."""
        blocks = self.client._run(self._blocks())
        return {"blocks": len(blocks), "bytes": sum(b[1] for b in blocks)}

    def gc(self, *, max_age_s: float | None = None, capacity_bytes: int | None = None,
           now: float | None = None) -> GCResult:
        """Remove blocks put more than ``max_age_s`` ago, then the oldest ones until the total size
        is at most ``capacity_bytes``. Arguments default to the constructor's."""
        max_age_s = self.max_age_s if max_age_s is None else max_age_s
        capacity_bytes = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        now = time.time() if now is None else now
        blocks = sorted(self.client._run(self._blocks()))
        old = [b for b in blocks if max_age_s is not None and now - b[0] > max_age_s]
        keep = blocks[len(old):] if old else blocks
        total = sum(b[1] for b in keep)
        evict = []
        if capacity_bytes is not None:
            for b in keep:
                if total <= capacity_bytes:
                    break
                evict.append(b)
                total -= b[1]
        gone = old + evict
        self.client._run(self._gather(self._delete_one(d) for _, _, d in gone))
        remaining = keep[len(evict):]
        return GCResult(len(old), len(evict), sum(b[1] for b in gone), len(remaining), sum(b[1] for b in remaining))


class KVCacheBlockStore:
    """The serving engine's prefix-store protocol (``get``/``put``/``exists`` by bytes key) on a
    :class:`KVCache`: ``openinfra.serving`` takes it wherever it takes a ``MemoryBlockStore``."""

    def __init__(self, cache: KVCache):
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
        self.cache = cache

    def get(self, key: bytes) -> torch.Tensor | None:
        return self.cache.get(key)

    def put(self, key: bytes, value: torch.Tensor) -> None:
        self.cache.put(key, value)

    def exists(self, key: bytes) -> bool:
        return self.cache.exists(key)

    def close(self) -> None:
        """Close the cache (its client, when the cache made it)."""
        self.cache.close()

    def __enter__(self) -> "KVCacheBlockStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
