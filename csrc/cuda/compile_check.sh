#!/usr/bin/env bash
# Compile-only check of the CUDA sources against the installed torch's headers, for machines whose
# torch has no CUDA (setup.py builds _C_cuda only where it does).  CPU wheels ship the c10/cuda headers
# but not the generated cuda_cmake_macros.h; a one-line stand-in in a temporary directory supplies it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${ARCH:-sm_90}
TI=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYI=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
[ -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
for src in csrc/cuda/wspo_cuda.cu csrc/cuda/bindings.cpp; do
  nvcc -c -O3 -std=c++17 -arch="$ARCH" -DTORCH_EXTENSION_NAME=_C_cuda -I"$STUB" -I"$TI" \
       -I"$TI/torch/csrc/api/include" -I"$PYI" -x cu "$src" -o "$STUB/$(basename "$src").o" \
       -Xcompiler -w
  echo "compiled $src for $ARCH"
done
