"""Service processes: ``python -m openinfra.fs.server <role> <config.json>``.

Roles: ``mgmtd``, ``meta``, ``storage``. The JSON config holds the role's config fields plus
``kv_url`` (mgmtd, meta), ``ready_file`` (written with ``{"address", "pid", "metrics"}`` once the
service accepts requests), ``log_file`` and ``metrics_port``. SIGTERM and SIGINT stop the service
cleanly; SIGKILL is what the fault tests use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from openinfra.fs.logs import setup_logging
from openinfra.fs.metrics import start_metrics
from openinfra.fs.rpc import RpcServer, run_loop

__all__ = ["serve", "main", "keep_heap"]

log = logging.getLogger("openinfra.fs.server")


async def serve(role: str, conf: dict) -> None:
    """Run one service until SIGTERM/SIGINT."""
    from openinfra.fs.kv import open_kv

    name = conf.get("name", role)
    metrics = start_metrics(name, port=conf.get("metrics_port", 0))
    server = RpcServer(conf.get("host", "127.0.0.1"), conf.get("port", 0), name=name, on_request=metrics.on_request)
    kv = None
    if role == "mgmtd":
        from openinfra.fs.mgmtd.service import Mgmtd, MgmtdConfig

        kv = await open_kv(conf["kv_url"])
        svc = Mgmtd(MgmtdConfig(kv_url=conf["kv_url"], host=server.host, port=server.port, name=name,
                                lease_s=conf["lease_s"], heartbeat_s=conf["heartbeat_s"],
                                failure_timeout_s=conf["failure_timeout_s"]), kv, server)
    elif role == "meta":
        from openinfra.fs.meta.service import MetaConfig, MetaService

        kv = await open_kv(conf["kv_url"])
        svc = MetaService(MetaConfig(node_id=conf["node_id"], mgmtd=conf["mgmtd"], heartbeat_s=conf["heartbeat_s"],
                                     session_timeout_s=conf.get("session_timeout_s", 60.0),
                                     gc_interval_s=conf.get("gc_interval_s", 5.0),
                                     chunk_size=conf.get("chunk_size", 1 << 20), stripe=conf.get("stripe", 16)),
                          kv, server, metrics)
    elif role == "storage":
        from openinfra.fs.storage.service import StorageConfig, StorageNode

        svc = StorageNode(StorageConfig(node_id=conf["node_id"], targets={int(k): v for k, v in conf["targets"].items()},
                                        mgmtd=conf["mgmtd"], heartbeat_s=conf["heartbeat_s"], fence_s=conf["fence_s"],
                                        fsync=conf.get("fsync", True),
                                        forward_timeout_s=conf.get("forward_timeout_s", 10.0)), server, metrics)
    else:
        raise ValueError(f"role: expected mgmtd, meta or storage, got {role!r}")
    address = await svc.start()
    log.info("serving", extra={"fields": {"role": role, "address": address, "metrics": metrics.address}})
    if conf.get("ready_file"):
        tmp = Path(conf["ready_file"] + ".tmp")
        tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), "metrics": metrics.address}))
        tmp.rename(conf["ready_file"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping", extra={"fields": {"role": role}})
    await svc.stop()
    if kv is not None:
        await kv.close()


def keep_heap(trim_bytes: int = 64 << 20, mmap_bytes: int = 16 << 20) -> bool:
    """Tell glibc's malloc to keep freed memory (up to ``trim_bytes`` at the heap top) and to
    serve allocations below ``mmap_bytes`` from the heap. A storage node allocates a reply's
    chunk reads (a KV batch: hundreds of 64 KiB reads) and frees them once they are sent; with
    the defaults the heap top is given back to the kernel after every reply and the next
    batch faults every page in again (page faults and page clearing were ~13% of the storage
    processes' CPU in a KV get profile). Returns whether both settings took (glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, trim_bytes)) and bool(libc.mallopt(m_mmap_threshold, mmap_bytes))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m openinfra.fs.server {mgmtd|meta|storage} CONFIG.json", file=sys.stderr)
        return 2
    role, path = argv
    conf = json.loads(Path(path).read_text())
    setup_logging(conf.get("name", role), conf.get("log_file"), conf.get("log_level", "INFO"))
    if role == "storage" and os.environ.get("OI_KEEP_HEAP", "1") == "1":
        keep_heap()
    run_loop(serve(role, conf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
