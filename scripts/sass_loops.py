"""Instruction mix of a kernel's loops on sm_90a, without a GPU (Triton's bundled ptxas + nvdisasm).

Compiles one variant, assembles it, disassembles the cubin, and prints every loop (a backward
branch) of more than 100 instructions with its most frequent opcodes, plus the registers, spills
and `wgmma.wait_group` counts. The numbers in benchmarks/notes/{flash_mla,deep_gemm}.md come from it.

    python scripts/sass_loops.py mla 16,64,8,2 [--causal] [--fp8] [--sparse]
    python scripts/sass_loops.py gemm 128,128,8,4 [--pointer] [--pipeline]
    python scripts/sass_loops.py gluon-gemm 4          # the Gluon FP8 GEMM with 4 buffers
    python scripts/sass_loops.py gluon-gemm-ws 4       # its warp-specialized variant
    python scripts/sass_loops.py gluon-gemm-ws 4,256   # ... with 128 x 256 tiles
    python scripts/sass_loops.py gluon-gemm-ws 4,128,1 # ... grouped contiguous (2 = masked)
    python scripts/sass_loops.py gluon-gemm-ws 6,128,0,7  # ... dense, 6 stages, split-K 7 (small M)
    python scripts/sass_loops.py gluon-mla -          # the warp-specialized MLA decode kernel
    python scripts/sass_loops.py gluon-mla-sparse 168,120,2,2  # ... sparse (FP8 cache): registers, prefetch, L2 lead
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _tools() -> tuple[str, str]:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bin_dir, "ptxas"), os.path.join(bin_dir, "nvdisasm")


def _compile(fn, sig: dict, const: dict, divisible: list[str], num_warps: int, num_stages: int):
    params = list(inspect.signature(fn.fn).parameters)
    full = {p: ("constexpr" if p in const else sig.get(p, "i32")) for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in divisible if p in params}
    src = ASTSource(fn=fn, signature=full, attrs=attrs, constexprs={(params.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps, "num_stages": num_stages})


def mla(spec: str, causal: bool, fp8: bool, sparse: bool):
    from openinfra.kernels.flash_mla.kernel import _mla_attn_kernel
    from openinfra.kernels.flash_mla.layout import FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, FP8_TILE, PAGE_BLOCK_SIZE
    from openinfra.kernels.flash_mla.resource_report import _DIV16, _PTR_TYPES

    bm, bn, nw, ns = (int(x) for x in spec.split(","))
    const = dict(BLOCK_M=bm, BLOCK_N=bn, SCHED_BLOCK=PAGE_BLOCK_SIZE, D_V=512, D_R=64, CAUSAL=causal, SPARSE=sparse,
                 FP8=fp8, HAS_SINK=False, WRITE_MAX=False, INTERPRET=False, SCALE_OFF=FP8_SCALE_OFFSET,
                 ROPE_OFF=FP8_ROPE_OFFSET, FP8_TILE=FP8_TILE, PIECES_FIRST=False)
    sig = dict(_PTR_TYPES, scale_log2="fp32")
    if fp8:
        sig["kv_ptr"] = "*u8"
    return _compile(_mla_attn_kernel, sig, const, list(_PTR_TYPES) + _DIV16, nw, ns)


def gemm(spec: str, pointer: bool, pipeline: bool):
    from openinfra.kernels.deep_gemm.gemm.kernel import _gemm_kernel

    bm, bn, nw, ns = (int(x) for x in spec.split(","))
    tma = not (pointer or pipeline)
    const = dict(MODE=0, SCALED=True, SFB_GRAN_N=128, HAS_C=False, SPLIT_K=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,
                 GROUP_M=8, NUM_SMS=132, NUM_STAGES=ns, PIPELINE=pipeline, UPCAST=False, EVEN_K=True, USE_TMA=tma,
                 SCALE_PREFETCH=0)
    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "d_ptr": "*bf16", "c_ptr": "*bf16", "sfa_ptr": "*fp32",
           "sfb_ptr": "*fp32", "layout_ptr": "*i32"}
    if tma:
        sig["a_ptr"] = f"tensordesc<fp8e4nv[{bm}, 128]>"
        sig["b_ptr"] = f"tensordesc<fp8e4nv[{bn}, 128]>"
    div = ["d_ptr", "c_ptr", "sfa_ptr", "sfb_ptr", "layout_ptr", "K", "N", "stride_am", "stride_bn", "stride_dm",
           "stride_sak", "stride_sbk"]
    return _compile(_gemm_kernel, sig, const, div, nw, ns)


def gluon_gemm(buffers: str, warp_specialized: bool = False):
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from openinfra.kernels.deep_gemm.gemm.gluon_kernel import _fp8_gemm_nt_kernel, _fp8_gemm_nt_ws_kernel

    # descriptors over small CPU tensors only to get the signature strings the JIT would build
    # gluon-gemm-ws: "buffers[,block_n[,mode[,split_k]]]"
    buffers, block_n, mode, split = (buffers.split(",") + ["", "", ""])[:4]
    block_n, mode, split = int(block_n or 128), int(mode or 0), int(split or 1)
    operand = TensorDescriptor.from_tensor(torch.empty(256, 256, dtype=torch.float8_e4m3fn), [128, 128],
                                           gl.NVMMASharedLayout.get_default_for([128, 128], gl.float8e4nv))
    b_operand = TensorDescriptor.from_tensor(torch.empty(256, 256, dtype=torch.float8_e4m3fn), [block_n, 128],
                                             gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv))
    out_rows = 64 if warp_specialized else 128  # the warp-specialized kernel stores each half on its own
    out = TensorDescriptor.from_tensor(torch.empty(256, 256, dtype=torch.bfloat16), [out_rows, 128],
                                       gl.NVMMASharedLayout.get_default_for([out_rows, 128], gl.bfloat16))
    fn = _fp8_gemm_nt_ws_kernel if warp_specialized else _fp8_gemm_nt_kernel
    params = list(inspect.signature(fn.fn).parameters)
    const = {"GROUP_M": 8, "NUM_BUFFERS": int(buffers)}
    if warp_specialized:
        const["MODE"] = mode  # 0 dense, 1 contiguous, 2 masked
        const["SPLIT"] = split
    else:
        const["num_warps"] = 8
    sig = {p: "constexpr" if p in const else "i32" for p in params}
    sig.update(a_desc=mangle_type(operand), b_desc=mangle_type(b_operand), d_desc=mangle_type(out), sfa_ptr="*fp32",
               sfb_ptr="*fp32")
    if warp_specialized:
        sig.update(d_ptr="*bf16", ws_ptr="*fp32", layout_ptr="*i32" if mode else "*fp32")
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()}, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4 if warp_specialized else 8})


def gluon_mla():
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from openinfra.kernels.flash_mla.gluon_kernel import _mla_decode_kernel

    cache = torch.empty(4, 64, 1, 576, dtype=torch.bfloat16)[:, :, 0, :]
    knope = TensorDescriptor.from_tensor(cache, [1, 64, 512], gl.NVMMASharedLayout.get_default_for([1, 64, 512], gl.bfloat16))
    kpe = TensorDescriptor.from_tensor(cache, [1, 64, 64], gl.NVMMASharedLayout.get_default_for([1, 64, 64], gl.bfloat16))
    params = list(inspect.signature(_mla_decode_kernel.fn).parameters)
    const = {"SCHED_BLOCK": 64, "CAUSAL": False, "PIECES_FIRST": False}
    sig = {p: "constexpr" if p in const else "i32" for p in params}
    sig.update(q_ptr="*bf16", knope_desc=mangle_type(knope), kpe_desc=mangle_type(kpe), bt_ptr="*i32", len_ptr="*i32",
               sched_ptr="*i32", splits_ptr="*i32", out_ptr="*bf16", lse_ptr="*fp32", oacc_ptr="*fp32",
               lacc_ptr="*fp32", scale_log2="fp32")
    src = GluonASTSource(fn=_mla_decode_kernel, signature=sig,
                         constexprs={(params.index(k),): v for k, v in const.items()}, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})


def gluon_mla_sparse(producer_regs: str, fp8: bool = True):
    from triton.experimental.gluon._runtime import GluonASTSource

    from openinfra.kernels.flash_mla.gluon_sparse import _mla_sparse_kernel

    params = list(inspect.signature(_mla_sparse_kernel.fn).parameters)
    # config: "pv_regs,producer_regs,prefetch[,l2_ahead[,debug]]"
    pv, prod, pre, l2, dbg = (int(x) for x in (producer_regs + ",2,0").split(",")[:5])
    const = {"SCHED_BLOCK": 64, "PIECES_FIRST": False, "IS_FP8": fp8, "PV_REGS": pv, "PRODUCER_REGS": prod,
             "PREFETCH": pre, "L2_AHEAD": l2, "ROW_BYTES": 656 if fp8 else 1152,
             "DEBUG": dbg}
    sig = {p: "constexpr" if p in const else "i32" for p in params}
    sig.update(q_ptr="*bf16", cache_ptr="*u8" if fp8 else "*bf16", idx_ptr="*i32", len_ptr="*i32", sched_ptr="*i32",
               splits_ptr="*i32", out_ptr="*bf16", lse_ptr="*fp32", oacc_ptr="*fp32", lacc_ptr="*fp32",
               scale_log2="fp32")
    # the JIT marks integer arguments divisible by 16 (strides of the 656-byte rows are): mark them here too
    attrs = {(params.index(p),): [["tt.divisibility", 16]]
             for p in ("q_ptr", "cache_ptr", "idx_ptr", "stride_qb", "stride_qh", "stride_idx", "stride_block",
                       "stride_page", "stride_ob", "stride_oh")}
    src = GluonASTSource(fn=_mla_sparse_kernel, signature=sig,
                         constexprs={(params.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})


def loops(sass: str, min_size: int = 100) -> list[tuple[int, collections.Counter]]:
    """(size, opcode counts) of every backward-branch region of at least ``min_size`` instructions."""
    ins, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"\.(L_x_\d+):", line.strip())
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            ins.append((addr, m.group(2)))
            if pending:
                labels[pending], pending = addr, None
    out = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", text)
        if m and m.group(1) in labels and labels[m.group(1)] < addr:
            body = [t for a, t in ins if labels[m.group(1)] <= a <= addr]
            if len(body) >= min_size:
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
                out.append((len(body), ops))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=["mla", "gemm", "gluon-gemm", "gluon-gemm-ws", "gluon-mla",
                                           "gluon-mla-sparse"])
    p.add_argument("config", help="mla / gemm: block_m,block_n,warps,stages; gluon-gemm: buffers; gluon-mla: -")
    for flag in ("causal", "fp8", "sparse", "pointer", "pipeline", "bf16"):
        p.add_argument(f"--{flag}", action="store_true")
    p.add_argument("--dump", metavar="DIR", help="also write the kernel's PTX and SASS (k.ptx, k.sass) into DIR")
    a = p.parse_args()
    if a.kernel == "mla":
        k = mla(a.config, a.causal, a.fp8, a.sparse)
    elif a.kernel == "gemm":
        k = gemm(a.config, a.pointer, a.pipeline)
    elif a.kernel == "gluon-mla":
        k = gluon_mla()
    elif a.kernel == "gluon-mla-sparse":
        k = gluon_mla_sparse(a.config, fp8=not a.bf16)
    else:
        k = gluon_gemm(a.config, warp_specialized=a.kernel == "gluon-gemm-ws")
    ptxas, nvdisasm = _tools()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
        sass = subprocess.run([nvdisasm, "-c", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stdout
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for name, text in (("k.ptx", k.asm["ptx"]), ("k.sass", sass)):
            with open(os.path.join(a.dump, name), "w") as f:
                f.write(text)
    regs = re.search(r"Used (\d+) registers", r.stderr).group(1)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr).group(1)
    waits = collections.Counter(re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)", k.asm["ptx"]))
    print(f"{a.kernel} {a.config}: {regs} registers, {spill} B spill stores, {k.metadata.shared / 1024:.1f} KB shared, "
          f"wgmma.wait_group {dict(waits)}")
    for note in re.findall(r"\(C\d+\)[^\n]*", r.stderr):
        print("  ptxas: " + note)
    for size, ops in loops(sass):
        print(f"  loop of {size} instructions: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(10)))


if __name__ == "__main__":
    main()
