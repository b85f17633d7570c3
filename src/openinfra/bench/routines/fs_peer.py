"""``openinfra bench fs_peer``: 3FS against MooseFS on the same read/write workloads, in one run.

Peer: MooseFS 3.0 from Debian (``moosefs-master``, ``moosefs-chunkserver``, ``moosefs-client``),
started by this routine and torn down at the end. Its chunkserver refuses 127.0.0.1 for the
master connection ("localhost (127.0.0.1) can't be used for connecting with master"), so the
chunkservers run in a network namespace that this routine creates, joined to the host by a veth
pair (host ``<subnet>.1``, chunkserver N at ``<subnet>.(N+1)`` inside; default ``10.77.0.0/24``).
The master and the ``mfsmount`` FUSE client run on the host: client <-> chunkserver traffic
crosses the veth, chunkserver <-> chunkserver replication stays inside the namespace.

Ours: a fresh local 3FS cluster (mgmtd, meta, ``--chunkservers`` storage processes, 1 MiB chunks)
read and written through its FUSE mount (``python -m openinfra.fs.clients.fuse``) with the very
same POSIX code as the MooseFS mount, and through the native Python client.

Same replication on both: for every R in ``--replication`` (default 1 and 3) MooseFS writes into a
directory of goal R and ours into a cluster with chains of R targets. Durability matches:
``--fsync`` (default on) makes 3FS storage fsync chunk data and MooseFS chunkservers fsync chunk
files before close (``HDD_FSYNC_BEFORE_CLOSE = 1``); every write test ends with ``fsync`` and the
time includes it.

Workloads per system and R (1 thread, queue depth 1), after an untimed 4 MiB write + read warm-up:

* sequential write of ``--size-mib`` (default 256 MiB) in ``--io-kib`` (1 MiB) writes, fsync, close;
* sequential read of it in 1 MiB reads, bytes checked;
* 4 KiB random reads at distinct 4 KiB-aligned offsets (``POSIX_FADV_RANDOM``), bounded by
  ``--rand-ops`` and ``--rand-seconds``, bytes spot-checked;
* 4 KiB random writes at distinct offsets, same bounds, then fsync (included in the time).

Reads are cold: before each read test the page cache is dropped (``sync; echo 1 >
/proc/sys/vm/drop_caches``, which also empties the storage side's cached chunk files) and the
FUSE filesystem is unmounted and mounted again (no client cache: MooseFS's read-ahead buffers and
ours); ``--no-drop-caches`` keeps only the fresh mount. Bars (``ours / MooseFS``): reads >= 1.0x,
writes >= 0.7x, judged for our FUSE mount (the like-for-like surface) and for our best surface.

Needs root, ``ip`` (iproute2), /dev/fuse, ``fusermount3``, pyfuse3 and the MooseFS binaries;
``--install`` runs ``apt-get install`` for the missing Debian packages. Everything it starts
(processes, mounts, namespaces, veths, the temp dir) is removed in ``finally`` blocks, also on
Ctrl-C / SIGTERM and when ``--time-limit`` runs out.
"""

from __future__ import annotations

import abc
import argparse
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from openinfra.bench.harness import BenchResult, routine

NAME = "fs_peer"
PACKAGES = {"mfsmaster": "moosefs-master", "mfschunkserver": "moosefs-chunkserver", "mfsmount": "moosefs-client",
            "mfssetgoal": "moosefs-client", "mfsfileinfo": "moosefs-client", "ip": "iproute2",
            "fusermount3": "fuse3"}
GOALS = {"seq_write": 0.7, "seq_read": 1.0, "rand_write": 0.7, "rand_read": 1.0}
WORKLOADS = ("seq_write", "seq_read", "rand_read", "rand_write")
UNITS = {"seq_write": "MB/s", "seq_read": "MB/s", "rand_read": "ops/s", "rand_write": "ops/s"}
PEER = "MooseFS"


class PeerUnavailable(SystemExit):
    """Exits (status 1, the message on stderr) naming what is missing or wrong and how to fix it."""

    def __init__(self, message: str):
        super().__init__(f"openinfra bench {NAME}: error: {message}")
        self.message = message


