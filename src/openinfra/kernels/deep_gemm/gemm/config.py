"""Launch configurations: the tile shape, split-K, pipelining depth and warps for each problem.

The rule (our own, tuned on the H200): a GEMM is a set of output tiles shared out over the SMs in
waves, so the time is about ``waves x time-per-tile``. We score each candidate tile by
``ceil(tiles / SMs) x BM x BN / efficiency(BM, BN)`` (large tiles reuse each loaded byte more, so
they run closer to the tensor-core peak) and keep the cheapest; ties go to the larger tile.

Small-M problems (M <= 128 rows; decode and the memory-bound shapes) have too few tiles to occupy
132 SMs, so the K loop is split over several programs whose fp32 partial sums a second small
kernel adds up. Every K slice keeps its two-level promotion; only the final fp32 sum is reordered.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div

__all__ = [
    "GemmConfig", "num_sms", "set_num_sms", "get_num_sms", "choose_config", "tuning_candidates", "INTERPRETER_CONFIG",
]


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the GEMM kernels.

    block_m / block_n: output tile (powers of two, Triton's ``tl.arange`` needs them);
    split_k: programs sharing one tile's K loop (dense FP8 only); group_m: rasterisation width in
    row tiles; num_stages: software-pipelining depth of the K loop; num_warps: 4 = one warpgroup;
    pipeline_promote: issue the next slice's dot before promoting the previous one;
    use_tma: load K-major A / B tiles with TMA descriptors (else pointer loads);
    scale_prefetch: load the scales of the next 1 or 2 K slices ahead (0 = in the slice's own
    iteration); not yet measured on the H200, so off by default (see benchmarks/notes/deep_gemm.md);
    programs_per_sm: resident programs per SM in the persistent grid (2 keeps more loads in
    flight on memory-bound problems when the stages fit twice in shared memory);
    gluon: run dense FP8 GEMMs (bf16 out, no C, no split-K) through the experimental Gluon kernel
    of :mod:`.gluon_kernel` on Hopper (128x128 tiles, num_stages buffers); other problems ignore
    it. Off: measured 0.80-0.97x the Triton kernel's speed (benchmarks/notes/deep_gemm.md, sweep 3);
    gluon_ws: the same through the warp-specialized persistent Gluon kernel (a TMA producer warp,
    two math warpgroups on the tile's halves; block_n 128 or 256, 256 dense only):
    :func:`choose_config` picks it for FP8 GEMMs on Hopper with M >= 512 (dense; >= 256 when its
    128 x 128 tiles fill 3/4 of the SMs) or >= 256 rows per group (masked, contiguous).
    """

    block_m: int = 128
    block_n: int = 128
    split_k: int = 1
    group_m: int = 8
    num_stages: int = 4
    num_warps: int = 8
    pipeline_promote: bool = False
    programs_per_sm: int = 1
    use_tma: bool = True
    scale_prefetch: int = 0
    gluon: bool = False
    gluon_ws: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.scale_prefetch not in (0, 1, 2):
            raise ValueError(f"scale_prefetch must be 0, 1 or 2, got {self.scale_prefetch}")


#: Small tiles and few "SMs" under Triton's CPU interpreter: tiny test shapes still get several
#: tiles per program, which exercises the persistent loop and the rasterisation.
INTERPRETER_CONFIG = GemmConfig(block_m=32, block_n=32, group_m=2, num_stages=1, num_warps=4)
_INTERPRETER_SMS = 3

# Tiles the big-M path chooses from, with their relative speed per output element. Measured on the
# H200 (benchmarks/notes/deep_gemm.md, run 1): 128x128 with 8 warps ran at 656-814 TFLOPS, while
# 128x256 and 256x128 with 8 warps ran 2-4x slower: the two-level accumulation keeps a fresh
# partial accumulator next to the running one, so a 32768-element tile needs 256 registers a
# thread and spills. With 16 warps (64 + 64 registers a thread) they ran slower still (run 2), so
# they are sweep candidates only.
_EFFICIENCY = {
    (128, 128): 1.0, (128, 64): 0.75, (64, 128): 0.7, (64, 64): 0.5,
}
_WARPS = {(128, 128): 8, (128, 64): 4, (64, 128): 4, (64, 64): 4}


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# DeepGEMM's set_num_sms(): a process-wide cap on the SMs the GEMMs' persistent grids use, so that
# communication kernels (DeepEP's dispatch / combine) can keep the rest while both run. Kept as
# module state because that is the original API; None = use every SM.
_sms_cap: int | None = None


