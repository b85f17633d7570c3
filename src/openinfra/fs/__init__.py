"""Runtime layer: 3FS, a distributed file system with CRAQ chain replication.

mgmtd (cluster manager), meta (metadata on SQLite / PostgreSQL), storage targets, the native
client, and the fsspec / FUSE / ring-I/O / KVCache clients; asyncio services over loopback TCP.
Imports nothing else of openinfra."""