# --- arguments -----------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-mib", type=int, default=256, help="file for the sequential tests, MiB (default 256)")
    p.add_argument("--io-kib", type=int, default=1024, help="sequential I/O size, KiB (default 1024)")
    p.add_argument("--rand-ops", type=int, default=2000, help="4 KiB random reads / writes per test, at most (default 2000)")
    p.add_argument("--rand-seconds", type=float, default=20.0, help="time cap of one random test, s (default 20)")
    p.add_argument("--replication", default="1,3", help="replication factors (MooseFS goal), comma-separated (default 1,3)")
    p.add_argument("--chunkservers", type=int, default=3, help="MooseFS chunkservers = 3FS storage processes (default 3)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="no fsync of chunk data on either system")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="do not drop the page cache before reads (fresh mounts only)")
    p.add_argument("--no-native", dest="native", action="store_false", help="skip our native-client rows")
    p.add_argument("--subnet", default="10.77.0", help="first three octets of the veth's /24 (default 10.77.0)")
    p.add_argument("--time-limit", type=float, default=1200.0, help="abort (and clean up) after this many seconds (default 1200)")
    p.add_argument("--install", action="store_true", help="apt-get install the missing MooseFS / fuse3 packages first")
    p.add_argument("--dir", default=None, help="parent of the temp dir for both systems' data (default: $TMPDIR)")


@dataclass(frozen=True)
class Plan:
    size: int
    io: int
    rand_ops: int
    rand_seconds: float
    replication: tuple[int, ...]
    chunkservers: int
    subnet: str
    time_limit: float


def validate(args: argparse.Namespace) -> Plan:
    """Check the arguments; ``ValueError`` names the bad one."""
    if args.size_mib < 1:
        raise ValueError(f"--size-mib must be >= 1, got {args.size_mib}")
    if args.io_kib < 4 or args.io_kib % 4:
        raise ValueError(f"--io-kib must be a multiple of 4 and >= 4, got {args.io_kib}")
    if (args.size_mib << 10) % args.io_kib:
        raise ValueError(f"--size-mib ({args.size_mib} MiB) must be a multiple of --io-kib ({args.io_kib} KiB)")
    if args.rand_ops < 1:
        raise ValueError(f"--rand-ops must be >= 1, got {args.rand_ops}")
    if not args.rand_seconds > 0:
        raise ValueError(f"--rand-seconds must be > 0, got {args.rand_seconds}")
    if not 1 <= args.chunkservers <= 9:
        raise ValueError(f"--chunkservers must be 1..9, got {args.chunkservers}")
    try:
        reps = tuple(sorted({int(x) for x in str(args.replication).split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--replication must be comma-separated integers, got {args.replication!r}") from None
    if not reps or reps[0] < 1 or reps[-1] > args.chunkservers:
        raise ValueError(f"--replication values must be 1..{args.chunkservers} (the chunkservers), got {args.replication!r}")
    for r in reps:
        if args.chunkservers % r:
            raise ValueError(f"--chunkservers ({args.chunkservers}) must be a multiple of every replication factor "
                             f"(3FS chains have R targets on distinct nodes), got R={r}")
    m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", str(args.subnet))
    if not m or not all(0 <= int(g) <= 255 for g in m.groups()):
        raise ValueError(f"--subnet must be three octets like 10.77.0, got {args.subnet!r}")
    net = ipaddress.ip_network(f"{args.subnet}.0/24")
    if net.is_loopback or not net.is_private:
        raise ValueError(f"--subnet must be a private, non-loopback range, got {args.subnet!r}")
    if not args.time_limit > 0:
        raise ValueError(f"--time-limit must be > 0, got {args.time_limit}")
    return Plan(args.size_mib << 20, args.io_kib << 10, args.rand_ops, args.rand_seconds, reps, args.chunkservers,
                args.subnet, args.time_limit)


# --- requirements --------------------------------------------------------------------------------

def missing_requirements(euid: int | None = None, which: Callable[[str], str | None] = shutil.which,
                         exists: Callable[[str], bool] = os.path.exists, have_pyfuse3: bool | None = None) -> list[str]:
    """What this machine lacks to run the comparison, one readable line each (empty: all there)."""
    euid = os.geteuid() if euid is None else euid
    problems = []
    if euid != 0:
        problems.append("must run as root (it creates network namespaces, veth pairs and FUSE mounts)")
    missing = {cmd: pkg for cmd, pkg in PACKAGES.items() if which(cmd) is None}
    if missing:
        pkgs = sorted(set(missing.values()))
        problems.append(f"missing commands {', '.join(sorted(missing))}: apt-get install {' '.join(pkgs)} "
                        f"(or rerun with --install)")
    if not exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (both FUSE clients need it)")
    if have_pyfuse3 is None:
        try:
            import pyfuse3  # noqa: F401
            have_pyfuse3 = True
        except ImportError:
            have_pyfuse3 = False
    if not have_pyfuse3:
        problems.append("pyfuse3 is not importable (our FUSE mount needs it: pip install pyfuse3)")
    return problems


def require(problems: list[str]) -> None:
    if problems:
        raise PeerUnavailable("cannot run the MooseFS comparison here:\n  - " + "\n  - ".join(problems))


def install_packages(which: Callable[[str], str | None] = shutil.which) -> None:
    pkgs = sorted({pkg for cmd, pkg in PACKAGES.items() if which(cmd) is None})
    if not pkgs:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env, timeout=900,
                       capture_output=True, text=True)
    if r.returncode:
        raise PeerUnavailable(f"apt-get install {' '.join(pkgs)} failed (exit {r.returncode}):\n{r.stderr[-1500:]}")


# --- results -------------------------------------------------------------------------------------

def ratio_table(values: dict[tuple[str, int, str], float], ours: tuple[str, ...], peer: str = PEER) -> dict:
    """Ratios ours/peer per (workload, R).

    ``values[(system, R, workload)]`` is MB/s or ops/s (higher is better). For each R and workload
    where the peer has a positive value: ``<surface>_over_peer`` for every surface of ours present,
    ``best`` (the highest of ours), ``goal`` and ``fuse_meets`` / ``best_meets``. Missing values are
    skipped, never counted as zero.
    """
    out: dict = {}
    for (system, r, w), peer_v in sorted(values.items()):
        if system != peer or not peer_v or peer_v <= 0:
            continue
        entry: dict = {"goal": GOALS[w], "peer": peer_v}
        best = None
        for s in ours:
            v = values.get((s, r, w))
            if v is None:
                continue
            entry[f"{s}_over_peer"] = v / peer_v
            best = v / peer_v if best is None else max(best, v / peer_v)
        if best is None:
            continue
        entry["best_over_peer"] = best
        entry["best_meets"] = best >= GOALS[w]
        if f"{ours[0]}_over_peer" in entry:
            entry["fuse_meets"] = entry[f"{ours[0]}_over_peer"] >= GOALS[w]
        out[f"{w}_R{r}"] = entry
    return out


def summarize(values: dict[tuple[str, int, str], float], ours: tuple[str, ...]) -> dict:
    """The flat summary for the JSON line: ratios, goals and an overall verdict per surface."""
    table = ratio_table(values, ours)
    s: dict = {f"goal_{w}": g for w, g in GOALS.items()}
    for key, e in table.items():
        for k, v in e.items():
            if k.endswith("_over_peer"):
                s[f"{key}_{k}"] = round(v, 3)
    if table:
        s["all_goals_met_fuse"] = all(e.get("fuse_meets", False) for e in table.values())
        s["all_goals_met_best"] = all(e["best_meets"] for e in table.values())
    return s


# --- processes, namespaces, mounts ---------------------------------------------------------------

class _Deadline(RuntimeError):
    pass


def _run(cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop_proc(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _mounted(mnt: str) -> bool:
    """From /proc/self/mounts: also true for a FUSE mount whose daemon died (``os.path.ismount``
    says False there, as ``lstat`` fails with ENOTCONN)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def _unmount(mnt: str) -> None:
    if _mounted(mnt):
        r = _run(["fusermount3", "-u", mnt], timeout=30, check=False)
        if r.returncode and _mounted(mnt):
            _run(["fusermount3", "-uz", mnt], timeout=30, check=False)  # lazy: never leave it behind


class Watchdog:
    """Enforces ``--time-limit`` even when the main thread is stuck in a FUSE syscall (a signal
    cannot interrupt one once the request is sent): at the deadline it SIGKILLs the FUSE daemons
    in ``procs``, which fails their pending requests (ENOTCONN) so the main thread gets an error,
    then cleans up in its ``finally`` blocks."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.procs: list[subprocess.Popen] = []
        self.expired = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fs_peer-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._done.wait(self.seconds):
            return
        self.expired.set()
        for p in list(self.procs):
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass

    def check(self) -> None:
        if self.expired.is_set():
            raise _Deadline(f"--time-limit {self.seconds:g}s ran out")

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def _wait_mounted(mnt: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} mount at {mnt} failed (exit {proc.poll()}): {_tail(log)}")
        time.sleep(0.05)


@dataclass
class Netns:
    """One namespace joined to the host by one veth pair: host ``<subnet>.1``, chunkserver N at
    ``<subnet>.(N+1)`` inside, so chunkserver <-> chunkserver traffic (replication) stays inside the
    namespace and nothing needs IP forwarding on the host."""

    subnet: str
    count: int
    tag: str = field(default_factory=lambda: f"oifp{os.getpid() % 10_000_000}")
    made: list[str] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.tag

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    def ns_ip(self, n: int) -> str:
        return f"{self.subnet}.{n + 1}"

    def create(self) -> None:
        used = _run(["ip", "-4", "-o", "addr", "show"]).stdout
        if re.search(rf"\binet {re.escape(self.subnet)}\.", used):
            raise RuntimeError(f"addresses in {self.subnet}.0/24 are already in use on this host (a leftover of an "
                               f"earlier run? see `ip -4 addr` and `ip netns list`); pick another --subnet")
        host_if, ns_if = f"{self.tag}h", f"{self.tag}c"
        _run(["ip", "netns", "add", self.ns])
        self.made.append("ns")
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        self.made.append(host_if)
        _run(["ip", "link", "set", ns_if, "netns", self.ns])
        _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        inside = [["ip", "link", "set", "lo", "up"], ["ip", "link", "set", ns_if, "up"]]
        inside += [["ip", "addr", "add", f"{self.ns_ip(n)}/24", "dev", ns_if] for n in range(1, self.count + 1)]
        for cmd in inside:
            _run(["ip", "netns", "exec", self.ns, *cmd])

    def destroy(self) -> None:
        if "ns" in self.made:
            _run(["ip", "netns", "del", self.ns], check=False)  # takes the veth pair with it (asynchronously)
        for host_if in self.made[1:]:
            deadline = time.monotonic() + 10
            while _run(["ip", "link", "show", host_if], check=False).returncode == 0 and time.monotonic() < deadline:
                _run(["ip", "link", "del", host_if], check=False)
                time.sleep(0.1)
        self.made.clear()


class _FuseClient(abc.ABC):
    """A file system's FUSE client process at ``self.mnt`` (``base``, ``watch`` set by the subclass):
    mount, unmount and remount (the cold-read protocol) the same way for both systems."""

    log_name = "mount.log"
    label = "FUSE"
    base: Path
    mnt: str
    watch: list
    mount_proc: subprocess.Popen | None = None

    @abc.abstractmethod
    def _mount_command(self) -> list[str]:
        """The client process's command line (it mounts at ``self.mnt`` and stays in the foreground)."""

    def mount(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        log = self.base / self.log_name
        self.mount_proc = subprocess.Popen(self._mount_command(), stdin=subprocess.DEVNULL, stdout=log.open("a"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        self.watch.append(self.mount_proc)
        _wait_mounted(self.mnt, self.mount_proc, log, self.label)

    def unmount(self) -> None:
        _unmount(self.mnt)
        _stop_proc(self.mount_proc)
        self.mount_proc = None

    def remount(self) -> None:
        self.unmount()
        self.mount()


class MooseFS(_FuseClient):
    """mfsmaster on the host, mfschunkservers in namespaces, mfsmount on the host."""

    log_name = "mfsmount.log"
    label = "mfsmount"

    def __init__(self, base: Path, net: Netns, fsync: bool, watch: list | None = None):
        self.base, self.net, self.fsync = base, net, fsync
        self.watch = [] if watch is None else watch
        self.master: subprocess.Popen | None = None
        self.chunkservers: list[subprocess.Popen] = []
        self.mount_proc: subprocess.Popen | None = None
        self.mnt = str(base / "mnt")
        self.ports = {"ml": _free_port(), "cs": _free_port(), "cl": _free_port()}

    def _cfg(self, name: str, items: dict) -> Path:
        path = self.base / f"{name}.cfg"
        path.write_text("".join(f"{k} = {v}\n" for k, v in items.items()))
        return path

    def start(self, timeout: float = 60) -> None:
        common = {"WORKING_USER": "root", "WORKING_GROUP": "root", "NICE_LEVEL": 0, "DISABLE_OOM_KILLER": 0}
        mdir = self.base / "master"
        mdir.mkdir(parents=True)
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", mdir / "metadata.mfs")
        (self.base / "mfsexports.cfg").write_text("*  /  rw,alldirs,admin,maproot=0:0\n")
        (self.base / "mfstopology.cfg").write_text("")
        cfg = self._cfg("mfsmaster", {**common, "DATA_PATH": mdir, "EXPORTS_FILENAME": self.base / "mfsexports.cfg",
                                      "TOPOLOGY_FILENAME": self.base / "mfstopology.cfg",
                                      "MATOML_LISTEN_HOST": self.net.host_ip, "MATOML_LISTEN_PORT": self.ports["ml"],
                                      "MATOCS_LISTEN_HOST": self.net.host_ip, "MATOCS_LISTEN_PORT": self.ports["cs"],
                                      "MATOCL_LISTEN_HOST": self.net.host_ip, "MATOCL_LISTEN_PORT": self.ports["cl"],
                                      "REPLICATIONS_DELAY_INIT": 0})
        mlog = self.base / "mfsmaster.log"
        self.master = subprocess.Popen(["mfsmaster", "-f", "-c", str(cfg)], stdin=subprocess.DEVNULL,
                                       stdout=mlog.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_log(mlog, "initialized properly", 1, self.master, timeout, "mfsmaster")
        for n in range(1, self.net.count + 1):
            d = self.base / f"cs{n}"
            (d / "hdd").mkdir(parents=True)
            (d / "mfshdd.cfg").write_text(f"{d / 'hdd'}\n")
            ccfg = self._cfg(f"mfschunkserver{n}", {
                **common, "DATA_PATH": d, "HDD_CONF_FILENAME": d / "mfshdd.cfg", "MASTER_HOST": self.net.host_ip,
                "MASTER_PORT": self.ports["cs"], "BIND_HOST": self.net.ns_ip(n),
                "CSSERV_LISTEN_HOST": self.net.ns_ip(n), "CSSERV_LISTEN_PORT": 9422, "HDD_LEAVE_SPACE_DEFAULT": "256MiB",
                "HDD_FSYNC_BEFORE_CLOSE": int(self.fsync)})
            self.chunkservers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns, "mfschunkserver", "-f", "-c", str(ccfg)],
                stdin=subprocess.DEVNULL, stdout=(self.base / f"mfschunkserver{n}.log").open("w"),
                stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_log(mlog, "chunkserver register end", self.net.count, self.master, timeout, "chunkserver registration",
                       self.chunkservers)
        self.mount()

    def _wait_log(self, log: Path, needle: str, count: int, proc: subprocess.Popen, timeout: float, what: str,
                  others: list[subprocess.Popen] = ()) -> None:
        deadline = time.monotonic() + timeout
        while _tail(log, 1 << 20).count(needle) < count:
            dead = [p for p in [proc, *others] if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}:\n{_tail(p)}" for p in sorted(self.base.glob("*.log")))
                raise RuntimeError(f"MooseFS {what} did not come up ({'a process exited' if dead else 'timeout'}):\n{logs}")
            time.sleep(0.1)

    def _mount_command(self) -> list[str]:
        return ["mfsmount", "-f", self.mnt, "-o", f"mfsmaster={self.net.host_ip},mfsport={self.ports['cl']}"]

    def dir_for(self, r: int) -> str:
        d = os.path.join(self.mnt, f"goal{r}")
        if not os.path.isdir(d):
            os.mkdir(d)
            _run(["mfssetgoal", str(r), d])
        return d

    def copies(self, path: str) -> int:
        """Valid copies of the file's first chunk, from ``mfsfileinfo``."""
        out = _run(["mfsfileinfo", path]).stdout
        first = out.split("chunk 1:")[0]
        return len(re.findall(r"copy \d+: .*VALID", first))

    def stop(self) -> None:
        try:
            self.unmount()
        finally:
            for p in self.chunkservers:
                _stop_proc(p)
            _stop_proc(self.master, 60)  # it saves its metadata on SIGTERM


class ThreeFS(_FuseClient):
    """A local cluster of ours and its FUSE mount."""

    log_name = "fuse.log"
    label = "3FS FUSE"

    def __init__(self, base: Path, storage: int, replication: int, fsync: bool, watch: list | None = None):
        from openinfra.fs.cluster import ClusterSpec, LocalCluster

        self.base = base
        self.watch = [] if watch is None else watch
        self.cluster = None
        self.mount_proc: subprocess.Popen | None = None
        self.mnt = str(base / "mnt")
        spec = ClusterSpec(str(base / "cluster"), storage_nodes=storage, replication=replication, stripe=storage // replication,
                           fsync=fsync, chunk_size=1 << 20)
        self.cluster = LocalCluster.start(spec, timeout=120)

    def _mount_command(self) -> list[str]:
        return [sys.executable, "-m", "openinfra.fs.clients.fuse", self.mnt, "--mgmtd", self.cluster.address]

    def stop(self) -> None:
        try:
            self.unmount()
        finally:
            if self.cluster is not None:
                self.cluster.stop()


# --- workloads -----------------------------------------------------------------------------------

def drop_caches(enabled: bool) -> None:
    os.sync()
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


@dataclass
class Posix:
    """The workloads through a mounted path (both FUSE clients)."""

    path: str

    def warmup(self) -> None:
        """An untimed 4 MiB write + fsync + read of a side file: connections, first chunk allocation."""
        side = self.path + ".warmup"
        with open(side, "wb") as f:
            f.write(os.urandom(4 << 20))
            f.flush()
            os.fsync(f.fileno())
        with open(side, "rb") as f:
            f.read()
        os.remove(side)

    def seq_write(self, data: memoryview, io: int) -> float:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t0 = time.perf_counter()
            for off in range(0, len(data), io):
                if os.write(fd, data[off:off + io]) != min(io, len(data) - off):
                    raise RuntimeError("short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    def seq_read(self, data: memoryview, io: int) -> float:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            off = 0
            while True:
                b = os.read(fd, io)
                if not b:
                    break
                if b != data[off:off + len(b)]:
                    raise RuntimeError(f"read-back differs at {off} in {self.path}")
                off += len(b)
            secs = time.perf_counter() - t0
        finally:
            os.close(fd)
        if off != len(data):
            raise RuntimeError(f"read {off} bytes of {len(data)} from {self.path}")
        return secs

    def rand_read(self, offsets: list[int], expect: dict[int, bytes], cap_s: float) -> tuple[int, float]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            t0 = time.perf_counter()
            done = 0
            for off in offsets:
                b = os.pread(fd, 4096, off)
                if len(b) != 4096 or (off in expect and b != expect[off]):
                    raise RuntimeError(f"random read at {off} of {self.path} returned wrong bytes")
                done += 1
                if time.perf_counter() - t0 > cap_s:
                    break
            return done, time.perf_counter() - t0
        finally:
            os.close(fd)

    def rand_write(self, offsets: list[int], block: bytes, cap_s: float) -> tuple[int, float]:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            t0 = time.perf_counter()
            done = 0
            for off in offsets:
                if os.pwrite(fd, block, off) != 4096:
                    raise RuntimeError("short write")
                done += 1
                if time.perf_counter() - t0 > cap_s:
                    break
            os.fsync(fd)
            return done, time.perf_counter() - t0
        finally:
            os.close(fd)

    def check(self, offsets: list[int], block: bytes) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for off in offsets:
                if os.pread(fd, 4096, off) != block:
                    raise RuntimeError(f"random write at {off} of {self.path} did not read back")
        finally:
            os.close(fd)


@dataclass
class Native:
    """The same workloads through our native client (``Client.open`` / ``pread`` / ``pwrite``)."""

    address: str
    path: str

    def _client(self):
        from openinfra.fs.client.native import Client

        return Client(self.address)

    def warmup(self) -> None:
        with self._client() as c:
            c.write_bytes(self.path + ".warmup", os.urandom(4 << 20))
            c.read_bytes(self.path + ".warmup")
            c.remove(self.path + ".warmup")

    def seq_write(self, data: memoryview, io: int) -> float:
        with self._client() as c:
            t0 = time.perf_counter()
            with c.open(self.path, "wb") as f:
                for off in range(0, len(data), io):
                    f.pwrite(data[off:off + io], off)
                f.fsync()
            return time.perf_counter() - t0

    def seq_read(self, data: memoryview, io: int) -> float:
        with self._client() as c:
            t0 = time.perf_counter()
            with c.open(self.path, "rb") as f:
                for off in range(0, len(data), io):
                    if f.pread(io, off) != data[off:off + io]:
                        raise RuntimeError(f"native read-back differs at {off}")
            return time.perf_counter() - t0

    def rand_read(self, offsets: list[int], expect: dict[int, bytes], cap_s: float) -> tuple[int, float]:
        with self._client() as c, c.open(self.path, "rb") as f:
            t0 = time.perf_counter()
            done = 0
            for off in offsets:
                b = f.pread(4096, off)
                if len(b) != 4096 or (off in expect and b != expect[off]):
                    raise RuntimeError(f"native random read at {off} returned wrong bytes")
                done += 1
                if time.perf_counter() - t0 > cap_s:
                    break
            return done, time.perf_counter() - t0

    def rand_write(self, offsets: list[int], block: bytes, cap_s: float) -> tuple[int, float]:
        with self._client() as c, c.open(self.path, "r+b") as f:
            t0 = time.perf_counter()
            done = 0
            for off in offsets:
                f.pwrite(block, off)
                done += 1
                if time.perf_counter() - t0 > cap_s:
                    break
            f.fsync()
            return done, time.perf_counter() - t0

    def check(self, offsets: list[int], block: bytes) -> None:
        with self._client() as c, c.open(self.path, "rb") as f:
            for off in offsets:
                if f.pread(4096, off) != block:
                    raise RuntimeError(f"native random write at {off} did not read back")


def run_workloads(io_obj, cold: Callable[[], None], plan: Plan, data: memoryview, rng: random.Random,
                  check_time: Callable[[], None]) -> dict[str, float]:
    """seq write, (cold) seq read, (cold) random reads, random writes; MB/s or ops/s each."""
    out: dict[str, float] = {}
    io_obj.warmup()
    out["seq_write"] = plan.size / io_obj.seq_write(data, plan.io) / 1e6
    check_time()
    cold()
    out["seq_read"] = plan.size / io_obj.seq_read(data, plan.io) / 1e6
    check_time()
    slots = plan.size // 4096
    offsets = [s * 4096 for s in rng.sample(range(slots), min(plan.rand_ops, slots))]
    expect = {off: bytes(data[off:off + 4096]) for off in offsets[::53]}
    cold()
    n, secs = io_obj.rand_read(offsets, expect, plan.rand_seconds)
    out["rand_read"] = n / secs
    check_time()
    block = rng.randbytes(4096)
    woffs = [s * 4096 for s in rng.sample(range(slots), min(plan.rand_ops, slots))]
    n, secs = io_obj.rand_write(woffs, block, plan.rand_seconds)
    out["rand_write"] = n / secs
    io_obj.check(woffs[:n:max(1, n // 50)], block)
    check_time()
    return out


def source_version() -> str:
    """The commit of the code under test, ``+dirty`` when ``src/openinfra/fs`` has uncommitted edits."""
    here = str(Path(__file__).resolve().parent)
    try:
        sha = _run(["git", "-C", here, "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
        dirty = _run(["git", "-C", here, "status", "--porcelain", "--", ":(top)src/openinfra/fs"], timeout=10).stdout
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "unknown"
    return sha + ("+dirty" if dirty.strip() else "")


# --- the routine ---------------------------------------------------------------------------------

@routine(NAME, "3FS vs MooseFS: sequential and 4 KiB random read/write through each one's client", _add_arguments)
def bench_fs_peer(args: argparse.Namespace) -> BenchResult:
    try:
        plan = validate(args)
    except ValueError as exc:
        raise PeerUnavailable(str(exc)) from None
    if args.install and os.geteuid() == 0:
        install_packages()
    require(missing_requirements())

    data = memoryview(os.urandom(plan.size))  # before anything is started: nothing to clean up if this fails
    interrupted: list[int] = []

    def on_signal(signum, frame):  # the first SIGINT/SIGTERM stops the run; later ones cannot break the cleanup
        if not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")
        print(f"{NAME}: still cleaning up (signal {signum} ignored)", file=sys.stderr)

    values: dict[tuple[str, int, str], float] = {}
    rows: list[dict] = []
    ours = ("3FS FUSE", "3FS native") if args.native else ("3FS FUSE",)
    net = Netns(args.subnet, plan.chunkservers)
    mfs = None
    copies: dict[int, int] = {}

    def record(system: str, r: int, res: dict[str, float]) -> None:
        for w, v in res.items():
            values[(system, r, w)] = v

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    watchdog = Watchdog(plan.time_limit)
    base = None
    try:
        base = Path(tempfile.mkdtemp(prefix="openinfra-bench-fspeer-", dir=args.dir))
        # MooseFS first (all R on one cluster), then one 3FS cluster per R.
        net.create()
        mfs = MooseFS(base / "moosefs", net, args.fsync, watchdog.procs)
        mfs.base.mkdir()
        mfs.start()
        for r in plan.replication:
            path = os.path.join(mfs.dir_for(r), "bench.bin")

            def mfs_cold():
                mfs.remount()
                drop_caches(args.drop_caches)

            res = run_workloads(Posix(path), mfs_cold, plan, data, random.Random(r), watchdog.check)
            copies[r] = mfs.copies(path)
            record(PEER, r, res)
        mfs.stop()
        mfs = None
        net.destroy()
        for r in plan.replication:
            t = None
            try:
                t = ThreeFS(base / f"3fs-r{r}", plan.chunkservers, r, args.fsync, watchdog.procs)
                t.mount()

                def fuse_cold():
                    t.remount()
                    drop_caches(args.drop_caches)

                record("3FS FUSE", r, run_workloads(Posix(os.path.join(t.mnt, "bench.bin")), fuse_cold, plan, data,
                                                    random.Random(r), watchdog.check))
                t.unmount()
                if args.native:
                    record("3FS native", r, run_workloads(Native(t.cluster.address, "/bench-native.bin"),
                                                          lambda: drop_caches(args.drop_caches), plan, data,
                                                          random.Random(r), watchdog.check))
            finally:
                if t is not None:
                    t.stop()
    except Exception as exc:
        if watchdog.expired.is_set():  # the error came from the FUSE daemons the watchdog killed
            raise PeerUnavailable(f"--time-limit {plan.time_limit:g}s ran out ({type(exc).__name__}: {exc}); "
                                  f"everything was torn down") from exc
        raise
    finally:
        watchdog.stop()
        try:
            if mfs is not None:
                mfs.stop()
        finally:
            try:
                net.destroy()
            finally:
                if base is not None:
                    shutil.rmtree(base, ignore_errors=True)
                for sig, h in old_handlers.items():
                    signal.signal(sig, h)

    table = ratio_table(values, ours)
    for r in plan.replication:
        for w in WORKLOADS:
            e = table.get(f"{w}_R{r}", {})
            for system in (PEER, *ours):
                v = values.get((system, r, w))
                if v is None:
                    continue
                row = {"R": r, "workload": w, "system": system, "value": v, "unit": UNITS[w]}
                if system != PEER and f"{system}_over_peer" in e:
                    row["ours/MooseFS"] = e[f"{system}_over_peer"]
                    row["goal"] = f">= {GOALS[w]}"
                rows.append(row)
    summary = {"source": source_version(), "size_MiB": plan.size >> 20, "io_KiB": plan.io >> 10, "rand_ops_max": plan.rand_ops,
               "rand_seconds_max": plan.rand_seconds, "chunkservers": plan.chunkservers,
               "replication": list(plan.replication), "fsync": args.fsync,
               "cold_reads": "drop_caches + fresh mount" if args.drop_caches else "fresh mount only",
               "moosefs_copies_of_chunk0": copies,
               **{f"{s.replace(' ', '_')}_R{r}_{w}": round(v, 2) for (s, r, w), v in sorted(values.items())},
               **summarize(values, ours)}
    return BenchResult(rows, summary)
