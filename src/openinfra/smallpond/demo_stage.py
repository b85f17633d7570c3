"""The demo's data stage: the standard library's ``.py`` files -> training shards (see ``corpus.py``).

Shards go to 3FS (``3fs:///demo/data/shards``, through the fsspec filesystem
``openinfra.fs.clients.fsspec``) when the cluster stage ran and reports its ``mgmtd`` addresses;
``OPENINFRA_FS_MGMTD`` is set from them (if unset) so this process and its forked workers find the
cluster. Otherwise the shards go under ``ctx.data_dir``. The summary says which. Intermediate data
stays on local disk. The training stage reads ``shards_dir``, ``seq_len``, ``vocab_size``, ``eos_id``.
"""

from __future__ import annotations

import importlib.util
import os

from openinfra import smallpond
from openinfra.smallpond import storage
from openinfra.smallpond.corpus import ByteTokenizer, build_shards, stdlib_files

__all__ = ["run_stage", "shard_location"]


def _has_3fs_fsspec() -> bool:
    try:
        return importlib.util.find_spec("openinfra.fs.clients.fsspec") is not None
    except ModuleNotFoundError:
        return False


def shard_location(ctx) -> tuple[str, str]:
    """``(directory for the shards, "3FS" or "local disk")``."""
    cluster = ctx.results.get("cluster") or {}
    mgmtd = cluster.get("mgmtd") if isinstance(cluster, dict) else None
    if mgmtd and _has_3fs_fsspec():
        os.environ.setdefault("OPENINFRA_FS_MGMTD", mgmtd if isinstance(mgmtd, str) else ",".join(mgmtd))
        return "3fs:///demo/data/shards", "3FS"
    return str(ctx.data_dir / "data" / "shards"), "local disk"


def run_stage(ctx) -> dict[str, object]:
    files = stdlib_files(limit=300 if ctx.quick else None)
    out, where = shard_location(ctx)
    storage.remove(out)
    seq_len = 128 if ctx.quick else 512
    ctx.log(f"{len(files)} source files -> {out} ({where})")
    with smallpond.init(data_root=str(ctx.data_dir / "smallpond"), num_executors=2 if ctx.quick else None,
                        progress=False) as sp:
        r = build_shards(sp, files, out, seq_len=seq_len, npartitions=4 if ctx.quick else 8)
        tasks = sp.stats.executed
    mb = r.input_bytes / 1e6
    return {
        "corpus": f"{r.files} .py files of the standard library, {mb:.1f} MB",
        "deduplicated": f"{r.unique_docs} unique documents ({r.duplicates} exact duplicates dropped)",
        "shards": f"{len(r.shards)} parquet shards, {r.sequences} sequences x {seq_len} tokens on {where}: {out}",
        "tokenizer": f"byte-level, vocab {ByteTokenizer.vocab_size} (id {ByteTokenizer.eos_id} ends a document)",
        "throughput": f"{mb / r.seconds:.1f} MB/s over {tasks} tasks ({r.seconds:.1f} s)",
        "storage": where,
        "shards_dir": out,
        "seq_len": seq_len,
        "vocab_size": ByteTokenizer.vocab_size,
        "eos_id": ByteTokenizer.eos_id,
    }
