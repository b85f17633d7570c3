"""``openinfra fs ...``: start, inspect, drill and stop a whole 3FS cluster on one box, and move files.

    openinfra fs start --data-dir /tmp/fs --storage-nodes 3 --replication 3
    openinfra fs status --data-dir /tmp/fs
    openinfra fs put local.bin /x.bin --data-dir /tmp/fs ; openinfra fs ls / --data-dir /tmp/fs
    openinfra fs admin kill storage-2 --data-dir /tmp/fs ; openinfra fs admin restart storage-2 ...
    openinfra fs stop --data-dir /tmp/fs
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from openinfra.argtypes import non_negative_float

__all__ = ["register"]

DEFAULT_DIR = ".openinfra/fs"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b") if text[-1:].lower() == "b" else text.strip().lower()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 1048576, 512K or 1M, got {text!r}") from None


def _cluster(args):
    from openinfra.fs.cluster import LocalCluster

    try:
        return LocalCluster.attach(args.data_dir)
    except (KeyError, TypeError, ValueError) as exc:  # a cluster.json that is not one `fs start` wrote
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{Path(args.data_dir) / 'cluster.json'} is not a valid cluster file ({detail})") from None


def _client(args):
    from openinfra.fs.client.native import Client

    if args.mgmtd:
        return Client(args.mgmtd.split(","), retry_s=args.retry)
    return _cluster(args).client(retry_s=args.retry)


def _start(args) -> int:
    from openinfra.fs.cluster import ClusterSpec, LocalCluster

    timing = dict(heartbeat_s=0.2, failure_timeout_s=2.0, lease_s=1.0) if args.fast else {}
    try:  # ClusterSpec checks what the services would refuse, before anything is spawned
        spec = ClusterSpec(str(Path(args.data_dir).resolve()), storage_nodes=args.storage_nodes,
                           targets_per_node=args.targets_per_node, replication=args.replication, meta_count=args.meta,
                           mgmtd_count=args.mgmtd_count, meta_db=args.meta_db, chunk_size=args.chunk_size,
                           stripe=args.stripe, fsync=not args.no_fsync, **timing)
    except ValueError as exc:  # "field: problem" -> "--flag: problem"
        field, _, problem = str(exc).partition(": ")
        flag = {"meta_count": "--meta"}.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{flag}: {problem}" if problem and field.isidentifier() else str(exc)) from None
    t0 = time.perf_counter()
    cluster = LocalCluster.start(spec)
    print(f"3FS cluster started in {time.perf_counter() - t0:.1f} s under {cluster.root}")
    print(f"  mgmtd: {cluster.address}   (clients: Client({cluster.mgmtd_addresses!r}))")
    print(f"  metadata: {spec.kv_url}")
    r = cluster.routing()
    print(f"  {len(cluster.names('storage'))} storage nodes x {spec.targets_per_node} targets, "
          f"{len(r.chains)} chains of {spec.replication} replicas; {len(cluster.names('meta'))} meta")
    return 0


def _status(args) -> int:
    st = _cluster(args).status()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print("processes:")
    for name, p in sorted(st["processes"].items()):
        print(f"  {name:12} {'running' if p['running'] else 'STOPPED':8} pid {p['pid'] or '-':>7}  {p['address']}"
              f"  metrics http://{p['metrics']}/metrics")
    if "error" in st:
        print(f"mgmtd unreachable: {st['error']}")
        return 1
    print(f"routing version {st['routing_version']}, mgmtd primary {st['primary']}")
    print("nodes:")
    for nid, n in sorted(st["nodes"].items()):
        print(f"  {nid:5} {n['type']:8} {n['address']:22} {'alive' if n.get('alive') else 'DOWN'}")
    print("chains:")
    for cid, c in sorted(st["chains"].items()):
        targets = "  ".join(f"{t['id']}@{t['node']}:{t['state']}" for t in c["targets"])
        print(f"  {cid:4} v{c['version']:<4} {targets}")
    return 0


def _stop(args) -> int:
    c = _cluster(args)
    c.stop()
    print(f"stopped {len(c.services)} processes under {c.root}")
    return 0


def _admin(args) -> int:
    c = _cluster(args)
    if args.action == "kill":
        c.kill(args.name, getattr(signal, args.signal))
        print(f"sent {args.signal} to {args.name}")
    elif args.action == "restart":
        if args.name not in c.services:
            raise ValueError(f"name: no service {args.name!r}; have {sorted(c.services)}")
        c.restart(args.name)
        print(f"restarted {args.name} at {c.services[args.name]['address']}")
    elif args.action == "set-target-state":
        print(json.dumps(c.admin("set_target_state", {"target_id": args.target, "state": args.state})))
    elif args.action == "gc":
        from openinfra.fs.cluster import call

        for name in c.names("meta"):
            print(name, json.dumps(call(c.services[name]["address"], "gc", timeout=60)))
    elif args.action == "wait-healthy":
        c.wait_healthy(args.timeout)
        print("all chains serving")
    return 0


def _ls(args) -> int:
    with _client(args) as fs:
        for name, st in fs.listdir(args.path, detail=True):
            print(f"{'d' if st.is_dir else 'l' if st.type == 'symlink' else '-'}{st.mode & 0o777:o} {st.uid:5} "
                  f"{st.size:12} {name}")
    return 0


def _put(args) -> int:
    data = Path(args.local).read_bytes()
    with _client(args) as fs:
        t0 = time.perf_counter()
        fs.write_bytes(args.remote, data)
        dt = time.perf_counter() - t0
    print(f"wrote {len(data)} bytes to {args.remote} in {dt:.2f} s ({len(data) / max(dt, 1e-9) / 1e6:.1f} MB/s)")
    return 0


def _get(args) -> int:
    with _client(args) as fs:
        data = fs.read_bytes(args.remote)
    if args.local == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(args.local).write_bytes(data)
    return 0


def _mkdir(args) -> int:
    with _client(args) as fs:
        fs.mkdir(args.path, parents=args.parents, exist_ok=args.parents)
    return 0


def _rm(args) -> int:
    with _client(args) as fs:
        fs.remove(args.path, recursive=args.recursive)
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (OSError, ValueError, TypeError, RuntimeError, TimeoutError) as exc:
            print(f"openinfra fs: error: {exc}", file=sys.stderr)
            return 2
    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fs", help="3FS: start/stop a cluster on this box, status, admin, file commands",
                              description="3FS, the Fire-Flyer File System: a whole cluster on one box.")
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    from openinfra.fs.clients.fuse import register_mount

    mount = register_mount(sub)  # openinfra fs mount MOUNTPOINT ...
    mount.set_defaults(func=_guard(mount.get_default("func")))

    def add(name, fn, help, client=False):
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--data-dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
        if client:
            sp.add_argument("--mgmtd", default=None, help="mgmtd address(es) host:port[,host:port] instead of --data-dir")
            sp.add_argument("--retry", type=non_negative_float, default=30.0, help="seconds to keep retrying through failovers")
        sp.set_defaults(func=_guard(fn))
        return sp

    sp = add("start", _start, "start mgmtd, meta and storage processes (detached) and create the chains")
    sp.add_argument("--storage-nodes", type=int, default=3, help="storage processes (default 3)")
    sp.add_argument("--targets-per-node", type=int, default=1, help="targets (directories) per storage process")
    sp.add_argument("--replication", type=int, default=3, help="replicas per chain (default 3)")
    sp.add_argument("--meta", type=int, default=1, help="meta processes (default 1)")
    sp.add_argument("--mgmtd-count", type=int, default=1, help="mgmtd processes (2+ for lease failover)")
    sp.add_argument("--meta-db", default=None, help="KV URL, e.g. postgresql://user@host:5432/db (default SQLite in the data dir)")
    sp.add_argument("--chunk-size", type=_size, default=1 << 20, help="chunk size of new files (default 1M)")
    sp.add_argument("--stripe", type=int, default=16, help="chains per file (default 16)")
    sp.add_argument("--no-fsync", action="store_true", help="do not fsync chunk data (faster; crash-safe, not power-safe)")
    sp.add_argument("--fast", action="store_true", help="test timings: heartbeat 0.2 s, failure after 2 s, lease 1 s")
    add("status", _status, "processes, nodes, chains and target states").add_argument("--json", action="store_true")
    add("stop", _stop, "stop every process of the cluster")
    sp = add("admin", _admin, "drills and repairs: kill/restart a service, force a target state, run GC")
    asub = sp.add_subparsers(dest="action", metavar="ACTION", required=True)
    # --data-dir is accepted after the action too (SUPPRESS keeps a value given before it).
    here = argparse.ArgumentParser(add_help=False)
    here.add_argument("--data-dir", default=argparse.SUPPRESS, help="cluster directory")
    k = asub.add_parser("kill", help="send a signal to a service (SIGKILL by default)", parents=[here])
    k.add_argument("name", help="service name, e.g. storage-2, meta-1, mgmtd-1")
    k.add_argument("--signal", default="SIGKILL", choices=["SIGKILL", "SIGTERM", "SIGSTOP", "SIGCONT"])
    asub.add_parser("restart", help="restart a service with its address", parents=[here]).add_argument("name")
    t = asub.add_parser("set-target-state", help="force a target state (offline for drills; serving to recover)",
                       parents=[here])
    t.add_argument("target", type=int)
    t.add_argument("state", choices=["serving", "syncing", "waiting", "lastsrv", "offline"])
    asub.add_parser("gc", help="run one metadata GC pass on every meta process now", parents=[here])
    w = asub.add_parser("wait-healthy", help="wait until every target serves", parents=[here])
    w.add_argument("--timeout", type=non_negative_float, default=60.0)
    add("ls", _ls, "list a directory", client=True).add_argument("path", nargs="?", default="/")
    sp = add("put", _put, "copy a local file into the cluster", client=True)
    sp.add_argument("local")
    sp.add_argument("remote")
    sp = add("get", _get, "copy a file out of the cluster ('-' = stdout)", client=True)
    sp.add_argument("remote")
    sp.add_argument("local")
    sp = add("mkdir", _mkdir, "make a directory", client=True)
    sp.add_argument("path")
    sp.add_argument("-p", "--parents", action="store_true")
    sp = add("rm", _rm, "remove a file or directory", client=True)
    sp.add_argument("path")
    sp.add_argument("-r", "--recursive", action="store_true")


def main(argv: list[str] | None = None) -> int:
    """``python -m openinfra.fs.cli ...`` = ``openinfra fs ...`` without loading the other layers
    (the full ``openinfra`` CLI imports every component, PyTorch included)."""
    parser = argparse.ArgumentParser(prog="openinfra")
    register(parser.add_subparsers(title="commands", metavar="COMMAND"))
    args = parser.parse_args(["fs", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
