#!/usr/bin/env bash
# Nsight Compute profiles of the kernels' hot launches (one launch each, full section set), as text.
# Packs $OUT/profile.tar.gz: <case>.txt (ncu --page details) and <case>.log.
#   device tool:  run(command="bash scripts/gpu_profile.sh [case ...]")   cases: scripts/profile_kernels.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
P=/tmp/openinfra_profile
rm -rf "$P" && mkdir -p "$P" "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
"$NCU" --version > "$P/ncu_version.txt" 2>&1 || { echo "no usable ncu: $NCU"; exit 1; }
cases=("$@"); [ ${#cases[@]} -gt 0 ] || cases=(mla16 mla64 gemm4096 gemm64)
for c in "${cases[@]}"; do
    case $c in mla*) k="regex:_mla_(attn|decode)_kernel" ;; gemm*) k=regex:_gemm ;; esac
    timeout 150 "$NCU" --clock-control none --set full -k "$k" --launch-skip 2 --launch-count 1 -f -o "$P/$c" \
        python3 scripts/profile_kernels.py "$c" > "$P/$c.log" 2>&1 || echo "$c: ncu exit $?" | tee -a "$P/$c.log"
    "$NCU" -i "$P/$c.ncu-rep" --page details > "$P/$c.txt" 2>&1
    grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Block Limit" "$P/$c.txt" | head -30 | sed "s/^/$c: /"
    rm -f "$P/$c.ncu-rep"
done
tar czf "$OUT/profile.tar.gz" -C "$P" .
