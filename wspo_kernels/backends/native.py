"""Native backend: the csrc/ kernels (C++ on the CPU, CUDA on GPUs) behind the row-kernel contract.

The CPU kernels are one extension, ``wspo_kernels._C``: baseline-ISA bindings and one copy of the
kernels per instruction set (AVX-512, AVX2, baseline), chosen at load time -- the best copy the CPU
supports, capped by the capability PyTorch uses (``torch.backends.cpu.get_cpu_capability()``, which
honours ``ATEN_CPU_CAPABILITY``).  ``capability()`` says which copy runs.  The CUDA kernels are
``_C_cuda``, built where torch has CUDA.  When no prebuilt CPU module exists (a source checkout
installed without building), the CPU sources are compiled once with ``torch.utils.cpp_extension.load``
(baseline copy only) if a compiler is found; otherwise the backend reports itself unavailable with a
one-line warning and ``auto`` falls back to the portable backend.

Semantics are those of ``torch_rows`` (see its docstring), in float32 accumulation; float64 inputs
are left to the portable backend.  Mixed dtypes across models are read model by model.
"""
import importlib
import os
import shutil
import warnings

import torch

NAME = "native"
# torch's capability -> the kernel copies it allows, best first (the CPU may support fewer).
_CAPABILITY_ORDER = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "cpu")
_CPU_SOURCES = [os.path.join(_CSRC, "wspo_cpu.cpp"), os.path.join(_CSRC, "kernels.cpp")]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_loaded = {}   # device type -> module, or the reason it is missing (str)
CACHE_ENV_VAR = "WSPO_KERNELS_CPU_CACHE"   # 0: no gradient-buffer cache (see empty_grad_like)


def _jit_build_cpu():
    from torch.utils.cpp_extension import load
    warnings.warn("wspo_kernels: building the native CPU kernels once (no prebuilt module found)")
    return load("wspo_kernels_cpu_jit", _CPU_SOURCES,
                extra_cflags=["-O3", "-DCPU_CAPABILITY=wspo_default", '-DWSPO_CAPABILITY_NAME="default"',
                              "-DWSPO_TABLE=table_default"])


def preferred_capability(module) -> str:
    """The best kernel copy of ``module`` that both this CPU and torch's capability setting allow."""
    allowed = _CAPABILITY_ORDER.get(torch.backends.cpu.get_cpu_capability(), ("default",))
    return next(c for c in module.available_capabilities() if c in allowed)


def _find_cpu():
    try:
        module = importlib.import_module("wspo_kernels._C")
    except ImportError:
        if not (all(os.path.exists(f) for f in _CPU_SOURCES) and shutil.which(os.environ.get("CXX", "c++"))):
            return "no compiled module (wspo_kernels._C) and no C++ compiler to build one"
        try:
            module = _jit_build_cpu()
        except Exception as exc:  # a failed JIT build leaves the portable backend in charge
            return f"JIT build failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    module.use_capability(preferred_capability(module))
    module.set_cache_enabled(os.environ.get(CACHE_ENV_VAR, "1") != "0")
    return module


def capability():
    """The CPU kernel copy that runs ('avx512', 'avx2', 'default'), or None without native CPU kernels."""
    found = _module("cpu")
    return None if isinstance(found, str) else found.capability()


def _find_cuda():
    try:
        return importlib.import_module("wspo_kernels._C_cuda")
    except ImportError:
        return "this install has no CUDA kernels (wspo_kernels._C_cuda: torch without CUDA or no nvcc at build)"


def _module(device_type: str):
    """The compiled module for a device type, or a str saying why there is none (warned once)."""
    if device_type not in _loaded:
        found = {"cpu": _find_cpu, "cuda": _find_cuda}.get(device_type, lambda: f"no kernels for {device_type}")()
        if isinstance(found, str) and device_type == "cpu":
            warnings.warn(f"wspo_kernels: native CPU kernels unavailable ({found}); using the portable backend")
        _loaded[device_type] = found
    return _loaded[device_type]


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    if dtype not in _DTYPES:
        return f"native kernels take float32/bfloat16/float16, not {dtype}"
    found = _module(device.type)
    return found if isinstance(found, str) else None


def _ext(x):
    return _module(x.device.type)


def logprobs(logits, labels, ignore_index):
    return tuple(_ext(logits).logprobs(logits, labels.contiguous(), ignore_index))


def logprobs_backward(logits, labels, lse, grad_logp, ignore_index, out):
    return _ext(logits).logprobs_backward(logits, labels.contiguous(), lse, grad_logp, ignore_index, out)


def weak_log_ratio(aligned, base, labels, ignore_index):
    if aligned.dtype != base.dtype:
        return logprobs(aligned, labels, ignore_index)[0] - logprobs(base, labels, ignore_index)[0]
    return _ext(aligned).weak_log_ratio(aligned, base, labels.contiguous(), ignore_index)


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    return tuple(_ext(policy).wspo_rows(policy, labels.contiguous(), k, weight, gamma, ignore_index, grad))


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    if not (policy.dtype == ref.dtype == aligned.dtype == base.dtype):
        logps = torch.stack([logprobs(x, labels, ignore_index)[0] for x in (ref, aligned, base)])
        loss, logp = wspo_rows(policy, labels, gamma * logps[0] + logps[1] - logps[2], weight, gamma,
                               ignore_index, grad)
        return loss, torch.cat([logp[None], logps])
    return tuple(_ext(policy).wspo_four(policy, ref, aligned, base, labels.contiguous(), weight, gamma, ignore_index,
                                        grad))


def empty_grad_like(x):
    """A contiguous gradient buffer like ``x``; on the CPU from the extension's buffer cache, which keeps
    the last freed one: a fresh N x V buffer costs a page fault per 4 KiB on first touch, as much time
    as the kernel that fills it (``cached_bytes`` / ``empty_cache``; ``WSPO_KERNELS_CPU_CACHE=0``
    turns it off; read when the extension loads)."""
    if x.device.type == "cpu":
        return _ext(x).cached_empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def cached_bytes() -> int:
    """Bytes held by the CPU gradient-buffer cache (0 when the extension is not loaded)."""
    found = _loaded.get("cpu")
    return 0 if found is None or isinstance(found, str) else found.cached_bytes()


def empty_cache() -> None:
    """Free the block held by the CPU gradient-buffer cache."""
    found = _loaded.get("cpu")
    if found is not None and not isinstance(found, str):
        found.empty_cache()


def scale_rows_(grad, scale):
    return _ext(grad).scale_rows_(grad, scale)
