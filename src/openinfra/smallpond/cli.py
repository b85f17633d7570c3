"""``openinfra data ...``: run smallpond jobs from the shell.

    openinfra data sql "select k, count(*) from {0} group by k" -i 'logs/*.parquet' --hash-by k -n 8 -o out/
    openinfra data graysort --records 1000000 --partitions 8
    openinfra data corpus --output shards/ [--quick]
    openinfra data explain "select ..." -i 'in/*.parquet' --png plan.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from openinfra.cli import not_a_directory

__all__ = ["register"]


def _session_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("session (each falls back to its SP_* environment variable)")
    g.add_argument("--data-root", help="intermediate data (SP_DATA_ROOT); any path or 3fs://...")
    g.add_argument("--job-id", help="job id; the same id resumes a killed job (SP_JOBID)")
    g.add_argument("--num-executors", type=int, help="parallel tasks (SP_NUM_EXECUTORS)")
    g.add_argument("--executor", choices=["local", "ray"], help="local process pool or Ray (SP_EXECUTOR)")
    g.add_argument("--ray-address", help="Ray cluster address (RAY_ADDRESS)")
    g.add_argument("--max-retries", type=int, help="retries per task (SP_MAX_RETRIES)")
    g.add_argument("--fault-inject-prob", type=float, help="fail tasks at random, for testing (SP_FAULT_INJECT_PROB)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (SP_PROGRESS)")


def _session(args: argparse.Namespace):
    from openinfra import smallpond

    return smallpond.init(job_id=args.job_id, data_root=args.data_root, num_executors=args.num_executors,
                          ray_address=args.ray_address, executor=args.executor, max_retries=args.max_retries,
                          fault_inject_prob=args.fault_inject_prob, progress=args.progress)


def _fail(message: str) -> int:
    print(f"openinfra data: {message}", file=sys.stderr)
    return 2


def _check_data_root(args: argparse.Namespace) -> str | None:
    return not_a_directory("--data-root", args.data_root)


def _one_line(exc: BaseException) -> str:
    """A job error as one line: an SQL error's text joined, a failed task's first line (its worker
    traceback follows it), an OSError with the path it names."""
    from openinfra.smallpond import SqlError

    if isinstance(exc, SqlError):
        return " ".join(str(exc).split())
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_sql_args(args: argparse.Namespace) -> str | None:
    if problem := _check_data_root(args):
        return problem
    if args.npartitions < 1:
        return f"-n/--npartitions: expected a positive number of partitions, got {args.npartitions}"
    return None


def _build_sql(sp, args):
    inputs = []
    for pattern in args.input:
        df = sp.read_parquet(pattern)
        if args.hash_by:
            df = df.repartition(args.npartitions, hash_by=args.hash_by)
        elif args.npartitions > 1:
            df = df.repartition(args.npartitions)
        inputs.append(df)
    return sp.partial_sql(args.query, *inputs)


def _sql(args: argparse.Namespace) -> int:
    from openinfra.smallpond import SqlError, TaskFailed

    if problem := _check_sql_args(args):
        return _fail(problem)
    if args.show < 0:  # pandas' head(-1) would print every row but the last
        return _fail(f"--show: expected a number of rows >= 0, got {args.show}")
    try:
        with _session(args) as sp:
            df = _build_sql(sp, args)
            if args.output:
                df.write_parquet(args.output)
                print(f"wrote {df.count()} rows to {args.output} ({sp.stats.executed} tasks, {sp.stats.skipped} skipped)")
            else:
                print(df.to_pandas().head(args.show).to_string(index=False))
    except (ValueError, TypeError, OSError, SqlError, TaskFailed) as exc:
        return _fail(_one_line(exc))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from openinfra.cli import picture_path
    from openinfra.smallpond import SqlError, TaskFailed

    if problem := _check_sql_args(args):
        return _fail(problem)
    try:
        png = picture_path("--png", args.png) if args.png else None
        with _session(args) as sp:
            df = _build_sql(sp, args)
            print(df.explain())
            if png:
                try:
                    df.plot(png)
                except (ValueError, OSError) as exc:  # not an image suffix, a missing directory
                    return _fail(f"--png {png}: {_one_line(exc)}")
                print(f"plan picture: {png}")
    except (ValueError, TypeError, OSError, SqlError, TaskFailed) as exc:
        return _fail(_one_line(exc))
    return 0


def _graysort(args: argparse.Namespace) -> int:
    from openinfra.smallpond import SqlError, TaskFailed, graysort

    for flag, value in (("--records", args.records), ("--partitions", args.partitions), ("--files", args.files)):
        if value < 1:
            return _fail(f"{flag}: expected a positive number, got {value}")
    if problem := not_a_directory("--workdir", args.workdir) or _check_data_root(args):
        return _fail(problem)
    work = args.workdir or tempfile.mkdtemp(prefix="graysort-")
    try:
        inputs = graysort.generate(os.path.join(work, "input"), args.records, args.files, seed=args.seed)
        n_in, sum_in = graysort.checksum(inputs)
        t0 = time.perf_counter()
        with _session(args) as sp:
            graysort.graysort(sp, inputs, os.path.join(work, "output"), args.partitions, input_partitions=args.files)
        seconds = time.perf_counter() - t0
        check = graysort.validate(os.path.join(work, "output"))
    except (ValueError, TypeError, OSError, SqlError, TaskFailed) as exc:
        return _fail(_one_line(exc))
    ok = check.ok and (check.records, check.checksum) == (n_in, sum_in)
    gib = args.records * graysort.RECORD_BYTES / 2**30
    print(f"sorted {check.records} records ({gib:.3f} GiB) into {check.files} files in {seconds:.2f} s "
          f"({gib * 60 / seconds:.2f} GiB/min); order {'ok' if check.unordered_pairs == check.boundary_violations == 0 else 'BAD'}, "
          f"count {'ok' if check.records == n_in else 'BAD'}, checksum {'ok' if check.checksum == sum_in else 'BAD'}")
    print(f"data in {work}")
    return 0 if ok else 1


def _corpus(args: argparse.Namespace) -> int:
    from openinfra.smallpond import SqlError, TaskFailed
    from openinfra.smallpond.corpus import build_shards, stdlib_files

    if os.path.isfile(args.output):
        return _fail(f"--output {args.output}: is a file; the shards need a directory")
    if problem := _check_data_root(args):
        return _fail(problem)

    if args.source:
        files = sorted(os.path.join(d, f) for src in args.source for d, _, fs in os.walk(src) for f in fs if f.endswith(args.suffix))
        if not files:
            return _fail(f"no *{args.suffix} files under {args.source}")
    else:
        files = stdlib_files(limit=300 if args.quick else None)
    try:
        with _session(args) as sp:
            r = build_shards(sp, files, args.output, seq_len=args.seq_len, npartitions=args.npartitions)
    except (ValueError, TypeError, OSError, SqlError, TaskFailed) as exc:
        return _fail(_one_line(exc))
    print(f"{r.files} files ({r.input_bytes / 1e6:.1f} MB) -> {r.unique_docs} unique documents ({r.duplicates} duplicates) "
          f"-> {r.sequences} sequences of {args.seq_len} tokens in {len(r.shards)} shards at {r.output} ({r.seconds:.1f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="smallpond: DuckDB data processing (sql, graysort, corpus, explain)",
                              description="Run smallpond jobs: partitioned SQL, GraySort, the demo's corpus pipeline.")
    sub = p.add_subparsers(title="data commands", metavar="COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    for name, fn, helptext in (("sql", _sql, "run a SQL query on each partition of parquet inputs"),
                               ("explain", _explain, "show (and draw) the plan of a SQL job without running it")):
        q = sub.add_parser(name, help=helptext, description=helptext + "; {0}, {1}... name the inputs.")
        q.add_argument("query", help="DuckDB SQL with {0}, {1}, ... for the inputs")
        q.add_argument("-i", "--input", action="append", default=[], help="parquet files/glob/dir (repeat for {1}, ...)")
        q.add_argument("-n", "--npartitions", type=int, default=1, help="partitions per input")
        q.add_argument("--hash-by", help="hash-partition every input by this column (co-partitioned joins)")
        if name == "sql":
            q.add_argument("-o", "--output", help="write parquet files here (default: print rows)")
            q.add_argument("--show", type=int, default=20, help="rows to print without --output")
        else:
            q.add_argument("--png", help="draw the optimized plan here")
        _session_args(q)
        q.set_defaults(func=fn)

    g = sub.add_parser("graysort", help="generate, sort and validate GraySort records",
                       description="GraySort scaled down: 100-byte records, 10-byte keys, fixed seed; checks order, count, checksum.")
    g.add_argument("--records", type=int, default=1_000_000, help="number of 100-byte records")
    g.add_argument("--partitions", type=int, default=8, help="output partitions")
    g.add_argument("--files", type=int, default=8, help="input files (= shuffle producers)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workdir", help="where input and output go (default: a new temp dir)")
    _session_args(g)
    g.set_defaults(func=_graysort)

    c = sub.add_parser("corpus", help="source files -> tokenized, deduplicated, shuffled shards",
                       description="The demo's data pipeline (byte-level tokens, exact dedup, global shuffle).")
    c.add_argument("--output", required=True, help="shard directory (any path or 3fs://...)")
    c.add_argument("--source", nargs="*", help="directories to read (default: the Python standard library)")
    c.add_argument("--suffix", default=".py", help="file suffix to read from --source")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--npartitions", type=int, default=8)
    c.add_argument("--quick", action="store_true", help="only the first 300 standard-library files")
    _session_args(c)
    c.set_defaults(func=_corpus)
