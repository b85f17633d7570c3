"""The demo's data pipeline: source files -> tokenized, deduplicated, shuffled training shards.

1. list the corpus files (the ``.py`` files of the Python standard library by default);
2. read them in parallel (``map_batches``), drop empty ones;
3. deduplicate exactly: hash-partition by content hash, keep one document per hash (the smallest path);
4. tokenize with a byte-level tokenizer (token = UTF-8 byte, 256 = end of document; no downloads)
   and pack each partition's token stream into fixed-length sequences;
5. shuffle the sequences globally (``random_shuffle``) and write them as parquet shards
   (one column ``tokens``: list<uint16> of ``seq_len`` tokens) plus ``_meta.json`` (the underscore keeps ``pyarrow.parquet.read_table(dir)`` working).
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from openinfra.smallpond import storage

__all__ = ["ByteTokenizer", "stdlib_files", "build_shards", "CorpusResult"]


class ByteTokenizer:
    """Byte-level tokenizer: each UTF-8 byte is a token (0..255); ``eos_id`` = 256 ends a document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """``[len(bytes) + 1]`` uint16 token ids, ending with ``eos_id``."""
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)
        return np.append(raw, np.uint16(self.eos_id))

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")


def stdlib_files(limit: int | None = None) -> list[str]:
    """The ``.py`` files of this Python's standard library (no site-packages), sorted; the first ``limit``."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    out.sort()
    return out[:limit] if limit else out


@dataclass
class CorpusResult:
    files: int
    input_bytes: int
    unique_docs: int
    duplicates: int
    sequences: int
    tokens: int
    shards: list[str]
    seconds: float
    output: str


def _read_files(batch: pa.Table) -> pa.Table:
    paths, texts = [], []
    for p in batch.column("path").to_pylist():
        with open(p, "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
        paths.append(p)
    return pa.table({"path": pa.array(paths, pa.large_string()), "text": pa.array(texts, pa.large_string())})


def _pack(seq_len: int):
    tok = ByteTokenizer()

    def pack(batch: pa.Table) -> pa.Table:
        # One stream per batch (a partition's documents in order), cut into seq_len windows; the tail
        # shorter than seq_len is dropped, as usual for pre-training data.
        ids = [tok.encode(t) for t in batch.column("text").to_pylist()]
        stream = np.concatenate(ids) if ids else np.zeros(0, np.uint16)
        n = len(stream) // seq_len
        seqs = stream[: n * seq_len].reshape(n, seq_len)
        values = pa.array(seqs.reshape(-1), pa.uint16())
        offsets = pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32))
        return pa.table({"tokens": pa.ListArray.from_arrays(offsets, values)})

    return pack


def build_shards(sp, files: list[str], output: str, seq_len: int = 256, npartitions: int = 4) -> CorpusResult:
    """Run the pipeline on ``files`` with session ``sp``; shards and ``_meta.json`` go under ``output``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not files:
        raise ValueError("files: the corpus is empty")
    t0 = time.perf_counter()
    input_bytes = sum(os.path.getsize(f) for f in files)
    docs = sp.from_items([{"path": os.path.abspath(f)} for f in files]).repartition(npartitions, by_rows=True)
    docs = docs.map_batches(_read_files, batch_size=64).filter("length(text) > 0")
    hashed = docs.map("path, text, md5(text) as h").repartition(npartitions, hash_by="h")
    unique = sp.partial_sql("select min(path) as path, arg_min(text, path) as text from {0} group by h order by path", hashed)
    seqs = unique.map_batches(_pack(seq_len), batch_size=1 << 30).random_shuffle()
    nonempty = docs.count()
    unique_docs = unique.count()
    seqs.write_parquet(output)
    shards = sorted(p for p in storage.listdir(output) if p.endswith(".parquet"))
    sequences = seqs.count()
    meta = {"format": "parquet, column tokens: list<uint16> of seq_len ids", "tokenizer": "byte-level",
            "vocab_size": ByteTokenizer.vocab_size, "eos_id": ByteTokenizer.eos_id, "seq_len": seq_len,
            "sequences": sequences, "tokens": sequences * seq_len, "documents": unique_docs, "shards": shards}
    storage.write_text(storage.join(output, "_meta.json"), json.dumps(meta, indent=2))
    return CorpusResult(len(files), input_bytes, unique_docs, nonempty - unique_docs, sequences, sequences * seq_len,
                        [storage.join(output, s) for s in shards], time.perf_counter() - t0, output)
