"""``openinfra bench fs_clients`` at a tiny scale: the routine runs end to end and reports its ratios."""

from __future__ import annotations

import argparse
import os

import pytest

pytestmark = pytest.mark.service


def test_bench_fs_clients_tiny(tmp_path):
    from openinfra.bench.harness import routines

    r = routines()["fs_clients"]
    p = argparse.ArgumentParser()
    r.add_arguments(p)
    no_fuse = [] if os.path.exists("/dev/fuse") else ["--no-fuse"]
    args = p.parse_args(["--file-mib", "2", "--reads", "128", "--ring-entries", "32", "--fuse-threads", "2",
                         "--kv-blocks", "32", "--kv-batch", "16", "--tcp-mib", "8", "--storage-nodes", "2",
                         "--tree-files", "120", "--dir", str(tmp_path), *no_fuse])
    res = r.fn(args)
    s = res.summary
    assert s["ring_ops"] > 0 and s["kvcache_warm_GBps"] > 0 and s["tcp_loopback_GBps"] > 0
    assert s["goal_kvcache_over_tcp"] == 0.7
    if not no_fuse:
        assert s["ring_over_fuse"] > 0 and s["goal_ring_over_fuse"] == 3.0
    assert {row["surface"] for row in res.rows} >= {"ring I/O (32/batch)", "loopback TCP (peer)", "server remove_tree"}
    assert s["tree_delete_server_s"] > 0 and s["tree_delete_native_s"] > 0
