#!/usr/bin/env bash
# The GPU benchmark suite in one call on a CUDA machine (run from the repository root):
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]
# 1. installs wheels carried in .whl/ (e.g. nerfacc; see the device notes) into /tmp/site,
# 2. builds the native kernels ahead (`fastnefes doctor --build`, CPU and CUDA),
# 3. runs the op micro-benchmarks on CUDA (native compositing vs torch and nerfacc),
# 4. runs benchmarks/run_suite.py: bench train + bench refine, both archs, default room scene,
#    with the full refinement (polish included) in the throughput runs.
# Writes RESULTS_DIR (default benchmarks/results) /ops_<device>.json, <device>.json, <device>.md
# and a log; every figure names the device it ran on.
set -euo pipefail
RESULTS=${1:-benchmarks/results}
WORK=${WORK:-/tmp/fastnefes-gpu-bench}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
slug=$(python3 -c "import torch; from fastnefes.bench.environment import device_slug; print(device_slug(torch.device('cuda')))")
python3 -m fastnefes doctor --build 2>&1 | tee "$RESULTS/doctor_${slug}.txt"
python3 benchmarks/ops.py --device cuda --repeats 20 --json "$RESULTS/ops_${slug}.json"
rm -rf "$WORK"
python3 benchmarks/run_suite.py --work "$WORK" --device cuda --minutes-hash 3 --minutes-mlp 15 --queries 30 \
  --results "$RESULTS"
