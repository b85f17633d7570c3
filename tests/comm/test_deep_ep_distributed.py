"""DeepEP on gloo ranks: DeepEP's intranode and low-latency test checks, at parallel.md's scaled-down shapes.

One spawn per rank count runs both suites (process start-up dominates on 2 cores); on CPU machines
the 2-rank spawn also runs a round trip with the Triton kernels under the interpreter. The gpu tier
runs the same suites with gloo over CUDA tensors on one GPU (NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import pytest
import torch

from openinfra.kernels.backend import interpreter_enabled
from tests.comm.deep_ep_suites import intranode_checks, low_latency_checks, triton_round_trip_checks



def _both(rank: int, num_ranks: int, device: str) -> tuple[int, ...]:
    if device == "cuda":
        torch.cuda.set_device(0)
    import torch.distributed as dist

    from openinfra.comm.deep_ep import Buffer

    # one buffer for both modes, as DeepEP's intranode test checks low-latency compatibility
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    counts = (intranode_checks(rank, num_ranks, device, buffer), low_latency_checks(rank, num_ranks, device, buffer))
    if device == "cpu" and num_ranks == 2 and interpreter_enabled():
        # the Triton kernels inside dispatch / combine, on this spawn (start-up dominates on 2 cores)
        counts += (triton_round_trip_checks(rank, num_ranks),)
    return counts


@pytest.mark.distributed
@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_intranode_and_low_latency(distributed, num_ranks):
    expected = (24, 16, 1) if num_ranks == 2 and interpreter_enabled() else (24, 16)
    assert distributed(_both, num_ranks, "cpu", timeout=280) == [expected] * num_ranks


@pytest.mark.gpu
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_intranode_and_low_latency_gloo_cuda(distributed, num_ranks):
    assert distributed(_both, num_ranks, "cuda", timeout=280) == [(24, 16)] * num_ranks


def _autograd_async_validation(rank: int, num_ranks: int, device: str) -> tuple[int, int, int]:
    if device == "cuda":
        torch.cuda.set_device(0)
    from tests.comm.deep_ep_suites import async_checks, autograd_checks, edge_checks, validation_checks

    return (autograd_checks(rank, num_ranks, device), async_checks(rank, num_ranks, device),
            validation_checks(rank, num_ranks, device), edge_checks(rank, num_ranks, device))


@pytest.mark.distributed
def test_autograd_async_validation_edges(distributed):
    assert distributed(_autograd_async_validation, 3, "cpu", timeout=280) == [(4, 1, 26, 1)] * 3


def _nccl_suites(rank: int, num_ranks: int) -> tuple[str, int, int, int]:
    torch.cuda.set_device(rank)
    from openinfra.comm.deep_ep import Buffer
    import torch.distributed as dist

    device = f"cuda:{rank}"
    plain = Buffer(dist.group.WORLD, low_latency_mode=True)
    counts = (intranode_checks(rank, num_ranks, device, plain), low_latency_checks(rank, num_ranks, device, plain))
    # Symmetric memory on request where the machine has it: the capability check and the self-test
    # exchange run in the constructor; the intranode suite (its worst-token exchanges ride on
    # all_to_all_vdev) passes. Without NVSHMEM the request must fail with the reason.
    from openinfra.comm.deep_ep.symm_mem import symmetric_memory_status

    ok, why = symmetric_memory_status(dist.group.WORLD, torch.device(device))
    if not ok:
        try:
            Buffer(dist.group.WORLD, use_symmetric_memory=True)
        except ValueError as e:
            return ("unavailable: " + why,) + counts + (24 if why in str(e) else -1,)
        return ("unavailable but constructed",) + counts + (-1,)
    symm = Buffer(dist.group.WORLD, low_latency_mode=True, use_symmetric_memory=True)
    return (symm.transport,) + counts + (intranode_checks(rank, num_ranks, device, symm),)


@pytest.mark.multigpu
def test_suites_on_nccl(distributed):
    """NCCL over every visible GPU (2-8): both suites on all_to_all_single, the intranode suite on
    symmetric memory (all_to_all_vdev over NVSHMEM)."""
    num_ranks = min(torch.cuda.device_count(), 8)
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    results = distributed(_nccl_suites, num_ranks, backend="nccl", timeout=200, env=env)
    print(f"deep_ep on {num_ranks} GPUs, symmetric memory: {results[0][0]}")
    assert [r[1:] for r in results] == [(24, 16, 24)] * num_ranks
    assert all(r[0] == "all_to_all_vdev" or r[0].startswith("unavailable: ") for r in results)


@pytest.mark.multigpu
def test_low_latency_on_symmetric_memory(distributed):
    """The low-latency suite over torch symmetric memory (the double-buffered transport): 16 checks
    per rank. Passed on 2 H200s on 2026-11-29 (an earlier single-buffered transport hung rank 1)."""
    num_ranks = min(torch.cuda.device_count(), 8)
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert distributed(_low_latency_symm, num_ranks, backend="nccl", timeout=120, env=env) == [16] * num_ranks


def _low_latency_symm(rank: int, num_ranks: int) -> int:
    torch.cuda.set_device(rank)
    from openinfra.comm.deep_ep import Buffer
    import torch.distributed as dist

    buffer = Buffer(dist.group.WORLD, low_latency_mode=True, use_symmetric_memory=True)
    return low_latency_checks(rank, num_ranks, f"cuda:{rank}", buffer)
