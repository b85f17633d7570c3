#!/usr/bin/env bash
# Everything one call on the H200 machine runs: the gpu-marked tests, then the GPU benchmarks.
# Runs the tree with the image's python3 (no installs there). Results land under $OUT when set
# (else ./out): gpu_tests.log, gpu_tests.xml, bench.log, and results.tar.gz holding
# benchmarks/results/*.json (unpack it into the repo to keep them).
#
#   usage: bash scripts/gpu.sh [pytest -k expression] [bench routine ...]
#   GPU_TEST_S / GPU_BENCH_S: seconds allowed for the tests, and for each benchmark routine
#   device tool:  run(command="bash scripts/gpu.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
KEXPR="${1:-}"
shift || true
ROUTINES=("$@")

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"

rc=0
# Stage limits keep the whole call inside the device tool's 10 minutes per command.
timeout "${GPU_TEST_S:-240}" "$PY" -m pytest -q -m "gpu" ${KEXPR:+-k "$KEXPR"} tests --ignore=tests/fs -p no:cacheprovider -o addopts="-ra" --continue-on-collection-errors \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || rc=1

if [ ${#ROUTINES[@]} -eq 0 ]; then
    mapfile -t ROUTINES < <("$PY" -m openinfra bench | awk '/\[gpu\]/ {print $1}')
    ROUTINES+=(model)  # runs on CPU too, so it is not marked [gpu]; its GPU figures matter
fi
export OPENINFRA_RESULTS_DIR="$PWD/benchmarks/results"
: > "$OUT/bench.log"
for r in "${ROUTINES[@]}"; do
    echo "=== openinfra bench $r" | tee -a "$OUT/bench.log"
    timeout "${GPU_BENCH_S:-120}" "$PY" -m openinfra bench "$r" --save 2>&1 | tee -a "$OUT/bench.log" || rc=1
done
tar czf "$OUT/results.tar.gz" benchmarks/results
exit $rc
