"""``openinfra bench smallpond``: the README example and GraySort, against peers in the same run.

Peers (same input files, same machine, same run):
- real smallpond 0.15 in its own venv (duckdb==1.2.2, numpy<2, pandas<2.3: it does not import with
  newer DuckDB); made with ``--install-smallpond`` or found at ``--smallpond-venv``; left out (and
  said so in the summary) when neither is there;
- one DuckDB ``COPY (SELECT ... ORDER BY key)`` for GraySort, one DuckDB query for the README example;
- pandas (read, sort / group, write) while the data fits comfortably (<= 1 GiB).

Ours and smallpond 0.15 run each job as a fresh Python process, so import and start-up (Ray's, for
smallpond) count, as they do for a user; the DuckDB and pandas peers run inside the benchmark
process (already imported). ``--repeat N`` runs every engine N times, alternating, and reports medians. GraySort input: 100-byte records (``openinfra.smallpond.graysort``); default
``--gib 0.05`` on a CPU box, ``--gib 2`` for the dataflow.md goal. ``--3fs-url`` adds a run whose
output and intermediate data live on 3FS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from openinfra.argtypes import positive_float, positive_int
from openinfra.bench.harness import BenchResult, routine

_DEFAULT_VENV = os.path.expanduser("~/.cache/openinfra/sp015")

_README = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    {import_line}
    sp = smallpond.init(data_root=sys.argv[2]{extra})
    df = sp.read_parquet(sys.argv[1])
    df = df.repartition(3, hash_by="ticker")
    df = sp.partial_sql("SELECT ticker, min(price), max(price) FROM {{0}} GROUP BY ticker", df)
    df.write_parquet(sys.argv[3])
    out = df.to_pandas()
    print(json.dumps({{"seconds": time.perf_counter() - t0, "rows": len(out)}}))
    sp.shutdown()
""")

_GRAYSORT = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    {import_line}
    n = int(sys.argv[4])
    sp = smallpond.init(data_root=sys.argv[2]{extra})
    df = sp.read_parquet(sys.argv[1] + "/*.parquet")
    df = df.repartition(int(sys.argv[5]))
    # smallpond 0.15 takes a column name in by=, so the range partition is computed as a column first
    df = df.map(f"key, value, (('0x' || substr(hex(key), 1, 4))::INTEGER * {{n}}) // 65536 as part")
    df = df.repartition(n, by="part")
    df = df.partial_sort(by="key")
    df.write_parquet(sys.argv[3])
    print(json.dumps({{"seconds": time.perf_counter() - t0}}))
    sp.shutdown()
