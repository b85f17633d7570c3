"""Clients: the native API (sync and asyncio) that the fsspec, FUSE, ring-I/O and KVCache clients use."""

from openinfra.fs.client.native import AsyncClient, AsyncFile, Client, File, FileStat
from openinfra.fs.client.storage_client import RoutingCache, StorageClient, chunk_chain

__all__ = ["AsyncClient", "AsyncFile", "Client", "File", "FileStat", "RoutingCache", "StorageClient", "chunk_chain"]
