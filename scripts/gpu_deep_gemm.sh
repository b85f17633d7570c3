#!/usr/bin/env bash
# One device call for deep_gemm: its gpu-tier tests, then `openinfra bench deep_gemm` (with the
# tile-config sweep when SWEEP=1). Logs and the result JSON land under $OUT (else ./out).
#   device tool:  run(command="bash scripts/gpu_deep_gemm.sh", timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OPENINFRA_RESULTS_DIR="$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu_info.txt"
rc=0
timeout "${TEST_TIMEOUT:-110}" "$PY" -m pytest -q -m gpu tests/kernels/test_deep_gemm_gpu.py -p no:cacheprovider \
    -o addopts="" --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || rc=1
timeout "${BENCH_TIMEOUT:-115}" "$PY" -m openinfra bench deep_gemm --save ${SWEEP:+--sweep} "$@" 2>&1 \
    | tee "$OUT/bench.log" || rc=1
exit $rc
