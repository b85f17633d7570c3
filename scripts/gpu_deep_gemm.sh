#!/usr/bin/env bash
# One device call for deep_gemm: its gpu-tier tests, `openinfra bench deep_gemm` (the kept result,
# saved under $OUT), then, with SWEEP=1, the tile-configuration sweep of the dense shapes (saved
# under $OUT/sweep). Tests run first so the bench finds the kernels compiled.
#   device tool:  run(command="SWEEP=1 bash scripts/gpu_deep_gemm.sh", timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT/sweep"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu_info.txt"
rc=0
timeout "${TEST_TIMEOUT:-90}" "$PY" -m pytest -q -m gpu tests/kernels/test_deep_gemm_gpu.py -p no:cacheprovider \
    -o addopts="" --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || rc=1
timeout "${BENCH_TIMEOUT:-80}" "$PY" -m openinfra bench deep_gemm --save --results-dir "$OUT" 2>&1 \
    | tee "$OUT/bench.log" || rc=1
if [ -n "${SWEEP:-}" ]; then
    timeout "${SWEEP_TIMEOUT:-60}" "$PY" -m openinfra bench deep_gemm --sweep --skip-grouped --save \
        --results-dir "$OUT/sweep" > "$OUT/sweep.log" 2>&1 || rc=1
    tail -3 "$OUT/sweep.log"
fi
exit $rc
