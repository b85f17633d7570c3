#!/usr/bin/env bash
# One device call that times the kernel variants already written, for the three kernel families,
# without the gpu tests: deep_ep (warps x tile width), deep_gemm (--sweep of the dense shapes),
# flash_mla (launch configs over the fixed-length grid at one cache length). Everything it writes
# is packed into $OUT/sweep.tar.gz (the device tool returns at most 8 files).
#   device tool:  run(command="bash scripts/gpu_sweep.sh", timeout_s=600)
#   SWEEP_PARTS="ep gemm mla" picks the families; FM_CONFIGS / FM_SK set the flash_mla variants.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
W=/tmp/openinfra_sweep
rm -rf "$W" && mkdir -p "$W"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/openinfra_triton_cache}"
PY="${PYTHON:-python3}"
rc=0
for part in ${SWEEP_PARTS:-ep gemm mla}; do
    case $part in
    ep)
        timeout "${EP_S:-90}" "$PY" -m openinfra bench deep_ep --num-warps 1 2 4 --block-groups 8 16 32 --save \
            --results-dir "$W" > "$W/deep_ep.log" 2>&1 || rc=1 ;;
    gemm)
        timeout "${GEMM_S:-150}" "$PY" -m openinfra bench deep_gemm --sweep --save --results-dir "$W" \
            > "$W/deep_gemm.log" 2>&1 || rc=1 ;;
    mla)
        CONFIGS="${FM_CONFIGS:-0,0,0,0 0,64,8,2 0,64,4,2 0,32,4,3}"
        timeout 90 "$PY" -m openinfra.kernels.flash_mla.warmup --rows 16 32 64 --processes 16 --configs $CONFIGS \
            > "$W/flash_mla_warmup.log" 2>&1 || true
        timeout "${MLA_S:-150}" "$PY" -m openinfra bench flash_mla --save --results-dir "$W" --modes fixed \
            --sk ${FM_SK:-16384} --configs $CONFIGS --no-peer > "$W/flash_mla.log" 2>&1 || rc=1 ;;
    esac
    tail -c 6000 "$W/"*"${part/ep/deep_ep}"*.log 2>/dev/null | cut -c1-180 | tail -60
done
tar czf "$OUT/sweep.tar.gz" -C "$W" .
exit $rc
