#!/usr/bin/env bash
# One GPU check: build (CUDA kernels included), run the CUDA tests, run the GPU microbenchmarks.
# Results land in benchmarks/results/gpu_<device>.{json,md}.  Optional peer: put a cut-cross-entropy
# wheel in ./wheels/ (no network on the GPU machines) and it is installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "wheels/*.whl" > /dev/null; then pip install -q --no-deps wheels/*.whl; fi
pip install -q --no-build-isolation -e . 2>&1 | tail -3
python -c "import torch, wspo_kernels.backends.native as n; print('cuda kernels:', n.unavailable_reason(torch.device('cuda'), torch.float32) or 'built')"
python -m pytest -q tests/test_gpu.py tests/test_triton_linear.py -x 2>&1 | tail -5
python benchmarks/bench_gpu.py --out benchmarks/results
