"""Runtime layer: 3FS, a distributed file system with CRAQ chain replication.

mgmtd (cluster manager), meta (metadata on SQLite / PostgreSQL), storage targets, the native
client, and the fsspec / FUSE / ring-I/O / KVCache clients; asyncio services over loopback TCP.
Imports nothing else of openinfra.

    from openinfra.fs import ClusterSpec, LocalCluster
    cluster = LocalCluster.start(ClusterSpec("/tmp/fs"))   # or: openinfra fs start --data-dir /tmp/fs
    with cluster.client() as fs:
        fs.write_bytes("/a.bin", b"x" * 10_000_000)
        assert fs.stat("/a.bin").size == 10_000_000
    cluster.stop()
"""

from openinfra.fs.client.native import AsyncClient, AsyncFile, Client, File, FileStat
from openinfra.fs.cluster import ClusterSpec, LocalCluster, plan_chains
from openinfra.fs.errors import Code, FsError, RpcError
from openinfra.fs.meta.paths import InvalidPath
from openinfra.fs.meta.store import User
from openinfra.fs.routing import Routing, TargetState

__all__ = [
    "AsyncClient", "AsyncFile", "Client", "File", "FileStat", "User",
    "ClusterSpec", "LocalCluster", "plan_chains",
    "Code", "FsError", "RpcError", "InvalidPath", "Routing", "TargetState",
]
