"""storage: chunk engine (copy-on-write, CRC32C, atomic commit) and CRAQ storage nodes."""

from openinfra.fs.storage.chunk_store import ChunkMeta, ChunkStore, checksum
from openinfra.fs.storage.service import StorageConfig, StorageNode

__all__ = ["ChunkMeta", "ChunkStore", "checksum", "StorageConfig", "StorageNode"]
