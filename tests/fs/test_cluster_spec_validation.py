"""``ClusterSpec`` refuses what the services would refuse (or misbehave on) when they start, with a
``ValueError`` naming the field and the value, before anything is spawned; ``LocalCluster.attach``
refuses a malformed ``cluster.json`` with a ``ValueError`` naming the file and the problem.
Pure unit tests: no cluster is started (``subprocess.Popen`` is replaced by a tripwire)."""

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from openinfra.fs import cluster as cluster_mod
from openinfra.fs.cluster import ClusterSpec, LocalCluster
from openinfra.fs.meta.service import MetaConfig
from openinfra.fs.meta.store import LayoutPolicy
from openinfra.fs.mgmtd.service import MgmtdConfig
from openinfra.fs.storage.service import StorageConfig

pytestmark = pytest.mark.unit


@pytest.fixture
def no_spawn(monkeypatch):
    """Any process start fails the test."""
    spawned = []

    def popen(*a, **kw):
        spawned.append(a)
        raise AssertionError(f"a process was spawned: {a}")

    monkeypatch.setattr(cluster_mod.subprocess, "Popen", popen)
    return spawned


# --- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, words", [
    ("chunk_size", 4096, "power of two from 64 KiB to 64 MiB"),  # `fs start --chunk-size 4K`
    ("chunk_size", 100 << 10, "power of two"),
    ("chunk_size", 128 << 20, "power of two"),
    ("chunk_size", 0, "power of two"),
    ("chunk_size", -(1 << 20), "power of two"),
    ("chunk_size", 1048576.0, "expected an int"),
    ("chunk_size", "1M", "expected an int"),
    ("chunk_size", True, "expected an int"),
    ("stripe", 0, ">= 1"),
    ("stripe", -2, ">= 1"),
    ("stripe", 2.0, ">= 1"),
    ("stripe", None, ">= 1"),
    ("storage_nodes", 0, ">= 1"),
    ("storage_nodes", True, ">= 1"),
    ("storage_nodes", 1001, "at most 1000"),
    ("targets_per_node", 0, ">= 1"),
    ("targets_per_node", 100, "at most 99"),
    ("replication", 0, ">= 1"),
    ("meta_count", 0, ">= 1"),
    ("mgmtd_count", "2", ">= 1"),
    ("heartbeat_s", 0, "> 0"),
    ("heartbeat_s", -1.0, "> 0"),
    ("heartbeat_s", math.nan, "finite"),
    ("lease_s", 0.0, "> 0"),
    ("lease_s", math.inf, "finite"),
    ("lease_s", "3", "number of seconds"),
    ("session_timeout_s", -5, "> 0"),
    ("gc_interval_s", 0, "> 0"),
    ("forward_timeout_s", math.nan, "finite"),
    ("failure_timeout_s", math.nan, "finite"),
    ("failure_timeout_s", 2.0, "more than twice heartbeat_s"),  # storage would refuse fence_s == heartbeat_s
    ("failure_timeout_s", 1.5, "more than twice heartbeat_s"),
    ("fsync", "no", "True or False"),
    ("fsync", 0, "True or False"),
    ("meta_db", "", "KV URL"),
    ("meta_db", "memory://", "shared store"),
    ("meta_db", "mysql://db", "unknown scheme"),
    ("meta_db", "sqlite://", "without a path"),
    ("meta_db", 5, "KV URL"),
    ("data_dir", "", "directory path"),
    ("data_dir", None, "directory path"),
])
def test_bad_field_is_named_with_its_value(tmp_path, field, value, words):
    kw = {"data_dir": str(tmp_path), field: value}
    with pytest.raises(ValueError) as exc:
        ClusterSpec(**kw)
    msg = str(exc.value)
    assert msg.startswith(f"{field}:") or msg.startswith(f"{field} "), msg
    assert words in msg and (repr(value) in msg or str(value) in msg), msg


def test_relations_between_fields(tmp_path):
    with pytest.raises(ValueError, match=r"replication: 3 replicas need at least as many storage nodes, got 2"):
        ClusterSpec(str(tmp_path), storage_nodes=2, replication=3)
    with pytest.raises(ValueError, match=r"storage_nodes \* targets_per_node \(4\) must be a multiple of replication \(3\)"):
        ClusterSpec(str(tmp_path), storage_nodes=4, replication=3)


