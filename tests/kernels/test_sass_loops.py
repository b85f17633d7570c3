"""scripts/sass_loops.py: the sm_90a instruction-mix report the kernel notes quote (no GPU needed)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the real target
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sass_loops.py"), *args], env=env,
                          capture_output=True, text=True, check=True, timeout=300).stdout


def test_flash_mla_and_deep_gemm_loops_are_reported():
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("Triton's bundled nvdisasm is missing; cannot disassemble sm_90a here")
    mla = _run("mla", "16,64,8,2")
    assert "mla 16,64,8,2:" in mla and "loop of" in mla and "HMMA" in mla  # 16 rows: mma.sync, not wgmma
    gemm = _run("gemm", "128,128,8,4")
    # the FP8 GEMM's K loop: 4 wgmma (QGMMA in SASS) and the promotion FFMAs, one full wait per slice
    assert "wgmma.wait_group {'0': 1}" in gemm and "FFMA 64" in gemm


def test_gluon_gemm_compiles_for_sm90_without_serialized_wgmma():
    """The Gluon FP8 GEMM's point is an MMA in flight while the previous slice is promoted: it must
    compile for sm_90a with one `wgmma.wait_group 1` in the loop, no spills, and without ptxas
    serializing the wgmmas (its C7514 note: accumulator registers read while an MMA is in flight)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("Triton's bundled nvdisasm is missing; cannot disassemble sm_90a here")
    for buffers in ("3", "4", "5"):
        out = _run("gluon-gemm", buffers)
        assert "wgmma.wait_group {'1': 1, '0': 1}" in out and " 0 B spill stores" in out, out
        assert "C7514" not in out, out
    # warp-specialized: K slices in pairs in each of the two math partitions (wait 1 for the first
    # of a pair, wait 0 for the second and for an odd slice out), no spills within the register
    # split (256 / 208 / 40 per thread for the three warpgroups), nothing serialized (ptxas C7514
    # reads / C7515 writes of accumulator registers while an MMA is in flight)
    for config in ("4", "4,128,1", "4,128,2"):
        out = _run("gluon-gemm-ws", config)
        assert "wgmma.wait_group {'1': 2, '0': 4}" in out and " 0 B spill stores" in out, out
        assert "serialized" not in out, out
    # split-K for small M (6 stages, 7 K parts): the same loop, no spills, within 227 KB
    out = _run("gluon-gemm-ws", "6,128,0,7")
    assert "wgmma.wait_group {'1': 2, '0': 4}" in out and " 0 B spill stores" in out and "serialized" not in out, out
    assert float(out.split(" KB shared")[0].rsplit(", ", 1)[1]) <= 227, out
    # 128 x 256 tiles: two 128-column MMAs per slice and math partition, each waited for in full
    out = _run("gluon-gemm-ws", "4,256")
    assert "wgmma.wait_group {'0': 4}" in out and "C7514" not in out, out


def test_gluon_mla_decode_compiles_for_sm90_without_spills():
    """The warp-specialized MLA decode kernel fits its three partitions in the register split
    without spills and its shared memory (Q, two K stages, P) under the 227 KB an SM offers;
    each math partition waits for its own wgmma groups (S, then P V; P V in the other)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("Triton's bundled nvdisasm is missing; cannot disassemble sm_90a here")
    out = _run("gluon-mla", "-")
    assert " 0 B spill stores" in out and "wgmma.wait_group {'0': 3}" in out and "C7514" not in out, out
    shared_kb = float(out.split(" KB shared")[0].rsplit(", ", 1)[1])
    assert shared_kb <= 227, out


def test_gluon_mla_sparse_compiles_for_sm90_without_spills():
    """The fused sparse decode kernel (the dense kernel's math partitions, a 4-warp gathering
    producer) with its default register split (168 / 120, leaving the softmax partition 216)
    compiles for sm_90a without spills for both cache formats, within 227 KB of shared memory,
    with the math partitions' wgmma waits as in the dense kernel and nothing serialized."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("Triton's bundled nvdisasm is missing; cannot disassemble sm_90a here")
    from openinfra.kernels.flash_mla.gluon_sparse import SparseKernelConfig

    cfg = SparseKernelConfig()
    spec = f"{cfg.pv_regs},{cfg.producer_regs},{cfg.prefetch},{cfg.l2_ahead}"
    for extra in ((), ("--bf16", )):
        out = _run("gluon-mla-sparse", spec, *extra)
        assert " 0 B spill stores" in out and "wgmma.wait_group {'0': 3}" in out and "C7514" not in out, out
        assert float(out.split(" KB shared")[0].rsplit(", ", 1)[1]) <= 227, out
