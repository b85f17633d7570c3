"""GraySort, scaled down: generate records, sort them with smallpond, validate the result.

Records are 100 bytes: a 10-byte key and a 90-byte value, uniformly random from a fixed seed
(parquet columns ``key`` and ``value``, both BLOB). The sort shuffles each record to the partition
of its key's first two bytes (range partitioning: partitions come out in global key order), then
sorts each partition. ``validate`` checks global order (inside every output file and across file
boundaries), the record count, and a checksum of the multiset of records (the sum of per-record
hashes, which does not depend on order).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["RECORD_BYTES", "generate", "sort_dataframe", "graysort", "validate", "checksum", "SortCheck"]

RECORD_BYTES = 100
KEY_BYTES = 10


def generate(directory: str, num_records: int, num_files: int = 4, seed: int = 0) -> list[str]:
    """Write ``num_records`` random records as ``num_files`` parquet files; returns their paths."""
    if num_records < 1 or num_files < 1:
        raise ValueError(f"num_records and num_files must be positive, got {num_records}, {num_files}")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_files):
        n = (i + 1) * num_records // num_files - i * num_records // num_files
        raw = rng.integers(0, 256, size=(n, RECORD_BYTES), dtype=np.uint8)
        keys = pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), n, [None, pa.py_buffer(np.ascontiguousarray(raw[:, :KEY_BYTES]).tobytes())])
        vals = pa.FixedSizeBinaryArray.from_buffers(pa.binary(RECORD_BYTES - KEY_BYTES), n, [None, pa.py_buffer(np.ascontiguousarray(raw[:, KEY_BYTES:]).tobytes())])
        table = pa.table({"key": keys.cast(pa.binary()), "value": vals.cast(pa.binary())})
        path = os.path.join(directory, f"input-{i:05d}.parquet")
        pq.write_table(table, path, compression="none")
        paths.append(path)
    return paths


def _partition_expr(npartitions: int) -> str:
    # The first two key bytes as an integer in [0, 65536), scaled to [0, npartitions): range partitions.
    return f"(('0x' || substr(hex(key), 1, 4))::INTEGER * {npartitions}) // 65536"


def sort_dataframe(sp, input_paths: list[str] | str, npartitions: int, input_partitions: int | None = None):
    """The GraySort pipeline as a DataFrame (lazy): read, range-shuffle by key prefix, sort each partition."""
    df = sp.read_parquet(input_paths)
    if input_partitions and input_partitions > 1:
        df = df.repartition(input_partitions)  # one shuffle producer per group of input files
    df = df.repartition(npartitions, by=_partition_expr(npartitions))
    return df.partial_sort(by="key")


def graysort(sp, input_paths: list[str] | str, output_dir: str, npartitions: int,
             input_partitions: int | None = None) -> None:
    """Sort the records of ``input_paths`` into ``output_dir`` (files in global key order by name)."""
    sort_dataframe(sp, input_paths, npartitions, input_partitions).write_parquet(output_dir)


def checksum(paths: list[str]) -> tuple[int, int]:
    """``(record count, order-independent checksum)`` of parquet files of records."""
    import duckdb

    con = duckdb.connect()
    files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
    n, s = con.execute(f"select count(*), coalesce(sum(hash(key, value)::HUGEINT) % 18446744073709551616, 0)::UBIGINT "
                       f"from read_parquet({files})").fetchone()
    con.close()
    return int(n), int(s)


@dataclass
class SortCheck:
    """What ``validate`` found."""

    records: int
    checksum: int
    files: int
    unordered_pairs: int      # adjacent records out of order inside files
    boundary_violations: int  # files whose first key is below the previous file's last key
    bad_record_sizes: int

    @property
    def ok(self) -> bool:
        return self.unordered_pairs == 0 and self.boundary_violations == 0 and self.bad_record_sizes == 0


def validate(output: str | list[str]) -> SortCheck:
    """Check global order, sizes, count and checksum of sorted output (a directory or files in order)."""
    import duckdb

    paths = sorted(glob.glob(os.path.join(output, "*.parquet"))) if isinstance(output, str) else list(output)
    if not paths:
        raise FileNotFoundError(f"validate: no parquet files in {output!r}")
    con = duckdb.connect()
    unordered = bad = boundary = 0
    prev_last = None
    for p in paths:
        q = p.replace("'", "''")
        u, b, first, last = con.execute(
            "select count(*) filter (where prev > key), count(*) filter (where octet_length(key) != 10 or octet_length(value) != 90), "
            "arg_min(key, file_row_number), arg_max(key, file_row_number) from "
            f"(select key, value, file_row_number, lag(key) over (order by file_row_number) as prev "
            f"from read_parquet('{q}', file_row_number = true))").fetchone()
        unordered += int(u)
        bad += int(b)
        if first is not None:
            if prev_last is not None and first < prev_last:
                boundary += 1
            prev_last = last
    con.close()
    n, s = checksum(paths)
    return SortCheck(n, s, len(paths), unordered, boundary, bad)
