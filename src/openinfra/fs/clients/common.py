"""Where a client finds its cluster, and a fork-safe handle on the native client.

Every client here takes an explicit mgmtd address (``"host:port"``, several comma separated).
Without one they fall back, in order, to ``$OPENINFRA_FS_MGMTD`` and to the cluster recorded in
``$OPENINFRA_FS_DATA_DIR/cluster.json`` (what ``openinfra fs start --data-dir`` writes).
"""

from __future__ import annotations

import os
import threading

from openinfra.fs.client.native import Client
from openinfra.fs.meta.store import User

__all__ = ["resolve_mgmtd", "ClientHandle", "pread_fast", "ENV_MGMTD", "ENV_DATA_DIR"]

ENV_MGMTD = "OPENINFRA_FS_MGMTD"
ENV_DATA_DIR = "OPENINFRA_FS_DATA_DIR"


def resolve_mgmtd(mgmtd: str | list[str] | None = None) -> list[str]:
    """The mgmtd addresses to use: ``mgmtd`` itself, else the environment (see module doc)."""
    if mgmtd is None or mgmtd == "":
        mgmtd = os.environ.get(ENV_MGMTD) or None
    if mgmtd is None and os.environ.get(ENV_DATA_DIR):
        from openinfra.fs.cluster import LocalCluster

        mgmtd = LocalCluster.attach(os.environ[ENV_DATA_DIR]).mgmtd_addresses
    if mgmtd is None:
        raise ValueError(f"mgmtd: no cluster address given; pass mgmtd='host:port' (or a 3fs://host:port/ URL), "
                         f"or set ${ENV_MGMTD} or ${ENV_DATA_DIR}")
    addrs = [a.strip() for a in mgmtd.split(",")] if isinstance(mgmtd, str) else [str(a).strip() for a in mgmtd]
    addrs = [a for a in addrs if a]
    if not addrs:
        raise ValueError(f"mgmtd: expected 'host:port[,host:port...]', got {mgmtd!r}")
    from openinfra.fs.rpc import parse_address

    for a in addrs:
        parse_address(a)
    return addrs


class ClientHandle:
    """A lazily connected :class:`Client`, re-created after ``fork`` (the parent's event-loop
    thread does not exist in a forked child, so its client would hang there)."""

    def __init__(self, mgmtd: list[str], user: User | None = None, **kwargs):
        self.mgmtd, self.user, self.kwargs = mgmtd, user, kwargs
        self._client: Client | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> Client:
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            with self._lock:
                if self._client is None or self._pid != pid:
                    self._client = Client(self.mgmtd, user=self.user, **self.kwargs)
                    self._pid = pid
        return self._client

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


async def pread_fast(f, size: int, offset: int) -> bytes:
    """``f.pread(size, offset)`` for an open :class:`~openinfra.fs.AsyncFile`, with a fast path for
    the common small read that lies inside the known length and one chunk: one storage request
    without the general path's bookkeeping (holes read as zeros, as in ``pread``)."""
    index, within = divmod(offset, f.chunk_size)
    if 0 < size and offset + size <= f.length and within + size <= f.chunk_size and not f.closed:
        data = await f.fs.storage.read_chunk(f.layout, f.inode, index, within, size)
        return data if len(data) == size else data + bytes(size - len(data))
    return await f.pread(size, offset)
