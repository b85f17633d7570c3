"""Bad command-line input gets a one-line error naming the problem and a non-zero exit: never a
traceback, a hang, a silent success or a wrong answer. Each case runs ``python -m openinfra`` as the
user would; none starts a cluster, a mount, training or a server that stays up."""

import json
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def run_cli(*args, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "openinfra", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_bad_input(out, *needles):
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


@pytest.fixture
def a_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hi\n")
    return p


# --- fs -----------------------------------------------------------------------------------------------


def test_fs_mount_with_a_data_dir_without_cluster(tmp_path):
    out = run_cli("fs", "mount", tmp_path, "--data-dir", tmp_path / "none")
    assert_bad_input(out, "no cluster in", "cluster.json")


def test_fs_mount_negative_size_is_refused_before_mounting(tmp_path):
    out = run_cli("fs", "mount", tmp_path / "none", "--mgmtd", "127.0.0.1:1", "--write-buffer", "-1")
    assert_bad_input(out, "--write-buffer", "-1")


@pytest.mark.parametrize("content, needle", [("{}", "missing 'spec'"), ('{"spec": {', "Expecting property name")])
def test_fs_status_with_a_broken_cluster_file(tmp_path, content, needle):
    (tmp_path / "cluster.json").write_text(content)
    out = run_cli("fs", "status", "--data-dir", tmp_path)
    assert_bad_input(out, "cluster.json is not a valid cluster file", needle)


def test_fs_admin_restart_of_an_unknown_service(tmp_path):
    # A cluster file whose services never ran (pid 0): nothing is signalled or spawned.
    (tmp_path / "cluster.json").write_text(json.dumps({
        "spec": {"data_dir": str(tmp_path), "storage_nodes": 1, "replication": 1},
        "services": {"mgmtd-1": {"role": "mgmtd", "pid": 0, "address": "127.0.0.1:1", "config": {}}}}))
    out = run_cli("fs", "admin", "restart", "storage-9", "--data-dir", tmp_path)
    assert_bad_input(out, "no service 'storage-9'", "mgmtd-1")


@pytest.mark.parametrize("flag, value", [("--chunk-size", "4K"), ("--chunk-size", "100K"), ("--stripe", "0")])
def test_fs_start_checks_the_layout_before_spawning(tmp_path, flag, value):
    out = run_cli("fs", "start", "--data-dir", tmp_path / "fs", flag, value)
    assert_bad_input(out, flag)
    assert not (tmp_path / "fs").exists()  # no process was started


def test_fs_negative_retry(tmp_path):
    out = run_cli("fs", "ls", "--mgmtd", "127.0.0.1:1", "--retry", "-5")
    assert_bad_input(out, "--retry", "-5")


# --- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["sql", "select 1", "-n", "0"], ["--npartitions", "0"]),
    (["explain", "select 1", "-n", "-2"], ["--npartitions", "-2"]),
    (["sql", "select 1", "--show", "-1"], ["--show", "-1"]),  # was: every row but the last
    (["graysort", "--records", "100", "--files", "0"], ["--files", "0"]),
])
def test_data_counts(args, needles):
    assert_bad_input(run_cli("data", *args), *needles)


@pytest.mark.parametrize("args", [["sql", "select 1"], ["graysort", "--records", "100"], ["corpus", "--output", "x", "--quick"]])
def test_data_root_that_is_a_file(tmp_path, a_file, args):
    out = run_cli("data", *args, "--data-root", a_file, cwd=tmp_path)
    assert_bad_input(out, "--data-root", "not a directory")


def test_data_graysort_workdir_that_is_a_file(a_file):
    assert_bad_input(run_cli("data", "graysort", "--records", "100", "--workdir", a_file), "--workdir", "not a directory")


def test_data_corpus_output_that_is_a_file(a_file):
    out = run_cli("data", "corpus", "--output", a_file, "--source", a_file.parent)
    assert_bad_input(out, "--output", "is a file")
    assert a_file.read_text() == "hi\n"


def test_data_explain_png_that_is_a_directory(tmp_path):
    out = run_cli("data", "explain", "select 1", "--png", tmp_path)
    assert_bad_input(out, "--png", "is a directory")
    assert not tmp_path.with_suffix(".png").exists()  # was: wrote DIR.png and said it wrote DIR


# --- eplb ---------------------------------------------------------------------------------------------