@pytest.mark.parametrize("kw", [
    {},
    {"chunk_size": 64 << 10}, {"chunk_size": 64 << 20}, {"chunk_size": 4 << 20},
    {"stripe": 1}, {"stripe": 200},  # above the number of chains: meta clamps it per file
    {"storage_nodes": 1, "replication": 1}, {"storage_nodes": 2, "targets_per_node": 99, "replication": 2},
    {"heartbeat_s": 0.2, "failure_timeout_s": 2.0, "lease_s": 1.0, "gc_interval_s": 0.5, "forward_timeout_s": 2.0},
    {"heartbeat_s": 1, "failure_timeout_s": 3},  # ints are fine
    {"meta_db": "postgresql://u@127.0.0.1:5432/db?pool=2"}, {"meta_db": "sqlite:///tmp/kv.db"}, {"meta_db": "rel.db"},
    {"fsync": False},
])
def test_accepted_specs_are_accepted_by_every_service(tmp_path, kw):
    """What the spec accepts, the services' own configs accept too (built as ``start`` builds them)."""
    sp = ClusterSpec(str(tmp_path), **kw)
    MgmtdConfig(kv_url=sp.kv_url, lease_s=sp.lease_s, heartbeat_s=sp.heartbeat_s, failure_timeout_s=sp.failure_timeout_s)
    StorageConfig(node_id=sp.storage_nodes, targets={sp.storage_nodes * 100 + sp.targets_per_node: str(tmp_path)},
                  mgmtd=["127.0.0.1:1"], heartbeat_s=sp.heartbeat_s, fence_s=sp.failure_timeout_s / 2,
                  fsync=sp.fsync, forward_timeout_s=sp.forward_timeout_s)
    MetaConfig(node_id=1000 + sp.meta_count, mgmtd=["127.0.0.1:1"], heartbeat_s=sp.heartbeat_s,
               session_timeout_s=sp.session_timeout_s, gc_interval_s=sp.gc_interval_s, chunk_size=sp.chunk_size,
               stripe=sp.stripe)
    LayoutPolicy(sp.chunk_size, sp.stripe)


@pytest.mark.parametrize("chunk_size", [4096, 32 << 10, (64 << 10) + 4096, 3 << 20, 128 << 20])
def test_chunk_size_refusal_matches_what_meta_refuses(tmp_path, chunk_size):
    with pytest.raises(ValueError) as meta:
        LayoutPolicy(chunk_size, 16)
    with pytest.raises(ValueError) as spec:
        ClusterSpec(str(tmp_path), chunk_size=chunk_size)
    assert str(spec.value) == str(meta.value)


def test_a_path_data_dir_is_stored_as_a_string(tmp_path):
    sp = ClusterSpec(tmp_path)
    assert sp.data_dir == str(tmp_path)
    json.dumps(asdict(sp))  # what cluster.json holds


def test_validate_sees_changes_made_after_construction(tmp_path):
    sp = ClusterSpec(str(tmp_path))
    sp.chunk_size = 4096
    with pytest.raises(ValueError, match="chunk_size: .*got 4096"):
        sp.validate()


# --- start: refused before anything exists -----------------------------------------------------


@pytest.mark.parametrize("field, value", [("chunk_size", 4096), ("stripe", 0), ("heartbeat_s", math.nan),
                                          ("replication", 5), ("meta_db", "memory://")])
def test_start_refuses_a_bad_spec_before_any_process_or_directory(tmp_path, no_spawn, field, value):
    root = tmp_path / "fs"
    sp = ClusterSpec(str(root))
    setattr(sp, field, value)  # the dataclass is mutable: start checks again
    with pytest.raises(ValueError, match=f"^{field}"):
        LocalCluster.start(sp, timeout=5)
    assert no_spawn == [] and not root.exists()


def test_start_refuses_a_data_dir_that_is_a_file(tmp_path, no_spawn):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        LocalCluster.start(ClusterSpec(str(f)), timeout=5)
    assert no_spawn == [] and f.read_text() == "x"


