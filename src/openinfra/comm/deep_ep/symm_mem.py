"""The NVLink fast path: ``torch.distributed._symmetric_memory.all_to_all_vdev``, device-side splits.

Low-latency mode and worst-token mode must not sync with the host, so on ``all_to_all_single`` they
send fixed, padded blocks: ``R`` blocks of ``M`` rows per rank, of which only the first
``counts[d]`` rows of block ``d`` are real. ``all_to_all_vdev`` (NVSHMEM, one NVLink domain) takes
the split sizes *on the device*, so only the real rows travel:

1. ``pack_blocks``: the real rows of each block, back to back (a ``scatter_rows``), with byte splits;
2. ``all_to_all_vdev`` into a symmetric output buffer; it writes each source's row count and offset
   into ``out_splits_offsets`` on the device;
3. ``unpack_blocks``: source ``s``'s rows go back to block ``s`` of a padded receive buffer,
   exactly where ``all_to_all_single`` would have put them (the rest keeps its fill value).

So the callers' unpacking is the same on both transports. The path is taken only where
``symmetric_memory_status`` finds everything it needs -- CUDA tensors, an NCCL group on one host,
NVSHMEM in the PyTorch build, the op's schema as expected -- and a self-test at ``Buffer``
construction agrees with ``all_to_all_single``. NVLink multicast is never enabled here
(``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` / ``NVSHMEM_DISABLE_NVLS=1`` are left as the machine sets them).
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from openinfra.comm.deep_ep.kernels import scatter_rows

__all__ = ["symmetric_memory_status", "SymmetricTransport", "pack_blocks", "unpack_blocks"]


def pack_blocks(inp: torch.Tensor, counts: torch.Tensor, block_rows: int, packed: torch.Tensor) -> None:
    """Rows ``[d * block_rows, d * block_rows + counts[d])`` of ``inp`` [R * block_rows, C] -> back to back in ``packed``."""
    num_blocks = counts.numel()
    counts = counts.to(torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    i = torch.arange(block_rows, device=inp.device).unsqueeze(0)
    dst = torch.where(i < counts.unsqueeze(1), starts.unsqueeze(1) + i, torch.full_like(i, -1))
    scatter_rows(inp, dst.view(num_blocks * block_rows, 1), packed)


def unpack_blocks(packed: torch.Tensor, splits: torch.Tensor, offsets: torch.Tensor, block_rows: int,
                  out: torch.Tensor) -> None:
    """Inverse of the exchange: rows ``[offsets[s], offsets[s] + splits[s])`` of ``packed`` -> block ``s`` of ``out``."""
    num_blocks = splits.numel()
    splits, offsets = splits.to(torch.int64), offsets.to(torch.int64)
    r = torch.arange(packed.shape[0], device=packed.device)
    ends = offsets + splits
    src = torch.bucketize(r, ends, right=True).clamp(max=num_blocks - 1)  # the block row r came from
    inside = (r >= offsets[src]) & (r < ends[src])
    dst = torch.where(inside, src * block_rows + (r - offsets[src]), torch.full_like(r, -1))
    scatter_rows(packed, dst.unsqueeze(1), out)


def symmetric_memory_status(group: dist.ProcessGroup, device: torch.device) -> tuple[bool, str]:
    """Whether ``all_to_all_vdev`` can serve ``group`` on ``device``, and why (one line). Collective."""
    if dist.get_backend(group) != "nccl":
        return False, f"the process group's backend is {dist.get_backend(group)}, not nccl"
    if device.type != "cuda":
        return False, "no CUDA device"
    world = dist.get_world_size(group)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) > 1:
        return False, f"the group spans {len(set(hosts))} hosts (symmetric memory needs one NVLink domain)"
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False, "this PyTorch has no torch.distributed._symmetric_memory"
    if not symm_mem.is_nvshmem_available():
        return False, "this PyTorch build has no NVSHMEM"
    try:
        schema = str(torch.ops.symm_mem.all_to_all_vdev.default._schema)
    except (AttributeError, RuntimeError):
        return False, "torch.ops.symm_mem.all_to_all_vdev is not registered"
    if "out_splits_offsets" not in schema:
        return False, f"unexpected all_to_all_vdev schema: {schema}"
    return True, "all_to_all_vdev over NVSHMEM"


class SymmetricTransport:
    """Padded-block all-to-all over ``all_to_all_vdev``; symmetric buffers cached by size, two per size.

    Why two: the exchange kernel *pulls* each peer's rows out of the peer's send buffer and ends
    without a barrier, so a rank that finished its pulls may start the next exchange -- packing
    into its send buffer, publishing new splits -- while a slower peer is still pulling the last
    one. Alternating two buffer sets (the same order on every rank: the calls are collective) makes
    reuse safe: exchange k+2 reuses exchange k's set only after exchange k+1's split exchange, whose
    barrier every rank reaches after finishing exchange k.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self._symm = symm_mem
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group)
        if symm_mem.get_backend(device) != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")  # all_to_all_vdev is an NVSHMEM kernel
        self._buffers: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._turn: dict[int, int] = {}

    def _allocate(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        symm, name = self._symm, self.group.group_name
        inp = symm.empty(nbytes, dtype=torch.uint8, device=self.device)
        out = symm.empty(nbytes, dtype=torch.uint8, device=self.device)
        splits = symm.empty(self.world, dtype=torch.int64, device=self.device)
        out_meta = symm.empty(2, self.world, dtype=torch.int64, device=self.device)
        for t in (inp, out, splits, out_meta):
            symm.rendezvous(t, name)  # collective: every rank allocates the same sizes in the same order
        return inp, out, splits, out_meta

    def _get(self, nbytes: int):
        if nbytes not in self._buffers:
            self._buffers[nbytes] = [self._allocate(nbytes), self._allocate(nbytes)]
            self._turn[nbytes] = 0
        turn = self._turn[nbytes]
        self._turn[nbytes] = 1 - turn
        return self._buffers[nbytes][turn]

    def all_to_all_blocks(self, out: torch.Tensor, inp: torch.Tensor, counts: torch.Tensor, fill) -> None:
        """``out`` [R * M, C] = the padded-block all-to-all of ``inp`` [R * M, C]; only ``counts[d]`` rows of block d move.

        Slots no row lands in hold ``fill``. Stream-ordered on the current stream, no host sync.
        """
        rows, width = inp.shape
        block = rows // self.world
        row_bytes = width * inp.element_size()
        src = inp.view(torch.uint8).view(rows, row_bytes)
        sym_in, sym_out, splits, out_meta = self._get(rows * row_bytes)
        pack_blocks(src, counts, block, sym_in.view(rows, row_bytes))
        splits.copy_(counts.to(torch.int64) * row_bytes)
        torch.ops.symm_mem.all_to_all_vdev(sym_in, sym_out, splits, out_meta, self.group.group_name)
        if fill == 0:
            out.view(torch.uint8).zero_()
        else:
            out.fill_(fill)
        unpack_blocks(sym_out.view(rows, row_bytes), out_meta[0] // row_bytes, out_meta[1] // row_bytes, block,
                      out.view(torch.uint8).view(rows, row_bytes))

    def self_test(self) -> str | None:
        """Run one exchange against ``all_to_all_single``; None if equal, else what differed."""
        rank = dist.get_rank(self.group)
        block = 4
        counts = (torch.arange(self.world, device=self.device) + rank) % (block + 1)
        inp = torch.arange(self.world * block * 8, device=self.device, dtype=torch.int32).view(-1, 8) + 1000 * rank
        got = torch.empty_like(inp)
        self.all_to_all_blocks(got, inp, counts, -1)
        want = torch.empty_like(inp)
        dist.all_to_all_single(want, inp, group=self.group)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        i = torch.arange(block, device=self.device).unsqueeze(0)
        valid = (i < recv_counts.unsqueeze(1)).view(-1, 1).expand_as(want)
        want = torch.where(valid, want, torch.full_like(want, -1))
        ok = torch.equal(got, want)
        flags = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(flags, group=self.group)
        return None if int(flags) == 0 else f"self-test mismatch on {int(flags)} rank(s)"
