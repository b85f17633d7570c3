"""Fixtures for the smallpond tests: a session per test on a temp data root, and the mock_urls data
that smallpond's own tests read (1000 rows in 10 parquet files and 10 TSV files)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openinfra import smallpond


@pytest.fixture(scope="session")
def mock_urls(tmp_path_factory):
    root = tmp_path_factory.mktemp("mock_urls")
    for i in range(10):
        urls = [f"https://host{(i * 100 + j) % 37}.example.com/page/{i * 100 + j}" for j in range(100)]
        vals = [str((i * 100 + j) * 7 % 1000) for j in range(100)]
        pq.write_table(pa.table({"url": urls, "val": vals}), root / f"part-{i:02d}.parquet")
        (root / f"part-{i:02d}.tsv").write_text("".join(f"{u}\t{v}\n" for u, v in zip(urls, vals)))
    return root


@pytest.fixture
def sp(tmp_path):
    session = smallpond.init(data_root=str(tmp_path / "sp"), num_executors=2, progress=False)
    yield session
    session.shutdown()
