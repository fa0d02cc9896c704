"""Native backend: the csrc/ kernels (C++ on the CPU, CUDA on GPUs) behind the row-kernel contract.

The CPU kernels are built once per capability (``_C_avx512``, ``_C_avx2``, ``_C_default``); the
module matching ``torch.backends.cpu.get_cpu_capability()`` is loaded.  When no prebuilt module
exists (a source checkout installed without a compiler), the sources are compiled once with
``torch.utils.cpp_extension.load`` if a compiler is found; otherwise the backend reports itself
unavailable with a one-line warning and ``auto`` falls back to the portable backend.

Semantics are those of ``torch_rows`` (see its docstring), in float32 accumulation; float64 inputs
are left to the portable backend.  Mixed dtypes across models are read model by model.
"""
import importlib
import os
import shutil
import warnings

import torch

NAME = "native"
_CAPABILITY_ORDER = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}
_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "csrc", "cpu", "wspo_cpu.cpp")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_cpu = None
_cpu_error = None


def _jit_build():
    from torch.utils.cpp_extension import load
    warnings.warn("wspo_kernels: building the native CPU kernels once (no prebuilt module found)")
    return load("wspo_kernels_cpu_jit", [_SOURCE], extra_cflags=["-O3", "-DWSPO_CAPABILITY_NAME=\"jit-default\""],
                verbose=False)


def _load_cpu():
    """The compiled CPU module, or None with the reason kept in _cpu_error."""
    global _cpu, _cpu_error
    if _cpu is not None or _cpu_error is not None:
        return _cpu
    capability = torch.backends.cpu.get_cpu_capability()
    for name in _CAPABILITY_ORDER.get(capability, ("default",)):
        try:
            _cpu = importlib.import_module(f"wspo_kernels._C_{name}")
            return _cpu
        except ImportError:
            continue
    if os.path.exists(_SOURCE) and shutil.which(os.environ.get("CXX", "c++")):
        try:
            _cpu = _jit_build()
            return _cpu
        except Exception as exc:  # a failed JIT build leaves the portable backend in charge
            _cpu_error = f"JIT build failed: {exc}".splitlines()[0]
    else:
        _cpu_error = "no compiled module (wspo_kernels._C_*) and no C++ compiler to build one"
    warnings.warn(f"wspo_kernels: native CPU kernels unavailable ({_cpu_error}); using the portable backend")
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    if dtype not in _DTYPES:
        return f"native kernels take float32/bfloat16/float16, not {dtype}"
    if device.type != "cpu":
        return f"no native kernels for {device.type} tensors in this build"
    return None if _load_cpu() is not None else _cpu_error


def _labels(labels):
    return labels.contiguous()


def logprobs(logits, labels, ignore_index):
    return tuple(_cpu.logprobs(logits, _labels(labels), ignore_index))


def logprobs_backward(logits, labels, lse, grad_logp, ignore_index, out):
    return _cpu.logprobs_backward(logits, _labels(labels), lse, grad_logp, ignore_index, out)


def weak_log_ratio(aligned, base, labels, ignore_index):
    if aligned.dtype != base.dtype:
        return logprobs(aligned, labels, ignore_index)[0] - logprobs(base, labels, ignore_index)[0]
    return _cpu.weak_log_ratio(aligned, base, _labels(labels), ignore_index)


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    return tuple(_cpu.wspo_rows(policy, _labels(labels), k, weight, gamma, ignore_index, grad))


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    if not (policy.dtype == ref.dtype == aligned.dtype == base.dtype):
        logps = torch.stack([logprobs(x, labels, ignore_index)[0] for x in (ref, aligned, base)])
        loss, logp = wspo_rows(policy, labels, gamma * logps[0] + logps[1] - logps[2], weight, gamma,
                               ignore_index, grad)
        return loss, torch.cat([logp[None], logps])
    return tuple(_cpu.wspo_four(policy, ref, aligned, base, _labels(labels), weight, gamma, ignore_index, grad))


def scale_rows_(grad, scale):
    return _cpu.scale_rows_(grad, scale)
