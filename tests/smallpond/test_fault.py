"""Fault tolerance: random task failures (p=0.1) give the fault-free output; a killed worker is
retried; a re-run after killing the whole job skips the tasks that finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra import smallpond

pytestmark = pytest.mark.service


def _pipeline(sp):
    # In-memory source: task keys depend only on content, so the fault draws are reproducible.
    table = pa.table({"id": list(range(2000)), "g": [i % 13 for i in range(2000)]})
    df = sp.from_arrow(table).repartition(6, by_rows=True)
    df = df.repartition(5, hash_by="g")
    df = df.map(lambda r: {"id": r["id"], "g": r["g"], "sq": r["id"] * r["id"] % 1009})
    df = sp.partial_sql("select g, count(*) as n, sum(sq) as s, min(id) as lo from {0} group by g", df)
    return df


def assert_faults_give_the_clean_result(tmp_path, expect_executor: str | None = None, **init) -> None:
    """``_pipeline`` with faults injected (p = 0.1, up to 10 retries) gives the fault-free run's rows
    and task count, and some task was retried. ``init``: ``smallpond.init``'s executor options."""
    with smallpond.init(data_root=str(tmp_path / "a"), **init) as sp:
        expected = sorted(map(tuple, (r.values() for r in _pipeline(sp).take_all())))
        clean_tasks = sp.stats.executed
    with smallpond.init(data_root=str(tmp_path / "b"), fault_inject_prob=0.1, max_retries=10, **init) as sp:
        if expect_executor is not None:
            assert sp._get_executor().name == expect_executor
        got = sorted(map(tuple, (r.values() for r in _pipeline(sp).take_all())))
        stats = sp.stats
    assert got == expected
    assert len(expected) == 13
    assert stats.executed == clean_tasks
    assert stats.retried >= 1, f"p=0.1 over {clean_tasks} tasks should have injected faults: {stats}"


def test_fault_injection_gives_the_fault_free_result(tmp_path):
    assert_faults_give_the_clean_result(tmp_path, num_executors=2)


def test_fault_injection_without_retries_fails_clearly(tmp_path):
    with pytest.raises(smallpond.TaskFailed, match="injected"):
        with smallpond.init(data_root=str(tmp_path), num_executors=2, fault_inject_prob=0.5, max_retries=0) as sp:
            _pipeline(sp).count()


def test_killed_worker_is_retried(tmp_path):
    marker = tmp_path / "killed-once"

    def die_once(row):
        if row["item"] == 7 and not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task
        return {"x": row["item"] + 1}

    with smallpond.init(data_root=str(tmp_path / "root"), num_executors=2) as sp:
        df = sp.from_items(list(range(20))).repartition(4, by_rows=True).map(die_once)
        assert sorted(r["x"] for r in df.take_all()) == list(range(1, 21))
        assert sp.stats.retried == 1
    assert marker.exists()


_JOB = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from openinfra import smallpond

    def slow(batch):
        time.sleep(float(sys.argv[3]))
        return batch.append_column("y", pa.compute.multiply(batch.column("item"), 3))

    sp = smallpond.init(job_id="resumable", data_root=sys.argv[1], num_executors=2, remove_output_root=False)
    df = sp.from_items(list(range(80))).repartition(8, by_rows=True).map_batches(slow)
    df.write_parquet(sys.argv[2])
    print("EXECUTED", sp.stats.executed, "SKIPPED", sp.stats.skipped)
""")


def test_rerun_after_kill_skips_finished_tasks(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    root, out = tmp_path / "root", tmp_path / "out"
    tasks_dir = root / "resumable" / "tasks"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), "0.4"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    finished: list[str] = []
    while time.monotonic() < deadline:
        finished = [d for d in os.listdir(tasks_dir) if d.startswith("arrow_batch-")] if tasks_dir.exists() else []
        if len(finished) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-job
    proc.wait(30)
    assert 3 <= len(finished) < 8, f"expected the job to be killed part-way, saw {finished}"
    done_before = set(d for d in os.listdir(tasks_dir) if not d.startswith("."))

    rerun = subprocess.run([sys.executable, str(script), str(root), str(out), "0"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    words = rerun.stdout.split()
    executed, skipped = int(words[words.index("EXECUTED") + 1]), int(words[words.index("SKIPPED") + 1])
    assert skipped >= len([d for d in done_before if d.startswith("arrow_batch-")])
    total_map_tasks = 8
    assert executed < 1 + 8 + total_map_tasks + 1, "finished tasks must not run again"
    got = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    assert sorted(got.column("y").to_pylist()) == [3 * i for i in range(80)]
