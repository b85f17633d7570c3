"""``openinfra bench fs``: 3FS sequential I/O against raw ``dd`` on the same disk, and metadata
operations per second on SQLite and PostgreSQL, all in one run.

Peers: ``dd bs=1M`` writing (``conv=fdatasync`` when our chunks are fsynced) and reading the same
number of bytes in the same directory. Ours: one native client, 1 MiB chunks, the whole file in
one call (chunks in parallel), on a fresh local cluster of 3 storage processes with R=1 (3 chains,
stripe 3) and R=3 (1 chain). Reads are timed two ways, median of 3 each: ``read_bytes`` (a new
``bytes`` object per read: a 64 MiB result costs two fresh allocations whose page faults and
copy dominate the read here) and ``pread_into`` a buffer allocated once, as ``dd`` reuses its
1 MiB buffer; the chunks are received straight into it. Both are checked against the data. Metadata: create / stat / unlink of small files through the meta
service's RPC from ``--meta-concurrency`` concurrent requests.
"""

from __future__ import annotations

import argparse
import time

from openinfra.argtypes import positive_int
from openinfra.bench.harness import BenchResult, routine


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-mib", type=positive_int, default=256, help="bytes per sequential test, MiB (default 256)")
    p.add_argument("--meta-ops", type=positive_int, default=2000, help="files per metadata test (default 2000)")
    p.add_argument("--meta-concurrency", type=positive_int, default=16, help="concurrent metadata requests (default 16)")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync chunk data (dd then skips fdatasync too)")
    p.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL metadata run")
    p.add_argument("--dir", default=None, help="where clusters and dd files go (default: a temp dir)")


def _dd(args: list[str]) -> float:
    t0 = time.perf_counter()
    import subprocess

    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


async def _meta_ops(address: str, n: int, concurrency: int) -> dict[str, float]:
    import asyncio

    from openinfra.fs.rpc import RpcClient

    rpc = RpcClient(default_timeout=60, connections_per_address=4)
    sem = asyncio.Semaphore(concurrency)
    await rpc.call(address, "mkdir", {"path": "/meta-bench", "exist_ok": True})

    async def many(method: str, make_args) -> float:
        async def one(i):
            async with sem:
                await rpc.call(address, method, make_args(i))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)

    out = {
        "create": await many("open", lambda i: {"path": f"/meta-bench/f{i}", "create": True, "exclusive": True,
                                                "write": False}),
        "stat": await many("stat", lambda i: {"path": f"/meta-bench/f{i}"}),
        "unlink": await many("remove", lambda i: {"path": f"/meta-bench/f{i}"}),
    }
    await rpc.close()
    return out


@routine("fs", "3FS: sequential read/write (R=1, R=3) vs dd on the same disk; metadata ops/s on SQLite and PostgreSQL",
         _add_arguments)
