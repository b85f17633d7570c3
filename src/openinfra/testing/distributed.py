"""Run a function on N ranks of a real torch.distributed process group (gloo on 127.0.0.1).

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes; each initialises a gloo
group, calls ``fn(rank, world_size, *args)`` and sends back its return value (which must pickle).
The first failure is re-raised in the caller with the rank's traceback; a rank that hangs past
``timeout`` seconds fails the run and every rank is killed, so a test can never hang.

``fn`` must be importable by the child processes (defined at module level).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

__all__ = ["free_port", "run_on_ranks", "RankFailed"]


class RankFailed(RuntimeError):
    """A rank raised, crashed or timed out; the message carries its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, backend, args, env, results):
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    try:
        import torch

        torch.set_num_threads(1)  # N ranks share 2 cores in CI
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        except Exception as exc:  # noqa: BLE001 - only the "port taken" case is special
            if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
                results.put((rank, _PORT_TAKEN, str(exc).splitlines()[0]))
                return
            raise
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


_PORT_TAKEN = "port-taken"  # a rank's marker: its rendezvous port was taken before it could bind
_PORT_ATTEMPTS = 3


class _PortTaken(Exception):
    pass


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; returns values by rank.

    The rendezvous port is picked free, but another process (a parallel test) can take it before
    rank 0 binds it: then, and only then -- ``fn`` has not run anywhere -- all ranks are stopped
    and the run starts again on a new port, up to three times."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _spawn(fn, world_size, args, backend, timeout, env)
        except _PortTaken as exc:
            if attempt == _PORT_ATTEMPTS - 1:
                raise RankFailed(f"the rendezvous port was taken {_PORT_ATTEMPTS} times: {exc}") from None
    raise AssertionError("unreachable")


def _spawn(fn, world_size: int, args: tuple, backend: str, timeout: float, env) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, backend, args, dict(env or {}), results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailed(f"timed out after {timeout:.0f} s; ranks finished: {sorted(values)}")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values and p.exitcode not in (0, None)]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if ok == _PORT_TAKEN:
                raise _PortTaken(f"rank {rank}: {value}")
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [values[r] for r in range(world_size)]
