#!/usr/bin/env bash
# Compile-only check of the CUDA sources against the installed torch's headers, for machines whose
# torch has no CUDA (setup.py builds _C_cuda only where it does).  CPU wheels ship the c10/cuda headers
# but not the generated cuda_cmake_macros.h; a one-line stand-in in a temporary directory supplies it.
#
#   csrc/cuda/compile_check.sh                  # sm_90
#   ARCH=sm_80,sm_90 csrc/cuda/compile_check.sh  # device code for each listed arch, in one nvcc call
#
# The kernels (wspo_cuda.cu) are compiled for every arch; the bindings hold no device code, so they are
# compiled once.  The two sources compile side by side (each spends most of its time in torch's headers).
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${ARCH:-sm_90}
PYTHON=${PYTHON:-python}
TI=$("$PYTHON" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYI=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
[ -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
GENCODE=()
for arch in ${ARCH//,/ }; do
  GENCODE+=("-gencode=arch=compute_${arch#sm_},code=$arch")
done
compile() {  # compile SOURCE [nvcc flags...]
  local src=$1; shift
  nvcc -c -O3 -std=c++17 "$@" -DTORCH_EXTENSION_NAME=_C_cuda -I"$STUB" -I"$TI" \
       -I"$TI/torch/csrc/api/include" -I"$PYI" -x cu "$src" -o "$STUB/$(basename "$src").o" -Xcompiler -w \
       > "$STUB/$(basename "$src").log" 2>&1 || { cat "$STUB/$(basename "$src").log" >&2; return 1; }
}
compile csrc/cuda/wspo_cuda.cu "${GENCODE[@]}" & kernels=$!
compile csrc/cuda/bindings.cpp "${GENCODE[0]}" & bindings=$!
status=0
wait "$kernels" && echo "compiled csrc/cuda/wspo_cuda.cu for $ARCH" || status=1
wait "$bindings" && echo "compiled csrc/cuda/bindings.cpp" || status=1
exit $status
