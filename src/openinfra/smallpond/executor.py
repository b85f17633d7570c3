"""Running tasks: the scheduler (checkpoints, retries, progress) and two executors.

``LocalExecutor`` (the default) forks ``num_executors`` worker processes per run; they inherit the
run's tasks, so user code (lambdas, closures, local classes) needs no pickling, and a crashed or
killed worker takes down only its current task, which the scheduler retries. ``RayExecutor`` submits
each task as a Ray task to a running cluster (``ray_address``) or a local Ray on 127.0.0.1.

The scheduler walks the task graph: a task whose output directory is committed from an earlier run
is not run again (task-level checkpoint); virtual tasks are resolved in the driver; failed tasks are
retried up to ``max_retries`` times, except errors that a retry cannot fix (bad SQL, wrong types,
missing files), which stop the job at once with the cause.
"""

from __future__ import annotations

import copy
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from typing import Any, Callable

from openinfra.smallpond import storage
from openinfra.smallpond.dataset import DataSet, new_connection
from openinfra.smallpond.task import (
    INJECTED_EXIT_CODE, SqlError, Task, TaskFailed, dataset_from_manifest, describe_error, execute_task, load_checkpoint, resolve_virtual,
)

__all__ = ["LocalExecutor", "RayExecutor", "Scheduler", "JobStats"]


class JobStats:
    """Counts of one ``run``: tasks run, skipped (checkpointed or cached), retried; seconds."""

    def __init__(self) -> None:
        self.executed = 0
        self.skipped = 0
        self.retried = 0
        self.virtual = 0
        self.seconds = 0.0
        self.executed_keys: list[str] = []

    def __repr__(self) -> str:
        return (f"JobStats(executed={self.executed}, skipped={self.skipped}, retried={self.retried}, "
                f"virtual={self.virtual}, seconds={self.seconds:.2f})")


def _worker_main(table: dict[str, Task], conn) -> None:
    """A forked worker: run the tasks the driver names (by key, from the inherited table) until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        new_connection()  # open this worker's DuckDB database now, not inside the first task
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            key, inputs, attempt, cfg = msg
            try:
                reply = ("ok", execute_task(table[key], inputs, attempt, allow_exit=True, **cfg))
            except BaseException as exc:  # noqa: BLE001 -- everything goes back to the driver
                reply = ("err", describe_error(exc))
            try:
                conn.send(reply)
            except Exception as exc:  # e.g. an unpicklable manifest value
                conn.send(("err", {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "", "retryable": False}))
    finally:
        os._exit(0)  # skip atexit handlers and finalizers inherited from the driver


_WARM: list[bool] = []


def _warm_up() -> None:
    """Initialize Arrow's compute kernels once in the driver, so forked workers inherit them
    (the first ``take`` in a process costs ~0.2-1 s, which every worker would otherwise pay)."""
    if not _WARM:
        import pyarrow as pa

        pa.table({"a": [2, 1]}).take(pa.array([1, 0])).sort_by("a")
        _WARM.append(True)


class _Worker:
    def __init__(self, ctx, table: dict[str, Task]) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(table, child_conn), daemon=True)
        self.proc.start()
        child_conn.close()


class LocalExecutor:
    """A pool of forked worker processes on this machine, one pool per run.

    Workers are forked when a run starts (``begin``), so they inherit every task of the run: user
    code (lambdas, closures, local classes) needs no pickling; only task keys and file lists go
    through the pipes. Each worker keeps one DuckDB database open and gives every task its own
    connection on it. A worker that dies (killed, crashed) fails only its current task, which the
    scheduler retries on a freshly forked worker.
    """

    name = "local"

    def __init__(self, num_workers: int) -> None:
        if sys.platform == "win32":
            raise RuntimeError("the local executor forks workers and needs a POSIX system")
        self.capacity = max(1, int(num_workers))
        self._ctx = multiprocessing.get_context("fork")
        self._table: dict[str, Task] = {}
        self._idle: list[_Worker] = []
        self._busy: dict[Any, tuple[_Worker, Any]] = {}   # conn -> (worker, handle)

    def begin(self, table: dict[str, Task]) -> None:
        self.end()
        self._table = table
        _warm_up()

    def submit(self, handle: Any, task: Task, inputs: list[DataSet], attempt: int, cfg: dict) -> None:
        worker = self._idle.pop() if self._idle else _Worker(self._ctx, self._table)
        worker.conn.send((task.key, inputs, attempt, cfg))
        self._busy[worker.conn] = (worker, handle)

    def poll(self, timeout: float) -> list[tuple[Any, str, Any]]:
        if not self._busy:
            return []
        done = []
        for conn in multiprocessing.connection.wait(list(self._busy), timeout):
            worker, handle = self._busy.pop(conn)
            try:
                status, payload = conn.recv()
                self._idle.append(worker)
            except (EOFError, OSError):
                worker.proc.join(5)
                code = worker.proc.exitcode
                why = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                if code == INJECTED_EXIT_CODE:
                    why += ": an injected worker death (fault_inject_prob)"
                status, payload = "err", {"type": "WorkerDied", "message": f"worker process {worker.proc.pid} died ({why})",
                                          "traceback": "", "retryable": True}
                conn.close()
            done.append((handle, status, payload))
        return done

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests that kill one)."""
        return [w.proc.pid for w in self._idle] + [w.proc.pid for w, _ in self._busy.values()]

    def cancel_all(self) -> None:
        for worker, _ in list(self._busy.values()):
            worker.proc.kill()
            worker.proc.join(5)
            worker.conn.close()
        self._busy.clear()

    def end(self) -> None:
        """Stop the run's workers (idle ones exit when told; busy ones are killed)."""
        self.cancel_all()
        for worker in self._idle:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._idle:
            worker.proc.join(5)
            if worker.proc.is_alive():
                worker.proc.kill()
                worker.proc.join(5)
            worker.conn.close()
        self._idle.clear()
        self._table = {}

    def shutdown(self) -> None:
        self.end()


