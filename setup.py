"""Builds the native kernels in csrc/ with torch.utils.cpp_extension + ninja.

    pip install --no-build-isolation -e .      # torch must be importable while building

CPU: one extension, ``wspo_kernels._C``.  Its bindings (csrc/cpu/wspo_cpu.cpp) are compiled for the
baseline ISA; the kernels (csrc/cpu/kernels.cpp) are compiled once per instruction set -- AVX-512 and
AVX2 on x86-64, plus the baseline copy (SSE on x86-64, NEON on aarch64, no x86 flags elsewhere) -- and
linked into the same module; the bindings pick the copy the running CPU supports (ATen's design: one
module to import, nothing executed that the CPU cannot run).  CUDA: csrc/cuda is compiled into
``wspo_kernels._C_cuda`` only when the installed torch has CUDA and nvcc is found.  Every extension
is optional: without a compiler the package installs pure-Python and says so.
``WSPO_KERNELS_NO_NATIVE=1`` skips the native build.
"""
import os
import platform

from setuptools import setup

CPU_BINDINGS = "csrc/cpu/wspo_cpu.cpp"
CPU_KERNELS = "csrc/cpu/kernels.cpp"
CUDA_SOURCES = ["csrc/cuda/wspo_cuda.cu", "csrc/cuda/bindings.cpp"]
# name, ATen capability macro, compiler flags: one copy of the kernels each
X86_ISAS = [
    ("avx512", "CPU_CAPABILITY_AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
    ("avx2", "CPU_CAPABILITY_AVX2", ["-mavx2", "-mfma", "-mf16c"]),
]


def _isas():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return (X86_ISAS if x86 else []) + [("default", None, [])]


def _kernel_copies(BuildExtension):
    """build_ext that compiles kernels.cpp once per ISA (its own flags and namespace) into the CPU extension."""

    class BuildWithKernelCopies(BuildExtension):
        def build_extension(self, ext):
            copies = getattr(ext, "kernel_copies", None)
            if copies:
                ext.extra_objects = []
                for name, macro, flags in copies:
                    macros = [("CPU_CAPABILITY", f"wspo_{name}"), ("WSPO_CAPABILITY_NAME", f'"{name}"'),
                              ("WSPO_TABLE", f"table_{name}")] + ([(macro, None)] if macro else [])
                    ext.extra_objects += self.compiler.compile(
                        [CPU_KERNELS], output_dir=os.path.join(self.build_temp, f"isa_{name}"), macros=macros,
                        include_dirs=ext.include_dirs, extra_postargs=["-O3", "-std=c++17", "-fPIC"] + flags)
            super().build_extension(ext)

    return BuildWithKernelCopies


def _cpu_extension(CppExtension):
    isas = _isas()
    have = [(f"WSPO_HAVE_{name.upper()}", None) for name, _, _ in isas if name != "default"]
    ext = CppExtension("wspo_kernels._C", [CPU_BINDINGS], define_macros=have, optional=True,
                       extra_compile_args=["-O3"])
    ext.kernel_copies = isas
    return ext


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
    exts = [_cpu_extension(CppExtension)] + _cuda_extensions(CUDAExtension, CUDA_HOME)
    return exts, {"build_ext": _kernel_copies(BuildExtension).with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