def bench_fs(args: argparse.Namespace) -> BenchResult:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from openinfra.fs.cluster import ClusterSpec, LocalCluster
    from openinfra.fs.rpc import run_loop  # uvloop when installed, as the services use

    if args.size_mib < 1 or args.meta_ops < 1 or args.meta_concurrency < 1:
        raise ValueError("--size-mib, --meta-ops and --meta-concurrency must be >= 1")
    base = Path(tempfile.mkdtemp(prefix="openinfra-bench-fs-", dir=args.dir))
    size = args.size_mib << 20
    fsync = not args.no_fsync
    rows: list[dict] = []
    summary: dict = {"size_MiB": args.size_mib, "fsync": fsync}
    try:
        data = os.urandom(size)
        src = base / "src.bin"
        src.write_bytes(data)
        sync = ["conv=fdatasync"] if fsync else []
        dd_w = size / _dd([f"if={src}", f"of={base / 'dd.bin'}", "bs=1M", *sync]) / 1e6
        dd_r = size / _dd([f"if={base / 'dd.bin'}", "of=/dev/null", "bs=1M"]) / 1e6
        rows.append({"test": "dd write", "MB/s": dd_w, "ratio": 1.0, "goal": ""})
        rows.append({"test": "dd read", "MB/s": dd_r, "ratio": 1.0, "goal": ""})
        for r in (1, 3):
            spec = ClusterSpec(str(base / f"r{r}"), storage_nodes=3, replication=r, stripe=3, fsync=fsync,
                               chunk_size=1 << 20)
            cluster = LocalCluster.start(spec, timeout=120)
            try:
                with cluster.client() as fs:
                    t0 = time.perf_counter()
                    fs.write_bytes("/seq.bin", data)
                    w = size / (time.perf_counter() - t0) / 1e6
                    reads = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        got = fs.read_bytes("/seq.bin")
                        reads.append(size / (time.perf_counter() - t0) / 1e6)
                        if got != data:
                            raise RuntimeError("read-back differs")
                        del got
                    rd = sorted(reads)[1]
                    buf = bytearray(size)

                    async def read_into():
                        f = await fs.aio.open("/seq.bin", "rb")
                        try:
                            return await f.pread_into(buf, 0)
                        finally:
                            await f.close()

                    intos = []
                    for _ in range(3):
                        buf[:1] = b"\0" if data[:1] != b"\0" else b"\1"  # a read that did nothing fails the check
                        t0 = time.perf_counter()
                        n = fs._run(read_into())
                        intos.append(size / (time.perf_counter() - t0) / 1e6)
                        if n != size or buf != data:
                            raise RuntimeError("pread_into read-back differs")
                    rd_into = sorted(intos)[1]
                    del buf
                rows.append({"test": f"3FS write R={r}", "MB/s": w, "ratio": w / dd_w, "goal": ">= 0.3" if r == 3 else ""})
                rows.append({"test": f"3FS read R={r}", "MB/s": rd, "ratio": rd / dd_r, "goal": ">= 0.8" if r == 3 else ""})
                rows.append({"test": f"3FS read R={r} (pread_into)", "MB/s": rd_into, "ratio": rd_into / dd_r,
                             "goal": ">= 0.8" if r == 3 else ""})
                summary[f"write_R{r}_over_dd"] = w / dd_w
                summary[f"read_R{r}_over_dd"] = rd / dd_r
                summary[f"read_into_R{r}_over_dd"] = rd_into / dd_r
                if r == 1:
                    meta = run_loop(_meta_ops(cluster.services["meta-1"]["address"], args.meta_ops,
                                                 args.meta_concurrency))
                    for op, v in meta.items():
                        rows.append({"test": f"meta {op} (SQLite)", "ops/s": v, "goal": ">= 2000" if op == "create" else ""})
                    summary["sqlite_create_ops"] = meta["create"]
            finally:
                cluster.stop()
        if not args.no_postgres:
            from openinfra.fs.pg import PrivatePostgres

            try:
                pg = PrivatePostgres.start()
            except RuntimeError as exc:
                rows.append({"test": "meta (PostgreSQL)", "note": f"skipped: {exc}"})
            else:
                try:
                    spec = ClusterSpec(str(base / "pg"), storage_nodes=1, replication=1, stripe=1, fsync=fsync,
                                       meta_db=pg.create_database("bench"))
                    cluster = LocalCluster.start(spec, timeout=120)
                    try:
                        meta = run_loop(_meta_ops(cluster.services["meta-1"]["address"], args.meta_ops,
                                                     args.meta_concurrency))
                    finally:
                        cluster.stop()
                    for op, v in meta.items():
                        rows.append({"test": f"meta {op} (PostgreSQL)", "ops/s": v, "goal": ""})
                    summary["postgres_create_ops"] = meta["create"]
                finally:
                    pg.stop()
        summary.update(dd_write_MBps=dd_w, dd_read_MBps=dd_r, goal_read_R3_over_dd=0.8, goal_write_R3_over_dd=0.3,
                       goal_sqlite_create_ops=2000)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return BenchResult(rows, summary)