def _ray_body(task: Task, inputs: list[DataSet], attempt: int, cfg: dict):
    try:
        return ("ok", execute_task(task, inputs, attempt, **cfg))
    except BaseException as exc:  # noqa: BLE001
        return ("err", describe_error(exc))


class RayExecutor:
    """Tasks as Ray tasks (Ray's own retries off: the scheduler retries, with the same checkpoints)."""

    name = "ray"

    def __init__(self, address: str | None, num_cpus: int | None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("the Ray executor needs `pip install ray` (or use the local executor)") from exc
        self._ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            else:
                # Loopback only: Ray would otherwise advertise the machine's network address.
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         ignore_reinit_error=True, log_to_driver=False)
        self.capacity = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(max_retries=0)(_ray_body)
        self._running: dict[Any, Any] = {}

    def begin(self, table: dict[str, Task]) -> None:
        """Nothing to prepare: Ray pickles each task (with cloudpickle) when it is submitted."""

    def end(self) -> None:
        self.cancel_all()

    def submit(self, handle: Any, task: Task, inputs: list[DataSet], attempt: int, cfg: dict) -> None:
        cpus = max(1, int(getattr(task.node, "cpu_limit", 1) or 1))
        ref = self._remote.options(num_cpus=min(cpus, self.capacity)).remote(task, inputs, attempt, cfg)
        self._running[ref] = handle

    def poll(self, timeout: float) -> list[tuple[Any, str, Any]]:
        if not self._running:
            return []
        ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            handle = self._running.pop(ref)
            try:
                status, payload = self._ray.get(ref)
            except Exception as exc:  # the worker died: Ray raises instead of returning
                status, payload = "err", {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "", "retryable": True}
            done.append((handle, status, payload))
        return done

    def cancel_all(self) -> None:
        for ref in list(self._running):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:
                pass
        self._running.clear()

    def shutdown(self) -> None:
        self.cancel_all()


