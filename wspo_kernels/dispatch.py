"""Choosing a backend: one function, by device, dtype and what is installed (DESIGN.md section 5).

``WSPO_KERNELS_BACKEND`` (process-wide) or the ``backend=`` keyword of every public function picks
one of ``auto`` (default), ``torch`` (portable), ``native`` (csrc C++/CUDA) or ``triton``.  A forced
backend that cannot run raises a RuntimeError naming what is missing; ``auto`` never fails for lack
of an optional backend.
"""
import importlib
import os

import torch

ENV_VAR = "WSPO_KERNELS_BACKEND"
CHOICES = ("auto", "torch", "native", "triton")
# Fastest first, per device type; "torch" runs anywhere and ends every list.
_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_MODULES = {"torch": "torch_rows", "native": "native", "triton": "triton_rows"}


def check_choice(backend) -> None:
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {CHOICES}")


def _module(name: str):
    """(module, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module(f"wspo_kernels.backends.{_MODULES[name]}"), None
    except ImportError as exc:
        return None, f"{exc}"


def _why_not(module, device: torch.device, dtypes) -> str:
    """None when ``module`` runs on ``device`` for every dtype in ``dtypes``, else the first reason."""
    return next((r for r in (module.unavailable_reason(device, d) for d in dtypes) if r is not None), None)


def available_backends(device: torch.device, dtype=torch.float32):
    """Names of the backends that run on ``device`` for ``dtype``, fastest first (tests and validation)."""
    order = ("triton", "native", "torch")
    return [name for name in order if (m := _module(name)[0]) is not None and _why_not(m, device, (dtype,)) is None]


def select_backend(requested: str, device: torch.device, dtype):
    """The backend module to run on tensors of ``device`` and ``dtype`` (one dtype, or a tuple of the
    operands' dtypes: mixed inputs need a backend that takes them all); ``requested`` '' means default."""
    dtypes = tuple(dtype) if isinstance(dtype, (tuple, list)) else (dtype,)
    name = requested or os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r} (from {ENV_VAR} or backend=); choose one of {CHOICES}")
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            module, _ = _module(candidate)
            if module is not None and _why_not(module, device, dtypes) is None:
                return module
    module, reason = _module(name)
    if module is not None:
        reason = _why_not(module, device, dtypes)
    if reason is not None:
        kinds = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} {kinds} tensors: {reason}")
    return module
