"""The compiler's resource report for the attention kernel on sm_90, without a GPU.

Compiles one variant of ``_mla_attn_kernel`` for the H100/H200 target through Triton (as the JIT
would for the same flags and 16-divisible strides), assembles the PTX with the ``ptxas`` that ships
in Triton's wheel, and reports registers, spill stores, shared memory and how many K tiles the
software pipeliner keeps in flight (from the TTGIR). This is how the launch defaults were chosen
(benchmarks/notes/flash_mla.md) and what the unit tier checks they still fit.

    python -m openinfra.kernels.flash_mla.resource_report 16,64,8,3 64,32,8,3:causal 64,32,8,3:sparse,fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["ResourceReport", "resource_report", "ptxas_path", "SMEM_LIMIT_SM90"]

SMEM_LIMIT_SM90 = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)

_PTR_TYPES = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "bt_ptr": "*i32", "len_ptr": "*i32", "idx_ptr": "*i32",
              "sched_ptr": "*i32", "splits_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*bf16",
              "lse_ptr": "*fp32", "max_ptr": "*fp32", "oacc_ptr": "*fp32", "lacc_ptr": "*fp32"}
# strides that are multiples of 16 elements in every real call (576-wide rows, 656-byte FP8 rows)
_DIV16 = ["stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_ob",
          "stride_os", "stride_oh"]


@dataclasses.dataclass
class ResourceReport:
    registers: int
    spill_store_bytes: int
    shared_bytes: int
    k_buffers: int  # K tiles the pipeliner keeps in shared memory (1: no overlap of load and math)

    def fits(self) -> bool:
        return self.shared_bytes <= SMEM_LIMIT_SM90


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def resource_report(block_m: int, block_n: int, num_warps: int, num_stages: int, *, causal: bool = False,
                    sparse: bool = False, fp8: bool = False, sink: bool = False, write_max: bool = False,
                    fp16: bool = False) -> ResourceReport:
    """Compile one variant for sm_90 and read back its resources (a few seconds of CPU).

    Under Triton's interpreter (TRITON_INTERPRET=1, as in the CPU test tiers) the kernels are not
    compilable in this process, so the report runs in a child process without it.
    """
    flags = dict(causal=causal, sparse=sparse, fp8=fp8, sink=sink, write_max=write_max, fp16=fp16)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        spec = f"{block_m},{block_n},{num_warps},{num_stages}:" + ",".join(k for k, v in flags.items() if v)
        out = subprocess.run([sys.executable, "-m", __name__, "--json", spec], env=env, capture_output=True,
                             text=True, check=True).stdout
        return ResourceReport(**json.loads(out.strip().splitlines()[-1]))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from openinfra.kernels.flash_mla.kernel import _mla_attn_kernel
    from openinfra.kernels.flash_mla.layout import FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, PAGE_BLOCK_SIZE

    params = list(inspect.signature(_mla_attn_kernel.fn).parameters)
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, SCHED_BLOCK=PAGE_BLOCK_SIZE, D_V=512, D_R=64, CAUSAL=causal,
                 SPARSE=sparse, FP8=fp8, HAS_SINK=sink, WRITE_MAX=write_max, INTERPRET=False,
                 SCALE_OFF=FP8_SCALE_OFFSET, ROPE_OFF=FP8_ROPE_OFFSET, FP8_TILE=FP8_TILE)
    sig = {}
    for p in params:
        if p in const:
            sig[p] = "constexpr"
        elif p in _PTR_TYPES:
            t = "*u8" if (fp8 and p == "kv_ptr") else _PTR_TYPES[p]
            sig[p] = t.replace("bf16", "fp16") if fp16 else t
        elif p == "scale_log2":
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in list(_PTR_TYPES) + _DIV16}
    src = ASTSource(fn=_mla_attn_kernel, signature=sig, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", r.stderr).group(1))
    bufs = [int(m) for m in re.findall(r"memdesc<(\d+)x\d+x512x", k.asm["ttgir"])]
    return ResourceReport(regs, spill, int(k.metadata.shared), max(bufs, default=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+",
                   help="block_m,block_n,num_warps,num_stages[:flag,...] with flags causal sparse fp8 sink write_max fp16")
    p.add_argument("--json", action="store_true", help="one JSON object per variant")
    args = p.parse_args()
    for spec in args.variants:
        nums, _, flags = spec.partition(":")
        bm, bn, nw, ns = (int(x) for x in nums.split(","))
        kw = {f: True for f in flags.split(",") if f}
        rep = resource_report(bm, bn, nw, ns, **kw)
        if args.json:
            print(json.dumps(dataclasses.asdict(rep)))
            continue
        print(f"{spec:32} registers {rep.registers:3}  spill stores {rep.spill_store_bytes:5} B  "
              f"shared {rep.shared_bytes / 1024:6.1f} KB{'' if rep.fits() else ' (TOO LARGE)'}  K buffers {rep.k_buffers}")


if __name__ == "__main__":
    main()
