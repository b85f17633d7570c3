"""GraySort at tiny size: global order, record count and multiset checksum; the checker itself can fail."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra import smallpond
from openinfra.smallpond import graysort

pytestmark = pytest.mark.unit


def test_graysort_tiny(tmp_path):
    inputs = graysort.generate(str(tmp_path / "in"), num_records=20_000, num_files=4, seed=7)
    n_in, sum_in = graysort.checksum(inputs)
    assert n_in == 20_000
    with smallpond.init(data_root=str(tmp_path / "root"), num_executors=2) as sp:
        graysort.graysort(sp, inputs, str(tmp_path / "out"), npartitions=6, input_partitions=2)
    check = graysort.validate(str(tmp_path / "out"))
    assert check.ok, check
    assert (check.records, check.checksum) == (n_in, sum_in)
    assert check.files == 6


def test_generate_is_deterministic_and_sized(tmp_path):
    a = graysort.generate(str(tmp_path / "a"), 1000, 2, seed=3)
    b = graysort.generate(str(tmp_path / "b"), 1000, 2, seed=3)
    assert graysort.checksum(a) == graysort.checksum(b)
    t = pq.read_table(a[0])
    assert t.num_rows == 500
    assert set(len(k) for k in t.column("key").to_pylist()) == {10}
    assert set(len(v) for v in t.column("value").to_pylist()) == {90}


def test_validate_catches_disorder_and_lost_records(tmp_path):
    inputs = graysort.generate(str(tmp_path / "in"), 2000, 1, seed=1)
    table = pq.read_table(inputs[0])
    keys = table.column("key").to_pylist()
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ordered = table.take(pa.array(order))
    out = tmp_path / "out"
    out.mkdir()
    # two files in the wrong order: each sorted inside, but the boundary is violated
    pq.write_table(ordered.slice(1000), out / "part-0.parquet")
    pq.write_table(ordered.slice(0, 1000), out / "part-1.parquet")
    check = graysort.validate(str(out))
    assert check.boundary_violations == 1 and check.unordered_pairs == 0 and not check.ok
    # one file out of order inside
    (out / "part-0.parquet").unlink()
    (out / "part-1.parquet").unlink()
    pq.write_table(table, out / "part-0.parquet")
    check = graysort.validate(str(out))
    assert check.unordered_pairs > 0 and not check.ok
    # a lost record changes count and checksum
    pq.write_table(ordered.slice(1), out / "part-0.parquet")
    check = graysort.validate(str(out))
    assert check.ok and (check.records, check.checksum) != graysort.checksum(inputs)
