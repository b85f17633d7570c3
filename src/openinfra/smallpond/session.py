"""``smallpond.init(...)`` and the ``Session``: settings, the executor, the job's directory.

Every setting is a keyword argument with an environment-variable fallback (smallpond's names where
it had one). A job keeps its intermediate data under ``<data_root>/<job_id>/tasks/<task key>/``;
re-running the same pipeline with the same ``job_id`` skips every task already committed there.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from openinfra.smallpond import storage
from openinfra.smallpond.dataset import (
    ArrowTableDataSet, CsvDataSet, DataSet, JsonDataSet, PandasDataSet, ParquetDataSet,
)
from openinfra.smallpond.executor import JobStats, LocalExecutor, RayExecutor, Scheduler
from openinfra.smallpond.node import Context, DataSourceNode, SqlEngineNode
from openinfra.smallpond.task import Task

__all__ = ["init", "Session", "SessionConfig"]


def _env(name: str, default: Any, cast=str) -> Any:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not a valid {cast.__name__}") from exc


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


@dataclass
class SessionConfig:
    """Resolved settings of a session (argument, else environment variable, else default).

    | setting | environment | default |
    |---|---|---|
    | job_id | SP_JOBID | a new random id (pass the same id to resume a job) |
    | job_name | SP_JOB_NAME | "smallpond" |
    | data_root | SP_DATA_ROOT | ``$TMPDIR/smallpond`` (any path, or ``3fs://...``) |
    | num_executors | SP_NUM_EXECUTORS | CPU count |
    | executor | SP_EXECUTOR | "ray" when ray_address is set, else "local" |
    | ray_address | RAY_ADDRESS | None (a local Ray on 127.0.0.1 when executor="ray") |
    | max_retries | SP_MAX_RETRIES | 3 |
    | fault_inject_prob | SP_FAULT_INJECT_PROB | 0.0 |
    | task_threads | SP_TASK_THREADS | max(1, CPUs // num_executors) DuckDB threads per task |
    | progress | SP_PROGRESS | on when stderr is a terminal |
    | remove_output_root | SP_REMOVE_OUTPUT_ROOT | True: shutdown() deletes the job's intermediate data after success |
    """

    job_id: str
    job_name: str
    data_root: str
    num_executors: int
    executor: str
    ray_address: str | None
    max_retries: int
    fault_inject_prob: float
    task_threads: int
    progress: bool
    remove_output_root: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, job_id=None, job_time=None, job_name=None, data_root=None, num_executors=None,
                  ray_address=None, bind_numa_node=None, platform=None, executor=None, max_retries=None,
                  fault_inject_prob=None, task_threads=None, progress=None, _remove_output_root=None,
                  remove_output_root=None) -> "SessionConfig":
        cpus = os.cpu_count() or 1
        job_id = job_id or _env("SP_JOBID", None) or uuid.uuid4().hex[:12]
        if not isinstance(job_id, str) or not job_id or "/" in job_id:
            raise ValueError(f"job_id must be a non-empty string without '/', got {job_id!r}")
        data_root = data_root or _env("SP_DATA_ROOT", None) or os.path.join(tempfile.gettempdir(), "smallpond")
        if not storage.is_remote(data_root):
            data_root = os.path.abspath(data_root)
        num_executors = num_executors if num_executors is not None else _env("SP_NUM_EXECUTORS", cpus, int)
        if isinstance(num_executors, bool) or not isinstance(num_executors, int) or num_executors < 1:
            raise ValueError(f"num_executors must be a positive int, got {num_executors!r}")
        ray_address = ray_address or _env("RAY_ADDRESS", None)
        executor = executor or _env("SP_EXECUTOR", "ray" if ray_address else "local")
        if executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
        max_retries = max_retries if max_retries is not None else _env("SP_MAX_RETRIES", 3, int)
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {max_retries!r}")
        fip = fault_inject_prob if fault_inject_prob is not None else _env("SP_FAULT_INJECT_PROB", 0.0, float)
        if not 0.0 <= float(fip) < 1.0:
            raise ValueError(f"fault_inject_prob must be in [0, 1), got {fip!r}")
        threads = task_threads if task_threads is not None else _env("SP_TASK_THREADS", max(1, cpus // num_executors), int)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"task_threads must be a positive int, got {threads!r}")
        progress = progress if progress is not None else _env("SP_PROGRESS", sys.stderr.isatty(), _bool)
        remove = remove_output_root if remove_output_root is not None else _remove_output_root
        remove = remove if remove is not None else _env("SP_REMOVE_OUTPUT_ROOT", True, _bool)
        extra = {k: v for k, v in (("job_time", job_time), ("bind_numa_node", bind_numa_node), ("platform", platform)) if v is not None}
        return cls(job_id, job_name or _env("SP_JOB_NAME", "smallpond"), data_root, num_executors, executor,
                   ray_address, max_retries, float(fip), threads, bool(progress), bool(remove), extra)


class Session:
    """Creates DataFrames and runs their tasks. Use ``smallpond.init(...)`` to make one."""

    def __init__(self, **kwargs) -> None:
        self.config = SessionConfig.from_args(**kwargs)
        self._ctx = Context()
        self._results: dict[str, DataSet] = {}
        self._computed: dict = {}  # computed plan node -> the optimized node it ran as
        self._executor = None
        self._failed = False
        self._closed = False
        self.stats = JobStats()
        storage.makedirs(self.job_root)

    @property
    def job_root(self) -> str:
        return storage.join(self.config.data_root, self.config.job_id)

    # --- sources ---------------------------------------------------------------------------------

    def _df(self, dataset: DataSet):
        from openinfra.smallpond.dataframe import DataFrame

        return DataFrame(self, DataSourceNode(self._ctx, dataset))

    def read_parquet(self, paths: str | list[str], recursive: bool = False, columns: list[str] | None = None,
                     union_by_name: bool = False):
        """A DataFrame over parquet files (globs and directories allowed); one partition."""
        ds = ParquetDataSet(paths, columns=columns, union_by_name=union_by_name, recursive=recursive)
        ds.resolved_paths  # noqa: B018 -- fail now, naming the pattern, if nothing matches
        return self._df(ds)

    def read_csv(self, paths: str | list[str], schema: dict[str, str], delim: str = ",", header: bool = False):
        """A DataFrame over CSV files with the given ``{column: DuckDB type}`` schema."""
        ds = CsvDataSet(paths, schema, delim, header)
        ds.resolved_paths  # noqa: B018
        return self._df(ds)

    def read_json(self, paths: str | list[str], schema: dict[str, str]):
        """A DataFrame over newline-delimited JSON files with the given schema."""
        ds = JsonDataSet(paths, schema)
        ds.resolved_paths  # noqa: B018
        return self._df(ds)

    def from_items(self, items: list[Any]):
        """A DataFrame from Python values (column ``item``) or dicts (one column per key)."""
        if not isinstance(items, list):
            raise TypeError(f"items must be a list, got {type(items).__name__}")
        if not items:
            raise ValueError("items must not be empty")
        if isinstance(items[0], dict):
            return self.from_arrow(pa.Table.from_pylist(items))
        return self.from_arrow(pa.table({"item": items}))

    def from_pandas(self, df):
        """A DataFrame from a pandas DataFrame."""
        return self._df(PandasDataSet(df))

    def from_arrow(self, table: pa.Table):
        """A DataFrame from a pyarrow Table."""
        return self._df(ArrowTableDataSet(table))

    def partial_sql(self, query: str, *inputs, **kwargs):
        """Run ``query`` on each partition of the inputs (``{0}``, ``{1}``...; same partition counts)."""
        from openinfra.smallpond.dataframe import DataFrame

        for i, df in enumerate(inputs):
            if not isinstance(df, DataFrame):
                raise TypeError(f"partial_sql input {{{i}}} must be a DataFrame, got {type(df).__name__}")
        node = SqlEngineNode(self._ctx, tuple(df.plan for df in inputs), query, **kwargs)
        return DataFrame(self, node, recompute=any(df.need_recompute for df in inputs))

    # --- execution -------------------------------------------------------------------------------

    def _get_executor(self):
        if self._executor is None:
            if self.config.executor == "ray":
                self._executor = RayExecutor(self.config.ray_address, self.config.num_executors)
            else:
                self._executor = LocalExecutor(self.config.num_executors)
        return self._executor

    def _run(self, tasks: list[Task], description: str = "smallpond") -> list[DataSet]:
        if self._closed:
            raise RuntimeError("this session was shut down; call smallpond.init() for a new one")
        cfg = self.config
        sched = Scheduler(self._get_executor(), self.job_root, cfg.job_id, cfg.task_threads, cfg.max_retries,
                          cfg.fault_inject_prob, cfg.progress, self._results)
        try:
            return sched.run(tasks, description)
        except BaseException:
            self._failed = True
            raise
        finally:
            s = sched.stats
            self.stats.executed += s.executed
            self.stats.skipped += s.skipped
            self.stats.retried += s.retried
            self.stats.virtual += s.virtual
            self.stats.seconds += s.seconds
            self.stats.executed_keys += s.executed_keys

    def wait(self, *dfs) -> None:
        """Compute several DataFrames (e.g. several ``write_parquet_lazy`` outputs) in one run."""
        from openinfra.smallpond.planner import Planner

        planner = Planner()
        tasks = [t for df in dfs for t in planner.visit(df._optimized())]
        self._run(tasks)
        for df in dfs:
            self._computed[df.plan] = df._optimized()

    def shutdown(self) -> None:
        """Stop the executor; after a successful job, delete its intermediate data (``remove_output_root``)."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown()
        if self.config.remove_output_root and not self._failed:
            if storage.is_remote(self.job_root):
                storage.remove(self.job_root)
            else:
                shutil.rmtree(self.job_root, ignore_errors=True)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._failed = True
        self.shutdown()


def init(job_id: str | None = None, job_time=None, job_name: str | None = None, data_root: str | None = None,
         num_executors: int | None = None, ray_address: str | None = None, bind_numa_node: bool | None = None,
         platform: str | None = None, **kwargs) -> Session:
    """Start a session (smallpond's signature). Extra settings: ``executor``, ``max_retries``,
    ``fault_inject_prob``, ``task_threads``, ``progress``, ``remove_output_root``; see ``SessionConfig``."""
    return Session(job_id=job_id, job_time=job_time, job_name=job_name, data_root=data_root,
                   num_executors=num_executors, ray_address=ray_address, bind_numa_node=bind_numa_node,
                   platform=platform, **kwargs)
