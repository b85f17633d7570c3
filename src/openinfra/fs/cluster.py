"""A whole 3FS cluster on one box: mgmtd, meta and storage processes under one data directory.

    from openinfra.fs import ClusterSpec, LocalCluster
    cluster = LocalCluster.start(ClusterSpec("/tmp/fs", storage_nodes=3, replication=3))
    with cluster.client() as fs:
        fs.write_bytes("/hello", b"hi")
    cluster.stop()

Layout of the data directory: ``cluster.json`` (spec, services, addresses, pids), ``kv.db``
(SQLite metadata and cluster state, unless ``meta_db`` points at PostgreSQL), ``conf/<name>.json``,
``logs/<name>.log`` (JSON lines) and ``.stderr``, ``storage-<n>/target-<id>/`` (chunks).

Chains: the targets of all nodes are interleaved node by node and cut into chains of
``replication`` targets, so the targets of a chain are on distinct nodes. Node ids: storage
1..N, meta 1001.., target id = node id * 100 + k.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from openinfra.fs.errors import FsError
from openinfra.fs.routing import Routing, TargetState

__all__ = ["ClusterSpec", "LocalCluster", "plan_chains", "call"]

MAX_TARGETS_PER_NODE = 99
MAX_STORAGE_NODES = 1000
ROLES = ("mgmtd", "meta", "storage")


def _check_kv_url(url: object) -> None:
    """What ``open_kv`` accepts, minus ``memory://`` (each service is its own process: a memory
    store would be neither shared between them nor kept across a restart)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"meta_db: expected a KV URL (sqlite:///path, postgresql://...) or None, got {url!r}")
    if url.startswith("memory://"):
        raise ValueError(f"meta_db: {url!r} is per process; the cluster's services need a shared store "
                         "(sqlite:///path or postgresql://...)")
    if url.startswith("sqlite://") and not url[len("sqlite://"):]:
        raise ValueError(f"meta_db: sqlite URL without a path: {url!r}")
    if "://" in url and not url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise ValueError(f"meta_db: unknown scheme in {url!r}; expected sqlite:// or postgresql://")


