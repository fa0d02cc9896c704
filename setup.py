"""Builds the native kernels in csrc/ with torch.utils.cpp_extension + ninja.

    pip install --no-build-isolation -e .      # torch must be importable while building

CPU: csrc/cpu/wspo_cpu.cpp is compiled once per CPU capability into ``wspo_kernels._C_avx512``,
``_C_avx2`` and ``_C_default``; the backend loads the one the running CPU supports.  CUDA: csrc/cuda
is compiled into ``wspo_kernels._C_cuda`` only when the installed torch has CUDA and nvcc is found.
Every extension is optional: without a compiler the package installs pure-Python and says so.
``WSPO_KERNELS_NO_NATIVE=1`` skips the native build.
"""
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCE = "csrc/cpu/wspo_cpu.cpp"
CUDA_SOURCES = ["csrc/cuda/wspo_cuda.cu", "csrc/cuda/bindings.cpp"]
# name suffix, ATen capability macro, compiler flags
X86_CAPABILITIES = [
    ("avx512", "CPU_CAPABILITY_AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
    ("avx2", "CPU_CAPABILITY_AVX2", ["-mavx2", "-mfma", "-mf16c"]),
]


def _cpu_extensions(CppExtension):
    caps = X86_CAPABILITIES if platform.machine().lower() in ("x86_64", "amd64") else []
    exts = []
    for name, macro, flags in caps + [("default", None, [])]:
        defines = [("CPU_CAPABILITY", f"wspo_{name}"), ("WSPO_CAPABILITY_NAME", f'"{name}"')]
        if macro:
            defines.append((macro, None))
        exts.append(CppExtension(f"wspo_kernels._C_{name}", [CPU_SOURCE], define_macros=defines, optional=True,
                                 extra_compile_args=["-O3"] + flags))
    return exts


def _cuda_extensions(CUDAExtension, CUDA_HOME):
    import torch
    if torch.version.cuda is None or CUDA_HOME is None:
        return []
    return [CUDAExtension("wspo_kernels._C_cuda", CUDA_SOURCES, optional=True,
                          extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})]  # accurate expf/logf


def _extensions():
    if os.environ.get("WSPO_KERNELS_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("wspo-kernels: torch is not importable at build time (use pip --no-build-isolation); "
              "installing without native kernels")
        return [], {}
    exts = _cpu_extensions(CppExtension) + _cuda_extensions(CUDAExtension, CUDA_HOME)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
