#!/usr/bin/env bash
# One GPU check: build (CUDA kernels included), run the GPU tests, run the GPU microbenchmarks.
# Every step runs even when an earlier one failed; failures print their tracebacks and numbers, and the
# script exits non-zero at the end if any step failed.
# Results land in benchmarks/results/bench_cuda_*.{json,md,png}.  Peers are optional: put wheels of
# cut-cross-entropy / liger-kernel in ./wheels/ (GPU machines have no network) and they are installed.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() {
  echo "=== $*"
  "$@" || failed+=("$*")
}
if compgen -G "wheels/*.whl" > /dev/null; then step pip install -q --no-deps wheels/*.whl; fi
step pip install -q --no-build-isolation -e .
step python -c "import torch, wspo_kernels.backends.native as n; print('CUDA kernels:', n.unavailable_reason(torch.device('cuda'), torch.float32) or 'built')"
step python -m pytest -q -rfE --tb=short tests/test_gpu.py tests/test_triton_linear.py
# The issue's reference shapes: the one-pass logits kernel vs copy bandwidth, the linear kernels vs CCE.
step python -m wspo_kernels bench --device cuda --repeat 5 --name bench_cuda_check \
  --cases logits:8192x32000:bf16,logits:8192x128256:bf16,linear:8192x4096x128256:bf16
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