def test_start_over_a_malformed_cluster_file_is_refused_before_spawning(tmp_path, no_spawn):
    (tmp_path / "cluster.json").write_text('{"spec": ')
    with pytest.raises(ValueError, match="cluster.json: not valid JSON"):
        LocalCluster.start(ClusterSpec(str(tmp_path)), timeout=5)
    assert no_spawn == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cluster.json"]


# --- attach ------------------------------------------------------------------------------------


def _state(tmp_path: Path) -> dict:
    return {"spec": asdict(ClusterSpec(str(tmp_path), storage_nodes=1, replication=1)),
            "services": {"mgmtd-1": {"role": "mgmtd", "pid": None, "address": "127.0.0.1:1", "metrics": "127.0.0.1:2",
                                     "config": {}},
                         "storage-1": {"role": "storage", "node_id": 1, "pid": 123, "config": {}}}}


def test_attach_reads_what_save_writes(tmp_path):
    c = LocalCluster(ClusterSpec(str(tmp_path), storage_nodes=2, replication=2, chunk_size=4 << 20),
                     _state(tmp_path)["services"])
    c._save()
    back = LocalCluster.attach(tmp_path)
    assert back.spec == c.spec and back.services == c.services
    assert back.mgmtd_addresses == ["127.0.0.1:1"]


def test_an_mgmtd_that_never_became_ready_has_no_address(tmp_path):
    state = _state(tmp_path)
    state["services"]["mgmtd-2"] = {"role": "mgmtd", "pid": None, "config": {}}  # a failed start saves this
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    assert LocalCluster.attach(tmp_path).mgmtd_addresses == ["127.0.0.1:1"]


def _corrupt(tmp_path, change):
    state = _state(tmp_path)
    change(state)
    return json.dumps(state)


@pytest.mark.parametrize("content, words", [
    ("", "not valid JSON"),
    ('{"spec": {', "not valid JSON (Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", "missing 'spec'"),
    ('{"spec": {}}', "missing 'services'"),
    ('{"spec": [], "services": {}}', "'spec': expected an object, got list"),
    ('{"spec": {"storage_nodes": 1}, "services": {}}', "missing 'spec.data_dir'"),
    (lambda s: s["spec"].update(colour="red"), "unknown spec keys ['colour']"),
    (lambda s: s["spec"].update(chunk_size=4096), "spec.chunk_size: expected a power of two"),
    (lambda s: s["spec"].update(stripe=0), "spec.stripe: expected an int >= 1, got 0"),
    (lambda s: s.update(services=[]), "'services': expected an object, got list"),
    (lambda s: s["services"].update({"mgmtd-2": "up"}), "service 'mgmtd-2': expected an object"),
    (lambda s: s["services"]["storage-1"].update(role="disk"), "service 'storage-1': role must be one of"),
    (lambda s: s["services"].update({"mgmtd": {"role": "mgmtd"}}), "service 'mgmtd': expected a name like mgmtd-1"),
    (lambda s: s["services"].update({"meta-1": {"role": "storage"}}), "service 'meta-1': expected a name like storage-1"),
    (lambda s: s["services"]["storage-1"].update(pid="123"), "service 'storage-1': pid must be an int or null"),
    (lambda s: s["services"]["mgmtd-1"].update(address=5), "service 'mgmtd-1': address must be a string"),
    (lambda s: s["services"]["mgmtd-1"].update(config=None), "service 'mgmtd-1': config must be an object"),
])
def test_attach_names_the_file_and_the_problem(tmp_path, content, words):
    path = tmp_path / "cluster.json"
    path.write_text(content if isinstance(content, str) else _corrupt(tmp_path, content))
    with pytest.raises(ValueError) as exc:
        LocalCluster.attach(tmp_path)
    msg = str(exc.value)
    assert msg.startswith(f"{path.resolve()}: "), msg
    assert words in msg, msg


def test_attach_of_a_binary_file(tmp_path):
    (tmp_path / "cluster.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"{(tmp_path / 'cluster.json').resolve()}: not text")):
        LocalCluster.attach(tmp_path)


def test_attach_without_a_cluster_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cluster in"):
        LocalCluster.attach(tmp_path / "none")
