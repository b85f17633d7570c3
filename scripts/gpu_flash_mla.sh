#!/usr/bin/env bash
# flash_mla on the H200 in one device call: precompile the kernel variants in parallel, run the
# gpu-marked tests, then the benchmark. Everything lands under $OUT (else ./out):
#   gpu_info.txt, warmup.log, gpu_tests.log, gpu_tests.xml, bench.log, flash_mla_<hw>_<date>.json
#
#   usage: bash scripts/gpu_flash_mla.sh [tests|bench|all] [extra `openinfra bench flash_mla` args...]
#   FM_MODES="fixed varlen"        benchmark modes, one invocation (and JSON under $OUT/<mode>/) each
#   FM_CONFIGS="0,0,0,0 0,64,8,2"   kernel variants to precompile and time (block_m,block_n,warps,stages)
#   FM_WARMUP_S / FM_TEST_S / FM_BENCH_S   time limits of the stages in seconds
#   device tool:  run(command="bash scripts/gpu_flash_mla.sh all --sk 8192 --modes fixed")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/openinfra_triton_cache}"
PY="${PYTHON:-python3}"
STAGE="${1:-all}"
shift || true
CONFIGS="${FM_CONFIGS:-0,0,0,0}"

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"

rc=0
# Compiles are seconds each and single-threaded: do them all at once on the machine's cores.
timeout "${FM_WARMUP_S:-90}" "$PY" -m openinfra.kernels.flash_mla.warmup --rows 16 32 64 --processes 16 --configs $CONFIGS \
    > "$OUT/warmup.log" 2>&1 || echo "warmup: exit $?" | tee -a "$OUT/warmup.log"
tail -3 "$OUT/warmup.log"

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
    timeout "${FM_TEST_S:-110}" "$PY" -m pytest -q -m gpu tests/kernels/test_flash_mla_gpu.py -p no:cacheprovider \
        -o addopts="-ra" --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 || rc=1
    grep -E "passed|failed|error|FAILED|Error" "$OUT/gpu_tests.log" | tail -25
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
    # One invocation per mode, each saving its own JSON: a run cut short still returns the first.
    : > "$OUT/bench.log"
    first=1
    for mode in ${FM_MODES:-fixed varlen}; do
        mkdir -p "$OUT/$mode"
        extra=()
        [ $first = 1 ] || extra+=(--no-sparse)  # sparse FP8 decoding once, in the first invocation
        first=0
        timeout "${FM_BENCH_S:-100}" "$PY" -m openinfra bench flash_mla --save --results-dir "$OUT/$mode" \
            --modes "$mode" --configs $CONFIGS "${extra[@]}" "$@" >> "$OUT/bench.log" 2>&1 || rc=1
    done
    cut -c1-200 "$OUT/bench.log" | grep -v "^saved" | tail -90
fi
exit $rc
