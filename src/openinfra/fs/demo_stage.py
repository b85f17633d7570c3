"""The demo's cluster stage: start an embedded 3FS cluster under ``<data_dir>/fs``.

Later stages find it in ``ctx.results["cluster"]["mgmtd"]`` (a list of addresses, for
``openinfra.fs.Client``) or in ``<data_dir>/fs.json``. The cluster is stopped when the demo
process exits (set ``OPENINFRA_KEEP_CLUSTER=1`` to keep it; then
``openinfra fs stop --data-dir <data_dir>/fs`` stops it). A cluster still running from an earlier
kept demo is reused.
"""

from __future__ import annotations

import atexit
import json
import os
import time

__all__ = ["run_stage", "stop_stage"]


def stop_stage(ctx) -> None:
    """Stop the demo's cluster (what the exit hook does)."""
    from openinfra.fs.cluster import LocalCluster

    root = ctx.data_dir / "fs"
    if (root / "cluster.json").exists():
        LocalCluster.attach(root).stop()


def _stop_at_exit(cluster) -> None:
    """The exit hook: this process's clients first (their connections closed while the servers
    still answer), then the cluster."""
    from openinfra.fs.client.native import abandon_live_clients

    abandon_live_clients()
    cluster.stop()


def run_stage(ctx) -> dict[str, object]:
    from openinfra.fs.cluster import ClusterSpec, LocalCluster

    root = ctx.data_dir / "fs"
    cluster = None
    if (root / "cluster.json").exists():
        old = LocalCluster.attach(root)
        if all(old.is_running(n) for n in old.services):
            ctx.log(f"reusing the running cluster in {root}")
            old.wait_healthy(60)
            cluster = old
        else:
            old.stop()
    t0 = time.perf_counter()
    if cluster is None:
        spec = ClusterSpec(str(root), storage_nodes=3, targets_per_node=2, replication=3, stripe=4,
                           heartbeat_s=0.5, failure_timeout_s=4.0, lease_s=2.0)
        cluster = LocalCluster.start(spec, timeout=120)
        if os.environ.get("OPENINFRA_KEEP_CLUSTER", "0") in ("", "0"):
            atexit.register(_stop_at_exit, cluster)
    started = time.perf_counter() - t0
    ctx.log(f"cluster up in {started:.1f} s: mgmtd {cluster.address}")
    # A quick read-after-write check through the native client, and its speed.
    size = (8 if ctx.quick else 64) << 20
    data = os.urandom(size)
    with cluster.client() as fs:
        fs.mkdir("/demo", exist_ok=True)
        t1 = time.perf_counter()
        fs.write_bytes("/demo/check.bin", data)
        t2 = time.perf_counter()
        ok = fs.read_bytes("/demo/check.bin") == data
        t3 = time.perf_counter()
        fs.remove("/demo/check.bin")
    if not ok:
        raise RuntimeError("3FS read-after-write check failed: data differs")
    r = cluster.routing()
    info = {"mgmtd": cluster.mgmtd_addresses, "data_dir": str(cluster.root)}
    (ctx.data_dir / "fs.json").write_text(json.dumps(info, indent=2))
    return {
        "mgmtd": cluster.mgmtd_addresses,
        # where the later stages put shards and checkpoints (the fsspec filesystem of the clients)
        "fsspec_url": f"3fs://{cluster.mgmtd_addresses[0]}/demo",
        "data_dir": str(cluster.root),
        "processes": len(cluster.services),
        "chains": f"{len(r.chains)} chains x {cluster.spec.replication} replicas",
        "start_s": round(started, 2),
        "write_MBps (R=3)": round(size / (t2 - t1) / 1e6, 1),
        "read_MBps": round(size / (t3 - t2) / 1e6, 1),
        "stop": f"openinfra fs stop --data-dir {cluster.root}",
    }