def set_num_sms(count: int) -> None:
    """Cap the SMs the GEMM kernels use (DeepGEMM's ``set_num_sms``); ``count`` >= 1."""
    global _sms_cap
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    _sms_cap = count


def get_num_sms(device: torch.device | None = None) -> int:
    """SMs the GEMM kernels will use on ``device`` (default: the current CUDA device, else the
    interpreter's stand-in): the device's count, lowered by :func:`set_num_sms`."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return num_sms(device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors the kernels use on ``device`` (a small number on CPU, for the
    interpreter), capped by :func:`set_num_sms`."""
    if device.type == "cuda":
        count = _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        count = _INTERPRETER_SMS
    return min(count, _sms_cap) if _sms_cap is not None else count


_SMEM_BUDGET = 160 * 1024


def _stages(block_m: int, block_n: int, element_size: int = 1) -> int:
    # A and B tiles of one 128-deep slice per stage; keep under 160 KiB of the 227 KiB of shared
    # memory, leaving room for the epilogue's layout conversion.
    per_stage = (block_m + block_n) * GROUP_SIZE * element_size
    return max(2, min(5, _SMEM_BUDGET // per_stage))


def choose_config(
    m: int, n: int, k: int, device: torch.device, *, groups: int = 1, allow_split_k: bool = True,
    max_block_m: int = 256, element_size: int = 1, allow_gluon: bool = True,
) -> GemmConfig:
    """Pick the launch configuration of a ``groups`` x [m, n, k] problem on ``device``.

    ``m`` is the rows per group that will be computed (``expected_m`` for the masked kernel);
    ``max_block_m`` caps the tile height (the contiguous layout needs ``128 % block_m == 0``);
    ``element_size`` is 1 for FP8 and 2 for bf16 operands (halves the stages that fit);
    ``allow_gluon=False`` keeps the Triton kernel.
    """
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    sms = num_sms(device)
    k_blocks = max(1, k // GROUP_SIZE)
    if m <= 128 and groups == 1:
        # (the Gluon kernel with split-K, :func:`memory_bound_gluon_config`, measured 0.7-0.9x this
        # on most small-M shapes of the H200 bench: benchmarks/notes/deep_gemm.md, run 8)
        return _memory_bound_config(m, n, k_blocks, sms, allow_split_k, element_size)
    best = None
    for (bm, bn), eff in _EFFICIENCY.items():
        if bm > max_block_m or 2 * (bm + bn) * GROUP_SIZE * element_size > _SMEM_BUDGET:
            continue
        tiles = groups * ceil_div(m, bm) * ceil_div(n, bn)
        waves = ceil_div(tiles, sms)
        cost = waves * bm * bn / eff
        key = (cost, -bm * bn)
        if best is None or key < best[0]:
            best = (key, bm, bn)
    _, bm, bn = best
    min_m = _GLUON_WS_MIN_M if groups == 1 else _GLUON_WS_MIN_M_GROUPED
    stages = 4
    if groups == 1 and _GLUON_WS_MIN_M_GROUPED <= m < min_m and ceil_div(m, 128) * ceil_div(n, 128) * 4 >= 3 * sms:
        # M = 256 ... 511 with 128 x 128 tiles filling >= 3/4 of the SMs: 1.1-1.4x the Triton kernel
        # on the H200 (fewer tiles: 0.88-0.96x), 5 stages 2-5 % faster than 4 on all six shapes there
        # (benchmarks/notes/deep_gemm.md, run 9)
        min_m, stages = _GLUON_WS_MIN_M_GROUPED, 5
    if allow_gluon and element_size == 1 and m >= min_m and max_block_m >= 128 and _gluon_ws_enabled(device):
        # The warp-specialized persistent Gluon kernel: 1.02-1.6x the Triton kernel on every
        # M = 512 ... 4096 shape of the H200 sweeps (benchmarks/notes/deep_gemm.md, sweeps 5-6),
        # more since its K slices go in pairs (dense 0.98x cuBLAS at M = 4096, contiguous
        # 1.27-1.37x the Triton kernel: run 9).
        # Problems it does not take (C, split-K, 1-D B scales, rows a 2-D TMA descriptor cannot
        # address) fall back to the Triton kernel with the same 128 x 128 tile.
        return GemmConfig(128, 128, 1, group_m=8, num_stages=stages, num_warps=8, gluon_ws=True)
    return GemmConfig(bm, bn, 1, group_m=8, num_stages=min(4, _stages(bm, bn, element_size)), num_warps=_WARPS[(bm, bn)])


# Rows (per group for the masked layout) from which FP8 GEMMs take the Gluon kernel.
_GLUON_WS_MIN_M = 512
_GLUON_WS_MIN_M_GROUPED = 256


def _gluon_ws_enabled(device: torch.device) -> bool:
    """Hopper (sm_90), and not switched off with OPENINFRA_GEMM_GLUON=0 (then every dense FP8
    GEMM takes the Triton kernel)."""
    if os.environ.get("OPENINFRA_GEMM_GLUON", "1") == "0" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] == 9


# K slices at or below which the memory-bound path runs two programs per SM.
_SHORT_K_BLOCKS = 12
# Per-work-item fixed cost in byte-equivalents: filling the pipeline before the first slice lands.
_ITEM_OVERHEAD_BYTES = 48 * 1024


def _split_costs(m: int, n: int, k_blocks: int, sms: int, allow_split_k: bool, block_m: int, block_n: int,
                 rows_read: int, element_size: int):
    """(cost, split) of each split-K factor for small-M tiles of block_m x block_n whose work items
    stream ``rows_read`` A rows: waves x bytes each item streams (A and B slices, its output or fp32
    partial) + the split-K reduction spread over all SMs."""
    tiles = ceil_div(m, block_m) * ceil_div(n, block_n)
    for split in range(1, (16 if allow_split_k else 1) + 1):
        if split > 1 and ceil_div(k_blocks, split) < 2:
            break
        split = ceil_div(k_blocks, ceil_div(k_blocks, split))  # no empty splits
        items = tiles * split
        k_item = ceil_div(k_blocks, split) * GROUP_SIZE
        item_bytes = (rows_read + block_n) * k_item * element_size + rows_read * block_n * (4 if split > 1 else 2)
        cost = ceil_div(items, sms) * (item_bytes + _ITEM_OVERHEAD_BYTES)
        if split > 1:
            cost += m * n * (4 * split + 2) / sms
        yield cost, split


def memory_bound_gluon_config(m: int, n: int, k_blocks: int, sms: int, allow_split_k: bool = True) -> GemmConfig:
    """Small M on the warp-specialized Gluon kernel (128 x 128 tiles; rows past M load as TMA
    zeros and cost no memory traffic): the cost model of :func:`_memory_bound_config` over the
    split-K factor only. Opt-in (a sweep candidate), not the default: measured slower than the
    Triton kernel on most small-M shapes (benchmarks/notes/deep_gemm.md, run 8)."""
    _, split = min(_split_costs(m, n, k_blocks, sms, allow_split_k, 128, 128, min(m, 128), 1))
    # 6 stages of 32 KB + the 32 KB output buffers: the most bytes in flight that fit
    return GemmConfig(128, 128, split, group_m=8, num_stages=6, num_warps=8, gluon_ws=True)


def _memory_bound_config(m: int, n: int, k_blocks: int, sms: int, allow_split_k: bool, element_size: int) -> GemmConfig:
    """Small M: the cheapest (block_n, split) by :func:`_split_costs` with 64-row tiles."""
    block_m = 64  # the smallest wgmma tile height
    best = None
    for block_n in (32, 64, 128):
        for cost, split in _split_costs(m, n, k_blocks, sms, allow_split_k, block_m, block_n, block_m,
                                        element_size):
            key = (cost, split, -block_n)
            if best is None or key < best[0]:
                best = (key, block_n, split)
    _, block_n, split = best
    # group_m 8: the (at most two) row tiles of a column run back to back, so B is read from HBM once.
    config = GemmConfig(block_m, block_n, split, group_m=8, num_stages=_stages(block_m, block_n, element_size), num_warps=4)
    if k_blocks <= _SHORT_K_BLOCKS and element_size == 1:
        # Short K loops (K <= 1536) are dominated by filling the pipeline, so two resident programs
        # per SM with 3 stages each overlap one program's fill with the other's stream. Measured on
        # the H200 (run 2 sweep): 24576x1536 and 32768x512 at M=64 went from 23.2 / 15.1 us to
        # 20.0 / 12.7 us, at M=128 32768x512 from 20.7 to 15.9 us; at K >= 2048 it was slower.
        config = replace(config, programs_per_sm=2, num_stages=3)
    return config


def with_overrides(config: GemmConfig, **kwargs) -> GemmConfig:
    """``config`` with some fields replaced (benchmark sweeps)."""
    return replace(config, **kwargs)


def tuning_candidates(m: int, n: int, k: int, device: torch.device) -> list[tuple[str, GemmConfig]]:
    """Alternative configurations the benchmark sweep times next to :func:`choose_config`'s pick
    (and the gpu tests check for correctness), labelled for the notes."""
    if m <= 128:
        base = choose_config(m, n, k, device)
        out = [
            ("scale prefetch 2", replace(base, scale_prefetch=2)),
            ("pointer loads", replace(base, use_tma=False)),
            ("2 programs/SM, 3 stages", replace(base, programs_per_sm=2, num_stages=3)),
            ("block_n 64", replace(base, block_n=64)),
        ]
        if m > 64:
            out.append(("128 rows, 8 warps", replace(base, block_m=128, num_warps=8, num_stages=4)))
        out.append(("gluon ws split-K 6 buffers",
                    memory_bound_gluon_config(m, n, max(1, k // GROUP_SIZE), num_sms(device))))
        return out
    return [
        ("triton 128x128 w8 s4", GemmConfig(128, 128, 1, 8, 4, 8)),
        ("gluon 128x128 3 buffers", GemmConfig(128, 128, 1, 8, 3, 8, gluon=True)),
        ("gluon ws 128x128 4 buffers", GemmConfig(128, 128, 1, 8, 4, 8, gluon_ws=True)),
        ("gluon ws 128x128 5 buffers", GemmConfig(128, 128, 1, 8, 5, 8, gluon_ws=True)),
        ("gluon ws 128x256 3 buffers", GemmConfig(128, 256, 1, 8, 3, 8, gluon_ws=True)),
        ("gluon ws 128x256 4 buffers", GemmConfig(128, 256, 1, 8, 4, 8, gluon_ws=True)),
        ("128x128 w8 s4 prefetch1", GemmConfig(128, 128, 1, 8, 4, 8, scale_prefetch=1)),
        ("128x128 w8 s4 prefetch2", GemmConfig(128, 128, 1, 8, 4, 8, scale_prefetch=2)),
        ("128x128 w8 s4 pointer", GemmConfig(128, 128, 1, 8, 4, 8, use_tma=False)),
        ("128x128 w8 s3", GemmConfig(128, 128, 1, 8, 3, 8)),
        ("128x128 w8 s5", GemmConfig(128, 128, 1, 8, 5, 8)),
        ("128x128 w8 s4 group16", GemmConfig(128, 128, 1, 16, 4, 8)),
        ("128x128 w8 s2 2/SM", GemmConfig(128, 128, 1, 8, 2, 8, programs_per_sm=2)),
        ("128x256 w16 s3", GemmConfig(128, 256, 1, 8, 3, 16)),
        ("256x128 w16 s3", GemmConfig(256, 128, 1, 8, 3, 16)),
        ("128x256 w8 s3", GemmConfig(128, 256, 1, 8, 3, 8)),
        ("128x64 w4 s4", GemmConfig(128, 64, 1, 8, 4, 4)),
    ]