def _plan(tmp_path, *extra):
    loads = tmp_path / "loads.json"
    loads.write_text("[[1, 2, 3, 4], [4, 3, 2, 1]]")
    return run_cli("eplb", "plan", "--loads", loads, "--replicas", 8, "--groups", 2, "--nodes", 1, "--gpus", 4,
                   "--summary-only", *extra, cwd=tmp_path)


def test_eplb_layers_outside_the_loads(tmp_path):
    assert_bad_input(_plan(tmp_path, "--layers", 0, 7), "--layers 7", "2 layers")  # was: layer 7 silently left out


def test_eplb_png_that_is_a_directory(tmp_path):
    (tmp_path / "pics").mkdir()
    assert_bad_input(_plan(tmp_path, "--png", tmp_path / "pics"), "--png", "is a directory")
    assert not (tmp_path / "pics.png").exists()  # was: wrote pics.png and said it wrote pics


# --- profile ------------------------------------------------------------------------------------------


def test_profile_trace_with_malformed_events(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")  # a JSON array is a Chrome trace; its events must be objects
    assert_bad_input(run_cli("profile", "summary", bad), "bad.json", "not a valid trace")


def test_profile_pipeline_trace_without_fields(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [{"name": "a", "ph": "X", "ts": 0, "dur": 1, "pid": 0, "tid": 0}]}))
    assert_bad_input(run_cli("profile", "pipeline", trace), "t.json", "not a valid trace", "'cat'")


def test_profile_merge_out_is_a_directory(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": []}))
    assert_bad_input(run_cli("profile", "merge", trace, "--out", tmp_path), "--out", "is a directory")


# --- train (all refused before PyTorch is imported, except the shard contents) -----------------------


@pytest.mark.parametrize("args, needles", [
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--chunks", "-1"], ["--chunks", "-1"]),
    (["--resume"], ["--resume needs --checkpoint-dir"]),  # was: trained from scratch
    (["--device", "cuda"], ["--device cuda", "not wired"]),  # was: trained on the CPU
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--checkpoint-dir", "{file}"], ["--checkpoint-dir", "not a directory"]),
    (["--trace-dir", "{file}"], ["--trace-dir", "not a directory"]),
    (["--shards", "{dir}"], ["is a directory"]),
    (["--ep", "3", "--batch-size", "6"], ["ep=3", "n_routed_experts=8"]),
])
def test_train_flags(tmp_path, a_file, args, needles):
    args = [a.format(file=a_file, dir=tmp_path) for a in args]
    assert_bad_input(run_cli("train", *args, "--steps", 1), *needles)


def test_train_shard_that_is_not_tokens(tmp_path):
    np = pytest.importorskip("numpy")
    few = tmp_path / "few.npy"
    np.save(few, np.array([1, 2, 3]))
    out = run_cli("train", "--shards", few, "--steps", 1, "--seq-len", 16)
    assert_bad_input(out, "few.npy", "too few")


# --- serve --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--port", "99999"], ["--port", "99999"]),
    (["--port", "-1"], ["--port", "-1"]),
    (["--port", "0", "--duration", "-1"], ["--duration"]),  # was: served, stopped at once, exit 0
    (["--checkpoint", "{file}"], ["--checkpoint", "not a directory"]),
    (["--kvcache-mgmtd", "127.0.0.1:1"], ["--kvcache-mgmtd", "--disaggregated"]),  # was: ignored
    (["--disaggregated", "--kv-store-dir", "{file}"], ["--kv-store-dir", "not a directory"]),
])
def test_serve_flags(a_file, args, needles):
    args = [a.format(file=a_file) for a in args]
    if "--duration" not in args:  # should a check be lost, the server stops after a second
        args += ["--port", "0", "--duration", "1"] if "--port" not in args else ["--duration", "1"]
    assert_bad_input(run_cli("serve", *args), *needles)


def test_serve_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli("serve", "--port", port, "--duration", 1)
    assert_bad_input(out, f"cannot listen on 127.0.0.1:{port}", "in use")


# --- demo, bench --------------------------------------------------------------------------------------


def test_demo_data_dir_that_is_a_file(a_file):
    assert_bad_input(run_cli("demo", "--data-dir", a_file), "--data-dir", "not a directory")


def test_bench_routine_rejects_its_arguments():
    assert_bad_input(run_cli("bench", "model", "--configs", "bogus"), "openinfra bench model: error", "'bogus'")
