"""How fast can one CTA per SM stream MLA cache pages through TMA, with no compute? (H200 probe)

FlashMLA's memory-bound goal is 0.95 of the copy bandwidth; the decode kernel reaches 0.61-0.73.
This probe runs only the producer side of the Gluon decode kernel: a TMA warp streams 64-token pages
([64, 512] + [64, 64] boxes through a 3-D descriptor, pages from a shuffled block table) into STAGES
shared-memory stages; a consumer warpgroup waits for each stage and releases it at once. If this is
near the copy bandwidth, the decode kernel's limiter is its schedule; if not, the access pattern.

    python3 scripts/mla_stream_probe.py        # prints JSON: GB/s per variant and the copy GB/s
"""
from __future__ import annotations

import json

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _stream_producer(knope_desc, kpe_desc, k_bufs, kpe_bufs, full, empty, bt_ptr, n_pages,
                     STAGES: gl.constexpr):
    cta = gl.program_id(0)
    for i in range(n_pages):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        page = gl.load(bt_ptr + cta * n_pages + i)
        mbarrier.expect(full.index(s), knope_desc.block_type.nbytes + kpe_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(knope_desc, [page, 0, 0], full.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(kpe_desc, [page, 0, 512], full.index(s), kpe_bufs.index(s))


@gluon.jit
def _stream_consumer(k_bufs, full, empty, n_pages, sink_ptr, STAGES: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    acc = gl.zeros((64, 64), gl.float32, layout)
    for i in range(n_pages):
        s = i % STAGES
        mbarrier.wait(full.index(s), (i // STAGES) & 1)
        acc += k_bufs.index(s).reshape([64, 512]).slice(0, 64, dim=1).load(layout).to(gl.float32)
        mbarrier.arrive(empty.index(s), count=1)
    gl.store(sink_ptr + gl.program_id(0), gl.sum(gl.sum(acc, axis=1), axis=0))


@gluon.jit
def _stream_kernel(knope_desc, kpe_desc, bt_ptr, n_pages, sink_ptr, STAGES: gl.constexpr):
    k_bufs = gl.allocate_shared_memory(knope_desc.dtype, [STAGES] + knope_desc.block_type.shape, knope_desc.layout)
    kpe_bufs = gl.allocate_shared_memory(kpe_desc.dtype, [STAGES] + kpe_desc.block_type.shape, kpe_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_stream_consumer, (k_bufs, full, empty, n_pages, sink_ptr, STAGES)),
        (_stream_producer, (knope_desc, kpe_desc, k_bufs, kpe_bufs, full, empty, bt_ptr, n_pages, STAGES)),
    ], [1], [40])


def _time(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n_blocks = 128 * 16384 // 64  # b = 128 requests of 16,384 tokens: 2.4 GB of bf16 latents
    cache = torch.randn(n_blocks, 64, 1, 576, device="cuda", dtype=torch.bfloat16)
    view = cache[:, :, 0, :]
    knope = TensorDescriptor.from_tensor(view, [1, 64, 512], gl.NVMMASharedLayout.get_default_for([1, 64, 512], gl.bfloat16))
    kpe = TensorDescriptor.from_tensor(view, [1, 64, 64], gl.NVMMASharedLayout.get_default_for([1, 64, 64], gl.bfloat16))
    out = {}
    src = torch.empty(cache.numel() * 2 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src))
    out["copy_GBps"] = 2 * src.numel() * 2 / t / 1e9
    for order in ("shuffled", "sequential"):
        perm = torch.randperm(n_blocks, device="cuda") if order == "shuffled" else torch.arange(n_blocks, device="cuda")
        for stages in (1, 2, 3):
            for ctas_per_sm in (1, 2):
                if stages * 73728 * ctas_per_sm > 227 * 1024:
                    continue
                ctas = sms * ctas_per_sm
                n_pages = n_blocks // ctas
                bt = perm[: ctas * n_pages].to(torch.int32).contiguous()
                sink = torch.empty(ctas, device="cuda")
                fn = lambda: _stream_kernel[(ctas, )](knope, kpe, bt, n_pages, sink, STAGES=stages, num_warps=4)
                t = _time(fn)
                out[f"{order}_stages{stages}_ctas{ctas_per_sm}_GBps"] = ctas * n_pages * 64 * 576 * 2 / t / 1e9
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