""")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gib", type=positive_float, default=0.05, help="GraySort input size in GiB (2 for the dataflow.md goal)")
    p.add_argument("--partitions", type=positive_int, default=None, help="GraySort output partitions (default: 2 x CPUs)")
    p.add_argument("--workers", type=positive_int, default=None, help="parallel tasks (default: CPUs)")
    p.add_argument("--readme-rows", type=positive_int, default=1_000_000, help="rows of prices.parquet for the README example")
    p.add_argument("--workdir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    p.add_argument("--smallpond-venv", default=_DEFAULT_VENV, help="venv holding smallpond 0.15 (the peer)")
    p.add_argument("--install-smallpond", action="store_true", help="create that venv with pip if missing")
    p.add_argument("--3fs-url", dest="fs_url", default=None,
                   help="also run GraySort with intermediate data and output on this URL (3fs://...; the cluster "
                        "from OPENINFRA_FS_MGMTD)")
    p.add_argument("--start-3fs", action="store_true",
                   help="start an embedded 3FS cluster (2 storage nodes, R=1) in the scratch dir for the 3FS run")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="runs per engine (median reported; engines alternate, so they share the machine's load)")
    p.add_argument("--skip", nargs="*", default=[], choices=["readme", "graysort", "pandas", "smallpond"], help="leave parts out")


def _run_script(python: str, script: str, args: list[str], timeout: float = 3600) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    result = json.loads(line)
    result["wall"] = wall
    return result


def _smallpond_python(args) -> tuple[str | None, str]:
    py = os.path.join(args.smallpond_venv, "bin", "python")
    if not os.path.exists(py) and args.install_smallpond:
        subprocess.run([sys.executable, "-m", "venv", args.smallpond_venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "smallpond==0.15.0", "duckdb==1.2.2", "numpy<2", "pandas<2.3"],
                       check=True, timeout=1800)
    if not os.path.exists(py):
        return None, f"not measured: no venv at {args.smallpond_venv} (pass --install-smallpond)"
    check = subprocess.run([py, "-c", "import smallpond, duckdb; print(duckdb.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"not measured: smallpond does not import in {args.smallpond_venv}: {check.stderr.strip()[-300:]}"
    return py, f"smallpond 0.15 with duckdb {check.stdout.strip()}"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_of(jobs: dict, repeat: int) -> dict:
    """Run each job ``repeat`` times, alternating between jobs; the median seconds of each."""
    import statistics

    times: dict = {name: [] for name in jobs}
    for _ in range(max(1, repeat)):
        for name, fn in jobs.items():
            times[name].append(fn())
    return {name: statistics.median(v) for name, v in times.items()}


def _readme(args, work: str, sp_python: str | None) -> tuple[list[dict], dict]:
    import duckdb
    import numpy as np
    import pandas as pd

    prices = os.path.join(work, "prices.parquet")
    rng = np.random.default_rng(0)
    tickers = np.array([f"T{i:03d}" for i in range(100)])
    pd.DataFrame({"ticker": tickers[rng.integers(0, 100, args.readme_rows)],
                  "price": rng.random(args.readme_rows) * 100}).to_parquet(prices)
    workers = f", num_executors={args.workers}" if args.workers else ""
    q = f"COPY (SELECT ticker, min(price), max(price) FROM read_parquet('{prices}') GROUP BY ticker) TO '{work}/readme-duckdb.parquet'"

    def run_pandas():
        df = pd.read_parquet(prices)
        df.groupby("ticker")["price"].agg(["min", "max"]).reset_index().to_parquet(f"{work}/readme-pandas.parquet")

    jobs = {
        "openinfra.smallpond": lambda: _run_script(
            sys.executable, _README.format(import_line="from openinfra import smallpond", extra=workers),
            [prices, os.path.join(work, "root-readme"), os.path.join(work, "out-readme")])["seconds"],
        "duckdb (one query)": lambda: _time(lambda: duckdb.connect().execute(q)),
    }
    if "pandas" not in args.skip:
        jobs["pandas"] = lambda: _time(run_pandas)
    if sp_python and "smallpond" not in args.skip:
        jobs["smallpond 0.15"] = lambda: _run_script(
            sp_python, _README.format(import_line="import smallpond", extra=""),
            [prices, os.path.join(work, "root-readme-sp"), os.path.join(work, "out-readme-sp")])["seconds"]
    t = _median_of(jobs, args.repeat)
    ours = t["openinfra.smallpond"]
    rows = [{"job": "readme", "engine": name, "seconds": sec, "x ours": sec / ours} for name, sec in t.items()]
    summary = {"readme_ours_s": ours, "repeat": args.repeat}
    if "smallpond 0.15" in t:
        summary["readme_smallpond_s"] = t["smallpond 0.15"]
        summary["readme_ours_over_smallpond"] = ours / t["smallpond 0.15"]
        summary["readme_goal"] = "<= 0.25"
    return rows, summary


def _graysort(args, work: str, sp_python: str | None) -> tuple[list[dict], dict]:
    import duckdb

    from openinfra.smallpond import graysort

    records = max(1000, int(args.gib * 2**30 / graysort.RECORD_BYTES))
    cpus = os.cpu_count() or 1
    nfiles = max(2, min(64, cpus * 2, records // 50_000 or 1))
    nparts = args.partitions or max(2, 2 * cpus)
    indir = os.path.join(work, "gs-input")
    graysort.generate(indir, records, nfiles, seed=42)
    inputs = sorted(os.path.join(indir, f) for f in os.listdir(indir))
    n_in, sum_in = graysort.checksum(inputs)
    gib = records * graysort.RECORD_BYTES / 2**30
    workers = f", num_executors={args.workers}" if args.workers else ""
    gs_args = lambda tag: [indir, os.path.join(work, f"root-{tag}"), os.path.join(work, f"out-{tag}"), str(nparts), str(nfiles)]  # noqa: E731
    files = "[" + ", ".join(f"'{p}'" for p in inputs) + "]"
    q = f"COPY (SELECT * FROM read_parquet({files}) ORDER BY key) TO '{work}/gs-duckdb.parquet' (FORMAT parquet)"

    def run_pandas():
        import pandas as pd

        pd.read_parquet(indir).sort_values("key").to_parquet(f"{work}/gs-pandas.parquet")

    def run_ours():
        import shutil

        shutil.rmtree(os.path.join(work, "out-ours"), ignore_errors=True)
        return _run_script(sys.executable, _GRAYSORT.format(import_line="from openinfra import smallpond", extra=workers),
                           gs_args("ours"))["seconds"]

    jobs = {"openinfra.smallpond": run_ours, "duckdb COPY ORDER BY": lambda: _time(lambda: duckdb.connect().execute(q))}
    if "pandas" not in args.skip and gib <= 1.0:
        jobs["pandas sort_values"] = lambda: _time(run_pandas)
    if sp_python and "smallpond" not in args.skip:
        def run_theirs():
            import shutil

            shutil.rmtree(os.path.join(work, "out-sp"), ignore_errors=True)
            return _run_script(sp_python, _GRAYSORT.format(import_line="import smallpond", extra=""), gs_args("sp"))["seconds"]
        jobs["smallpond 0.15"] = run_theirs
    t = _median_of(jobs, args.repeat)
    ours = t["openinfra.smallpond"]
    check = graysort.validate(os.path.join(work, "out-ours"))
    valid = check.ok and (check.records, check.checksum) == (n_in, sum_in)
    base = {"job": f"graysort {gib:.3f} GiB"}
    rows = [{**base, "engine": name, "seconds": sec, "x ours": sec / ours, "GiB/min": gib * 60 / sec,
             **({"valid": valid} if name == "openinfra.smallpond" else {})} for name, sec in t.items()]
    summary = {"graysort_gib": gib, "graysort_records": records, "graysort_partitions": nparts,
               "graysort_ours_s": ours, "graysort_valid": valid, "repeat": args.repeat,
               "graysort_duckdb_s": t["duckdb COPY ORDER BY"],
               "graysort_ours_over_duckdb": ours / t["duckdb COPY ORDER BY"], "graysort_goal_vs_duckdb": "<= 1.5"}
    if "smallpond 0.15" in t:
        summary["graysort_smallpond_s"] = t["smallpond 0.15"]
        summary["graysort_ours_over_smallpond"] = ours / t["smallpond 0.15"]
        summary["graysort_goal_vs_smallpond"] = "<= 0.5"
    if args.fs_url:
        url = args.fs_url.rstrip("/")
        try:
            remote = _run_script(sys.executable, _GRAYSORT.format(import_line="from openinfra import smallpond", extra=workers),
                                 [indir, f"{url}/bench-root", f"{url}/bench-out", str(nparts), str(nfiles)])
        except RuntimeError as exc:  # keep the other engines' numbers when the cluster fails
            summary["graysort_3fs_error"] = str(exc).strip().splitlines()[-1][:300]
            return rows, summary
        rows.append({**base, "engine": "openinfra.smallpond on 3FS", "seconds": remote["seconds"],
                     "x ours": remote["seconds"] / ours, "GiB/min": gib * 60 / remote["seconds"]})
        summary["graysort_3fs_over_local"] = remote["seconds"] / ours
        summary["graysort_goal_3fs_vs_local"] = "<= 1.5"
    return rows, summary


@routine("smallpond", "smallpond: README example and GraySort vs smallpond 0.15, DuckDB and pandas", _add_arguments)
def bench_smallpond(args: argparse.Namespace) -> BenchResult:
    import shutil

    work = tempfile.mkdtemp(prefix="bench-smallpond-", dir=args.workdir)
    rows: list[dict] = []
    summary: dict = {"cpus": os.cpu_count()}
    cluster = None
    try:
        if args.start_3fs and not args.fs_url:
            from openinfra.fs import ClusterSpec, LocalCluster

            cluster = LocalCluster.start(ClusterSpec(os.path.join(work, "3fs"), storage_nodes=2, replication=1,
                                                     stripe=2, chunk_size=4 << 20, fsync=False), timeout=120)
            os.environ["OPENINFRA_FS_MGMTD"] = cluster.address  # the job subprocesses inherit it
            args.fs_url = "3fs:///bench"
            summary["3fs"] = "embedded cluster: 2 storage nodes, replication 1, on the same disk"
        sp_python, note = (None, "skipped") if "smallpond" in args.skip else _smallpond_python(args)
        summary["smallpond_peer"] = note
        if "readme" not in args.skip:
            r, s = _readme(args, work, sp_python)
            rows += r
            summary.update(s)
        if "graysort" not in args.skip:
            r, s = _graysort(args, work, sp_python)
            rows += r
            summary.update(s)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return BenchResult(rows, summary)
