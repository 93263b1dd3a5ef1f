#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and PyTorch but not this package's other dependencies:
# the CUDA tests, then the reward benchmark on the GPU (1, 2 and 4 evaluator processes sharing it).
# Gymnasium (the only other import these need) comes as wheels in .whl/ when missing:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gymnasium==1.2.2 farama-notifications
# Logs go to $OUT (default: runs/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
if ! python3 -c "import gymnasium" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TREE_SEARCH_CACHE=${TREE_SEARCH_CACHE:-/tmp/tree-search-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/reward/test_node_exact.py tests/heads/test_tree_head.py -k cuda 2>&1 |
  tee "$OUT/cuda_tests.log"
python3 benchmarks/bench_reward.py --device cuda --evaluators 1,2,4 --no-full "$@" 2>&1 | tee "$OUT/bench_reward_cuda.log"
