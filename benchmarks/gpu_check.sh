#!/usr/bin/env bash
# One GPU check: build (CUDA kernels included), run the CUDA tests, run the GPU microbenchmarks.
# Results land in benchmarks/results/bench_cuda_*.{json,md,png}.  Peers are optional: put wheels of
# cut-cross-entropy / liger-kernel in ./wheels/ (GPU machines have no network) and they are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "wheels/*.whl" > /dev/null; then pip install -q --no-deps wheels/*.whl; fi
pip install -q --no-build-isolation -e . 2>&1 | tail -3
python -c "import torch, wspo_kernels.backends.native as n; print('CUDA kernels:', n.unavailable_reason(torch.device('cuda'), torch.float32) or 'built')"
python -m pytest -q -x tests/test_gpu.py tests/test_triton_linear.py 2>&1 | tail -5
# The issue's reference shapes: the one-pass logits kernel vs copy bandwidth, the linear kernels vs CCE.
python -m wspo_kernels bench --device cuda --repeat 5 --name bench_cuda_check \
  --cases logits:8192x32000:bf16,logits:8192x128256:bf16,linear:8192x4096x128256:bf16
