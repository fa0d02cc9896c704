"""The CUDA sources compile (csrc/cuda/compile_check.sh) on a machine without a GPU, where nvcc is on PATH.

setup.py builds ``_C_cuda`` only where the installed torch has CUDA, so without this test a CUDA edit that
breaks the build would pass CI on every CPU machine and fail only on a GPU.  sm_80 (A100) and sm_90
(H100/H200) are the archs the GPU path targets; both are compiled in one nvcc call.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "csrc", "cuda", "compile_check.sh")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")


def _compile(arch, timeout):
    env = dict(os.environ, ARCH=arch, PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout)


@needs_nvcc
def test_cuda_sources_compile_for_sm80_and_sm90():
    out = _compile("sm_80,sm_90", timeout=900)
    assert out.returncode == 0, f"nvcc ({NVCC}) failed:\n{out.stderr[-6000:]}"
    assert "compiled csrc/cuda/wspo_cuda.cu for sm_80,sm_90" in out.stdout
    assert "compiled csrc/cuda/bindings.cpp" in out.stdout


@needs_nvcc
def test_a_failed_compile_fails_the_check():
    """The two sources compile in parallel: a failure in either must still reach the exit status."""
    out = _compile("sm_1", timeout=300)
    assert out.returncode != 0 and "compute_1" in out.stderr, out.stdout + out.stderr