class _Progress:
    """A rich progress bar over the tasks of a run, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self._bar = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), transient=False)
            self._bar.start()
            self._id = self._bar.add_task(description, total=total, note="")

    def advance(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._id, advance=1, note=note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Scheduler:
    """Runs a task graph to completion on an executor; results are kept in ``results`` by task key."""

    def __init__(self, executor, job_root: str, job_id: str, threads: int, max_retries: int = 3,
                 fault_inject_prob: float = 0.0, progress: bool = False,
                 results: dict[str, DataSet] | None = None,
                 on_task_done: Callable[[Task, dict], None] | None = None) -> None:
        self.executor = executor
        self.job_root = job_root
        self.cfg = {"job_root": job_root, "job_id": job_id, "threads": threads, "fault_prob": fault_inject_prob}
        self.max_retries = max_retries
        self.progress = progress
        self.results: dict[str, DataSet] = results if results is not None else {}
        self.on_task_done = on_task_done
        self.stats = JobStats()

    def _needed(self, targets: list[Task]) -> list[Task]:
        """Tasks to resolve, inputs first; stops at tasks whose output exists (cache or checkpoint)."""
        order: list[Task] = []
        seen: set[int] = set()
        stack: list[tuple[Task, bool]] = [(t, False) for t in reversed(targets)]
        while stack:
            task, expanded = stack.pop()
            if expanded:
                order.append(task)
                continue
            if id(task) in seen:
                continue
            seen.add(id(task))
            if task.key in self.results:
                continue
            if not task.virtual:
                ds = load_checkpoint(self.job_root, task.key)
                if ds is not None:
                    self.results[task.key] = ds
                    self.stats.skipped += 1
                    continue
            stack.append((task, True))
            stack.extend((d, False) for d in reversed(task.deps))
        return order

    def run(self, targets: list[Task], description: str = "smallpond") -> list[DataSet]:
        """Run everything ``targets`` need; returns their datasets in order."""
        t0 = time.perf_counter()
        storage.makedirs(storage.join(self.job_root, "tasks"))
        todo = self._needed(targets)
        pending = {id(t): t for t in todo}
        real_total = sum(not t.virtual for t in todo)
        bar = _Progress(self.progress, real_total, description)
        self.executor.begin({t.key: t for t in todo if not t.virtual})
        attempts: dict[str, int] = {}
        running: set[int] = set()
        try:
            while pending:
                progressed = False
                for tid, task in list(pending.items()):
                    if tid in running or any(d.key not in self.results for d in task.deps):
                        continue
                    inputs = [self.results[d.key] for d in task.deps]
                    if task.virtual:
                        self.results[task.key] = resolve_virtual(task, inputs, self.cfg["job_id"], self.cfg["threads"])
                        self.stats.virtual += 1
                        del pending[tid]
                        progressed = True
                    elif len(running) < self.executor.capacity:
                        self._submit(task, inputs, attempts)
                        running.add(tid)
                        progressed = True
                if progressed:
                    continue
                if not running:
                    missing = [t.label for t in pending.values()]
                    raise RuntimeError(f"scheduler stalled with tasks left: {missing[:5]}")
                for task, status, payload in self.executor.poll(timeout=1.0):
                    running.discard(id(task))
                    if status == "ok":
                        task_dir = storage.join(self.job_root, "tasks", task.key)
                        self.results[task.key] = dataset_from_manifest(task_dir, payload)
                        self.stats.executed += 1
                        self.stats.executed_keys.append(task.key)
                        del pending[id(task)]
                        bar.advance(task.label)
                        if self.on_task_done:
                            self.on_task_done(task, payload)
                    else:
                        self._failed(task, payload, attempts)
        except BaseException:
            self.executor.cancel_all()
            raise
        finally:
            self.executor.end()
            bar.close()
            self.stats.seconds += time.perf_counter() - t0
        return [self.results[t.key] for t in targets]

    def _submit(self, task: Task, inputs: list[DataSet], attempts: dict[str, int]) -> None:
        attempt = attempts.get(task.key, 0)
        attempts[task.key] = attempt + 1
        slim = copy.copy(task)
        slim.deps = []  # a worker needs its inputs' file lists, not the upstream graph
        self.executor.submit(task, slim, inputs, attempt, self.cfg)

    def _failed(self, task: Task, error: dict, attempts: dict[str, int]) -> None:
        # Drop what the failed attempt left behind; it is never trusted (only committed dirs are).
        tasks_dir = storage.join(self.job_root, "tasks")
        for name in storage.listdir(tasks_dir):
            if name.startswith(f".tmp-{task.key}-"):
                storage.remove(storage.join(tasks_dir, name))
        done = attempts.get(task.key, 1)
        if error.get("retryable", True) and done <= self.max_retries:
            self.stats.retried += 1
            return  # still pending and not running: the main loop resubmits it
        cause = error.get("message", "")
        etype = error.get("type", "Error")
        raise_cls = SqlError if etype == "SqlError" else TaskFailed
        tb = error.get("traceback", "")
        detail = f"\n--- worker traceback ---\n{tb}" if tb and etype not in ("SqlError",) else ""
        raise raise_cls(f"task {task.label} failed after {done} attempt(s): {etype}: {cause}{detail}")
