"""The Ray executor, on one local Ray started on 127.0.0.1 with small resources (shared by this module)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from openinfra import smallpond
from openinfra.smallpond import graysort

pytestmark = pytest.mark.service

try:
    import ray
except ImportError as exc:  # pragma: no cover - depends on the environment
    ray = None
    _why = f"ray is not importable here: {exc}"


@pytest.fixture(scope="module")
def local_ray():
    if ray is None:
        pytest.skip(_why)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=80 * 2**20)
    yield
    ray.shutdown()


def test_ray_executor_runs_the_dataframe_api(local_ray, tmp_path):
    with smallpond.init(data_root=str(tmp_path), executor="ray") as sp:
        assert sp._get_executor().name == "ray"
        df = sp.from_items([{"k": i % 5, "v": i} for i in range(100)]).repartition(3, hash_by="k")
        df = sp.partial_sql("select k, sum(v) as s from {0} group by k", df)
        df = df.map(lambda r: {"k": r["k"], "s2": r["s"] * 2})  # a lambda, pickled by Ray's cloudpickle
        got = {r["k"]: r["s2"] for r in df.take_all()}
    assert got == {k: 2 * sum(i for i in range(100) if i % 5 == k) for k in range(5)}


def test_ray_fault_injection_and_graysort(local_ray, tmp_path):
    inputs = graysort.generate(str(tmp_path / "in"), 5000, 2, seed=5)
    with smallpond.init(data_root=str(tmp_path / "root"), executor="ray", fault_inject_prob=0.1, max_retries=10) as sp:
        graysort.graysort(sp, inputs, str(tmp_path / "out"), npartitions=3)
    check = graysort.validate(str(tmp_path / "out"))
    assert check.ok and (check.records, check.checksum) == graysort.checksum(inputs)
