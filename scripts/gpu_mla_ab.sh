#!/usr/bin/env bash
# One H200 call for FlashMLA kernel work: the flash_mla gpu tests, then `openinfra bench flash_mla`
# once per OPENINFRA_MLA_GLUON value (1: the Gluon decode kernel, 0: Triton; A/B in the same call).
# Logs and JSON land under $OUT.
#   usage: bash scripts/gpu_mla_ab.sh "1 0" [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SCHEDULES="${1:-1 0}"
shift || true
rc=0
timeout "${GPU_TEST_S:-200}" python3 -m pytest -q -m gpu -x tests/kernels -k "flash_mla" -p no:cacheprovider \
    -o addopts="-ra" 2>&1 | tail -25 | tee "$OUT/tests.log" || rc=1
for s in $SCHEDULES; do
    echo "=== OPENINFRA_MLA_GLUON=$s" | tee -a "$OUT/bench.log"
    OPENINFRA_MLA_GLUON=$s timeout "${GPU_BENCH_S:-170}" python3 -m openinfra bench flash_mla --no-peer --no-sparse \
        --save --results-dir "$OUT/gluon$s" "$@" 2>&1 | tee -a "$OUT/bench.log" | tail -40 || rc=1
done
exit $rc