@dataclass
class ClusterSpec:
    """What ``openinfra fs start`` builds. Times in seconds; ``failure_timeout_s`` is T (nodes fence
    after T/2); ``meta_db``: a KV URL (default: SQLite ``kv.db`` in the data directory)."""

    data_dir: str
    storage_nodes: int = 3
    targets_per_node: int = 1
    replication: int = 3
    meta_count: int = 1
    mgmtd_count: int = 1
    meta_db: str | None = None
    chunk_size: int = 1 << 20
    stripe: int = 16
    heartbeat_s: float = 1.0
    failure_timeout_s: float = 6.0
    lease_s: float = 3.0
    fsync: bool = True
    session_timeout_s: float = 60.0
    gc_interval_s: float = 2.0
    forward_timeout_s: float = 5.0

    def __post_init__(self):
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)  # a Path would not survive cluster.json
        self.validate()

    def validate(self) -> None:
        """``ValueError`` naming the first bad field and its value; checks what the services would
        refuse (or misbehave on) when they start, so that nothing is spawned for a bad spec."""
        if not isinstance(self.data_dir, str) or not self.data_dir.strip():
            raise ValueError(f"data_dir: expected a directory path, got {self.data_dir!r}")
        for f in ("storage_nodes", "targets_per_node", "replication", "meta_count", "mgmtd_count", "stripe"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: expected an int >= 1, got {v!r}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool):
            raise ValueError(f"chunk_size: expected an int (bytes), got {self.chunk_size!r}")
        # Ids: storage nodes 1..N, targets node * 100 + k, meta nodes 1001..: keep them apart.
        if self.targets_per_node > MAX_TARGETS_PER_NODE:
            raise ValueError(f"targets_per_node: at most {MAX_TARGETS_PER_NODE} (target id = node id * 100 + k), "
                             f"got {self.targets_per_node}")
        if self.storage_nodes > MAX_STORAGE_NODES:
            raise ValueError(f"storage_nodes: at most {MAX_STORAGE_NODES} (meta node ids start at 1001), "
                             f"got {self.storage_nodes}")
        if self.replication > self.storage_nodes:
            raise ValueError(f"replication: {self.replication} replicas need at least as many storage nodes, "
                             f"got {self.storage_nodes}")
        if (self.storage_nodes * self.targets_per_node) % self.replication:
            raise ValueError(f"storage_nodes * targets_per_node ({self.storage_nodes * self.targets_per_node}) must be "
                             f"a multiple of replication ({self.replication})")
        # The layout every meta process checks when it starts (a power of two from 64 KiB to 64 MiB:
        # whole 64 KiB checksum blocks, and a chunk fits in one RPC frame). A stripe above the number
        # of chains is fine: meta clamps it per file to the chains there are.
        from openinfra.fs.meta.store import LayoutPolicy

        LayoutPolicy(self.chunk_size, self.stripe)
        for f in ("heartbeat_s", "failure_timeout_s", "lease_s", "session_timeout_s", "gc_interval_s",
                  "forward_timeout_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise ValueError(f"{f}: expected a finite number of seconds > 0, got {v!r}")
        # Storage nodes fence after T/2 and must hear from mgmtd more often than that.
        if not self.failure_timeout_s > 2 * self.heartbeat_s:
            raise ValueError(f"failure_timeout_s: must be more than twice heartbeat_s ({self.heartbeat_s}; nodes "
                             f"fence at T/2), got {self.failure_timeout_s}")
        if not isinstance(self.fsync, bool):
            raise ValueError(f"fsync: expected True or False, got {self.fsync!r}")
        if self.meta_db is not None:
            _check_kv_url(self.meta_db)

    @property
    def kv_url(self) -> str:
        return self.meta_db or f"sqlite:///{Path(self.data_dir).resolve()}/kv.db"


def plan_chains(storage_nodes: int, targets_per_node: int, replication: int) -> list[dict]:
    """Chains of ``replication`` targets on distinct nodes: ``[{"id", "targets": [[target, node]]}]``."""
    slots = [(n * 100 + k, n) for k in range(1, targets_per_node + 1) for n in range(1, storage_nodes + 1)]
    return [{"id": c + 1, "targets": [list(s) for s in slots[c * replication:(c + 1) * replication]]}
            for c in range(len(slots) // replication)]


def call(address: str, method: str, args: dict | None = None, timeout: float = 5.0) -> Any:
    """One synchronous RPC (admin tools, tests)."""
    from openinfra.fs.rpc import RpcClient

    async def go():
        c = RpcClient(default_timeout=timeout)
        try:
            return await c.call(address, method, args or {}, timeout=timeout)
        finally:
            await c.close()

    return asyncio.run(go())


def _alive(pid: int | None) -> bool:
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our killed child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class LocalCluster:
    spec: ClusterSpec
    services: dict[str, dict] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    # --- files ---------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return Path(self.spec.data_dir).resolve()

    def _save(self) -> None:
        state = {"spec": asdict(self.spec), "services": self.services}
        tmp = self.root / "cluster.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(self.root / "cluster.json")

    @classmethod
    def attach(cls, data_dir: str | Path) -> "LocalCluster":
        """The cluster described by ``<data_dir>/cluster.json`` (started by another process).

        ``FileNotFoundError`` without one; ``ValueError`` naming the file and the problem for one
        that is not what ``start`` writes (not JSON, keys missing, a spec ``ClusterSpec`` refuses)."""
        path = Path(data_dir).resolve() / "cluster.json"
        if not path.exists():
            raise FileNotFoundError(f"no cluster in {data_dir} (missing {path}); start one with `openinfra fs start`")

        def bad(problem: str) -> ValueError:
            return ValueError(f"{path}: {problem}; not a cluster file written by `openinfra fs start`")

        try:
            state = json.loads(path.read_text())
        except UnicodeDecodeError as exc:
            raise bad(f"not text ({exc})") from None
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(state, dict):
            raise bad(f"expected a JSON object, got {type(state).__name__}")
        for key in ("spec", "services"):
            if key not in state:
                raise bad(f"missing {key!r}")
            if not isinstance(state[key], dict):
                raise bad(f"{key!r}: expected an object, got {type(state[key]).__name__}")
        spec = state["spec"]
        known = {f.name for f in fields(ClusterSpec)}
        if "data_dir" not in spec:
            raise bad("missing 'spec.data_dir'")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise bad(f"unknown spec keys {unknown}")
        try:
            cluster_spec = ClusterSpec(**spec)
        except ValueError as exc:
            raise bad(f"spec.{exc}") from None
        for name, svc in state["services"].items():
            if not isinstance(svc, dict):
                raise bad(f"service {name!r}: expected an object, got {type(svc).__name__}")
            role = svc.get("role")
            if role not in ROLES:
                raise bad(f"service {name!r}: role must be one of {list(ROLES)}, got {role!r}")
            prefix, _, num = name.partition("-")
            if prefix != role or not num.isdigit():
                raise bad(f"service {name!r}: expected a name like {role}-1")
            pid = svc.get("pid")
            if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
                raise bad(f"service {name!r}: pid must be an int or null, got {pid!r}")
            for key in ("address", "metrics"):
                if svc.get(key) is not None and not isinstance(svc[key], str):
                    raise bad(f"service {name!r}: {key} must be a string, got {svc[key]!r}")
            if "config" in svc and not isinstance(svc["config"], dict):
                raise bad(f"service {name!r}: config must be an object, got {svc['config']!r}")
        return cls(cluster_spec, state["services"])

    @property
    def mgmtd_addresses(self) -> list[str]:
        # A start that failed may leave an mgmtd that never became ready (no address) in cluster.json.
        return [s["address"] for n, s in sorted(self.services.items()) if s["role"] == "mgmtd" and s.get("address")]

    @property
    def address(self) -> str:
        """The mgmtd addresses, comma separated: what clients connect to."""
        return ",".join(self.mgmtd_addresses)

    def names(self, role: str) -> list[str]:
        return sorted((n for n, s in self.services.items() if s["role"] == role), key=lambda n: int(n.split("-")[1]))

    # --- processes -----------------------------------------------------------------------------

    def _config(self, name: str, role: str, extra: dict) -> dict:
        sp = self.spec
        conf = {"name": name, "host": "127.0.0.1", "port": 0, "heartbeat_s": sp.heartbeat_s,
                "log_file": str(self.root / "logs" / f"{name}.log"), "metrics_port": 0,
                "ready_file": str(self.root / "run" / f"{name}.ready"), **extra}
        if role in ("mgmtd", "meta"):
            conf["kv_url"] = sp.kv_url
        return conf

    def _spawn(self, name: str) -> None:
        svc = self.services[name]
        ready = Path(svc["config"]["ready_file"])
        ready.unlink(missing_ok=True)
        conf_path = self.root / "conf" / f"{name}.json"
        conf_path.write_text(json.dumps(svc["config"], indent=2))
        err = open(self.root / "logs" / f"{name}.stderr", "ab")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "openinfra.fs.server", svc["role"], str(conf_path)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True, env=env)
        err.close()
        self._procs[name] = proc
        svc["pid"] = proc.pid

    def _wait_ready(self, names: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            svc = self.services[name]
            ready = Path(svc["config"]["ready_file"])
            while not ready.exists():
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    tail = (self.root / "logs" / f"{name}.stderr").read_text()[-2000:]
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start:\n{tail}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become ready within {timeout:.0f} s")
                time.sleep(0.02)
            info = json.loads(ready.read_text())
            svc.update(address=info["address"], metrics=info["metrics"], pid=info["pid"])
            # Keep the port for restarts: clients and peers know this address.
            svc["config"]["port"] = int(info["address"].rsplit(":", 1)[1])

    @classmethod
    def start(cls, spec: ClusterSpec, timeout: float = 60.0) -> "LocalCluster":
        """Start every process, create the chain table, and wait until all chains serve.

        The spec is checked again first (it is mutable): a bad one raises ``ValueError`` before any
        directory is made or process spawned."""
        spec.validate()
        self = cls(spec)
        root = self.root
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"data_dir: {root} exists and is not a directory")
        if (root / "cluster.json").exists():
            old = cls.attach(root)
            if any(_alive(s.get("pid", -1)) for s in old.services.values()):
                raise RuntimeError(f"a cluster is already running in {root}; `openinfra fs stop` it first")
        for sub in ("logs", "conf", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        sp = spec
        try:
            for i in range(1, sp.mgmtd_count + 1):
                name = f"mgmtd-{i}"
                self.services[name] = {"role": "mgmtd", "config": self._config(name, "mgmtd", {
                    "lease_s": sp.lease_s, "failure_timeout_s": sp.failure_timeout_s})}
                self._spawn(name)
            self._wait_ready(self.names("mgmtd"), timeout)
            for n in range(1, sp.storage_nodes + 1):
                name = f"storage-{n}"
                targets = {str(n * 100 + k): str(root / name / f"target-{n * 100 + k}")
                           for k in range(1, sp.targets_per_node + 1)}
                self.services[name] = {"role": "storage", "node_id": n, "config": self._config(name, "storage", {
                    "node_id": n, "targets": targets, "mgmtd": self.mgmtd_addresses, "fence_s": sp.failure_timeout_s / 2,
                    "fsync": sp.fsync, "forward_timeout_s": sp.forward_timeout_s})}
                self._spawn(name)
            self._wait_ready(self.names("storage"), timeout)
            chains = plan_chains(sp.storage_nodes, sp.targets_per_node, sp.replication)
            self.admin("create_chain_table", {"table_id": 1, "chains": chains}, retry_s=timeout)
            for m in range(1, sp.meta_count + 1):
                name = f"meta-{m}"
                self.services[name] = {"role": "meta", "node_id": 1000 + m, "config": self._config(name, "meta", {
                    "node_id": 1000 + m, "mgmtd": self.mgmtd_addresses, "session_timeout_s": sp.session_timeout_s,
                    "gc_interval_s": sp.gc_interval_s, "chunk_size": sp.chunk_size, "stripe": sp.stripe})}
                self._spawn(name)
            self._wait_ready(self.names("meta"), timeout)
            self._save()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def admin(self, method: str, args: dict | None = None, retry_s: float = 10.0, timeout: float = 5.0) -> Any:
        """Call the primary mgmtd (whichever instance holds the lease)."""
        deadline = time.monotonic() + retry_s
        while True:
            for addr in self.mgmtd_addresses:
                try:
                    return call(addr, method, args, timeout)
                except FsError as exc:
                    if not exc.retriable:
                        raise
                    last = exc
            if time.monotonic() > deadline:
                raise last
            time.sleep(0.05)

    def routing(self) -> Routing:
        return Routing(self.admin("get_routing"))

    def wait_for(self, predicate: Callable[[Routing], bool], timeout: float = 30.0, what: str = "condition") -> Routing:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.routing()
                if predicate(r):
                    return r
            except FsError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster: {what} not reached within {timeout:.0f} s")
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 30.0) -> Routing:
        """Until every chain's targets all serve, all nodes are alive and no storage node is fenced."""
        want_nodes = {s["node_id"] for s in self.services.values() if s["role"] in ("storage", "meta")}

        def ok(r: Routing) -> bool:
            return (bool(r.chains) and all(t["state"] == TargetState.SERVING for c in r.chains.values() for t in c["targets"])
                    and want_nodes <= {nid for nid, n in r.nodes.items() if n.get("alive")})

        r = self.wait_for(ok, timeout, "all targets serving")
        deadline = time.monotonic() + timeout
        for name in self.names("storage"):
            while call(self.services[name]["address"], "node_info")["fenced"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} still fenced after {timeout:.0f} s")
                time.sleep(0.05)
        return r

    def client(self, **kwargs):
        from openinfra.fs.client.native import Client

        return Client(self.mgmtd_addresses, **kwargs)

    def is_running(self, name: str) -> bool:
        return _alive(self.services[name].get("pid", -1))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one service (SIGKILL for crash drills, SIGSTOP/SIGCONT to freeze it)."""
        if name not in self.services:
            raise ValueError(f"name: no service {name!r}; have {sorted(self.services)}")
        pid = self.services[name].get("pid")
        if pid and _alive(pid):
            os.kill(pid, sig)
            if sig == signal.SIGKILL:
                proc = self._procs.get(name)
                if proc is not None:
                    proc.wait(10)
                else:
                    for _ in range(500):
                        if not _alive(pid):
                            break
                        time.sleep(0.01)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """(Re)start a stopped or killed service with its config and address."""
        if self.is_running(name):
            self.kill(name)
        self._spawn(name)
        self._wait_ready([name], timeout)
        self._save()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every service, SIGKILL what is left after ``timeout``."""
        pids = {n: s.get("pid") for n, s in self.services.items() if s.get("pid")}
        for n, pid in pids.items():
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for n, pid in pids.items():
            while _alive(pid) and time.monotonic() < deadline:
                proc = self._procs.get(n)
                if proc is not None:
                    try:
                        proc.wait(0.05)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if (self.root / "cluster.json").exists() or self.services:
            for s in self.services.values():
                s["pid"] = None
            if self.root.exists():
                self._save()

    def status(self) -> dict:
        """Processes (alive or not) and, from mgmtd, nodes and chains with target states."""
        procs = {n: {"role": s["role"], "pid": s.get("pid"), "address": s.get("address"),
                     "metrics": s.get("metrics"), "running": self.is_running(n)} for n, s in self.services.items()}
        try:
            r = self.routing()
            return {"processes": procs, "routing_version": r.version, "primary": r.info.get("primary"),
                    "nodes": r.nodes, "chains": r.chains}
        except FsError as exc:
            return {"processes": procs, "error": str(exc)}
