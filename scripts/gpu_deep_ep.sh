#!/usr/bin/env bash
# DeepEP's one call on the H200: its gpu-marked tests (kernels at V3 shapes, the distributed suites
# with gloo over CUDA tensors), then `openinfra bench deep_ep` with warp variants. Everything lands
# under $OUT (else ./out): gpu_info.txt, deep_ep_gpu_tests.log/.xml, deep_ep_bench.log and
# deep_ep_<hardware>_<date>.json (copy it to benchmarks/results/ to keep it).
#
#   device tool:  run(command="bash scripts/gpu_deep_ep.sh", timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"

rc=0
# kernels first (fast, most informative), then the multi-process suites
timeout 150 "$PY" -m pytest -q -m gpu tests/comm/test_deep_ep_kernels.py tests/comm/test_deep_ep_distributed.py \
    -p no:cacheprovider -o addopts="-ra" --durations=10 \
    --junitxml="$OUT/deep_ep_gpu_tests.xml" 2>&1 | tee "$OUT/deep_ep_gpu_tests.log" | tail -25 || rc=1

export OPENINFRA_RESULTS_DIR="$OUT"
timeout 80 "$PY" -m openinfra bench deep_ep --num-warps 2 4 --block-groups 8 16 --save 2>&1 | tee "$OUT/deep_ep_bench.log" || rc=1
exit $rc
