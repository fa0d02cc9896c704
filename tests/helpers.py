"""Shared test machinery: backends to run, input makers, and comparisons that print the worst mismatch.

Tolerances are DESIGN.md section 4: fp32 inputs: loss rel. error <= 1e-5 and gradient max-abs error
<= 1e-5 * max|grad|; bf16/fp16 inputs: loss rel. error <= 1e-3 and gradients within 2x the error of
PyTorch's own low-precision path, both measured against float64 on the same rounded inputs.
"""
import importlib.util
import os

import pytest
import torch

from wspo_kernels.dispatch import _module

LOWP = (torch.bfloat16, torch.float16)
FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-5
LOWP_LOSS_RTOL = 1e-3
LOWP_GRAD_FACTOR = 2.0


def _cpu_backends():
    names = ["torch"]
    native, _ = _module("native")
    if native is not None and native.unavailable_reason(torch.device("cpu"), torch.float32) is None:
        names.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


BACKENDS = _cpu_backends()


def backend_params(dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """(backend, dtype) pairs; the Triton interpreter runs fp32 only (it mishandles bf16)."""
    return [pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}")
            for b in BACKENDS for d in dtypes if not (b == "triton" and d != torch.float32)]


def make_logits(shape, dtype, *, kind="normal", generator=None, scale=3.0):
    """fp32 logits rounded to ``dtype``: 'normal', 'extreme' (|z| up to 1e4) or 'neginf' (some -inf)."""
    x = torch.randn(*shape, generator=generator) * scale
    if kind == "extreme":
        x = x * (1e4 / x.abs().max().clamp_min(1e-6))
    elif kind == "neginf":
        drop = torch.rand(*shape, generator=generator) < 0.3
        drop[..., 0] = False  # every row keeps a finite entry: an all -inf row has no distribution
        x[drop] = float("-inf")
    return x.to(dtype)


def make_labels(shape, vocab, *, generator=None, ignore_frac=0.25, ignore_rows=(), avoid=None):
    """Random labels with some ignored positions; ``avoid`` (logits) keeps labels off -inf entries."""
    y = torch.randint(0, vocab, shape, generator=generator)
    if avoid is not None:
        finite = torch.isfinite(avoid.float())
        y = torch.where(finite.gather(-1, y.unsqueeze(-1)).squeeze(-1), y, finite.float().argmax(-1))
    y[torch.rand(*shape, generator=generator) < ignore_frac] = -100
    for r in ignore_rows:
        y[r] = -100
    return y


def _worst(actual, expected):
    diff = (actual.double() - expected.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    idx = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.numel() else ()
    a = actual.double().reshape(-1)[idx].item() if diff.numel() else float("nan")
    e = expected.double().reshape(-1)[idx].item() if diff.numel() else float("nan")
    return (diff.max().item() if diff.numel() else 0.0), pos, a, e


def assert_close(actual, expected, *, atol, what):
    """Max-abs comparison that treats NaN as a mismatch and names the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    err, pos, a, e = _worst(actual, expected)
    assert err <= atol, f"{what}: max |diff| {err:.3e} > {atol:.3e} at {pos}: got {a!r}, expected {e!r}"


def check_loss(actual, expected, dtype, what="loss"):
    rtol = LOWP_LOSS_RTOL if dtype in LOWP else FP32_LOSS_RTOL
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, atol=rtol * max(scale, 1e-12), what=f"{what} (rel {rtol})")


def check_grad(actual, expected, dtype, lowp_grad=None, what="grad"):
    """fp32: max-abs <= 1e-5 * max|grad|; bf16/fp16: <= 2x the error of ``lowp_grad`` (PyTorch's path)."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    atol = FP32_GRAD_RTOL * max(scale, 1e-12)
    if dtype in LOWP:
        assert lowp_grad is not None, "low-precision gradients are judged against PyTorch's own path"
        torch_err = _worst(lowp_grad, expected)[0]
        atol = max(LOWP_GRAD_FACTOR * torch_err, atol)
        what = f"{what} (2x PyTorch {str(dtype).split('.')[-1]} error {torch_err:.3e})"
    assert_close(actual.to(expected.dtype) if actual.dtype != expected.dtype else actual, expected, atol=atol,
                 what=what)
