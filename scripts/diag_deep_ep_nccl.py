"""Step-by-step DeepEP suites over NCCL on every visible GPU, printing each step and dumping every
rank's Python stack if a step hangs (diagnosis of tests/comm/test_deep_ep_distributed.py::test_suites_on_nccl).

    python scripts/diag_deep_ep_nccl.py [hang_seconds]
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _rank(rank: int, world: int, port: int, hang_s: float) -> None:
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ[k] = v
    faulthandler.dump_traceback_later(hang_s, repeat=True)
    t0 = time.time()

    def say(msg):
        print(f"[rank {rank} +{time.time() - t0:6.1f}s] {msg}", flush=True)

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    say("process group up")
    from openinfra.comm.deep_ep import Buffer
    from tests.comm.deep_ep_suites import intranode_checks, low_latency_checks

    dev = f"cuda:{rank}"
    plain = Buffer(dist.group.WORLD, low_latency_mode=True, use_symmetric_memory=False)
    say(f"plain buffer: {plain.transport}")
    say(f"intranode on all_to_all_single: {intranode_checks(rank, world, dev, plain)} checks")
    say(f"low latency on all_to_all_single: {low_latency_checks(rank, world, dev, plain)} checks")
    auto = Buffer(dist.group.WORLD, low_latency_mode=True)
    say(f"auto buffer: {auto.transport} ({auto.transport_reason})")
    say(f"intranode on auto: {intranode_checks(rank, world, dev, auto)} checks")
    say(f"low latency on auto: {low_latency_checks(rank, world, dev, auto)} checks")
    dist.destroy_process_group()
    say("done")


if __name__ == "__main__":
    hang = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    world = torch.cuda.device_count()
    mp.spawn(_rank, args=(world, 29555, hang), nprocs=world, join=True)
