"""The package's operators, registered with ``torch.library`` so torch.compile sees one opaque op each.

Each op checks its labels against every vocabulary it reads (the only data-dependent check, so it
lives here rather than in the traced Python wrappers), picks a backend that takes every operand's
dtype (``dispatch.select_backend``) and runs that backend's row kernels.  Logits operands are
``[N, V]`` or ``[B, T, V]`` (see ``_inputs.rows_of``).  Autograd:

- ``logprobs`` / ``linear_logprobs`` save the per-row statistics (``_inputs.STATS_ROWS``) and recompute in
  their backward ops;
- ``wspo_rows`` / ``wspo_four`` return the policy gradient computed in the forward pass
  (gradient of sum_t loss_t); their backward scales row t by the incoming dL/dloss_t in place
  (``scale_rows_``, a mutating op) and hands the buffer to autograd without a copy;
- ``GradOverPolicy`` is the eager-only variant that writes that gradient over the policy logits;
- ``linear_wspo`` returns dh, dW, db of the summed loss; its backward scales them by the scalar.
  ``_linear_impl`` picks the chunked driver (default) or, opt-in, a backend's logits-free kernels (Triton).

Frozen-model ops (``weak_log_ratio``) have no autograd: the public wrappers detach their inputs.
Every backward is first-order only (``refuse_double_backward``): it is a fused kernel with no derivative
of its own, so under ``create_graph=True`` it raises instead of returning a gradient without a graph.
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import chunked_linear
from ._inputs import STATS_ROWS, acc_dtype as _acc, check_labels_range, num_rows
from .dispatch import select_backend

_LIB = "wspo_kernels"

_DOUBLE_BACKWARD = ("wspo_kernels: create_graph=True (double backward) is not supported: the backward is a fused "
                    "kernel with no derivative of its own, so second-order terms would be silently lost. Take "
                    "first-order gradients (create_graph=False); for second-order terms differentiate "
                    "wspo_kernels.reference.reference_wspo_loss (plain torch) instead.")


def refuse_double_backward():
    """Called first in every backward: autograd runs a backward with grad mode on only when asked for
    ``create_graph=True`` (``torch.autograd.grad`` or ``.backward``); AOTAutograd traces with it off."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)


def _rows_backend(backend: str, x: Tensor, *others: Optional[Tensor]):
    """The backend for ``x``'s device that takes the dtypes of ``x`` and of every other operand."""
    dtypes = tuple(dict.fromkeys(t.dtype for t in (x, *others) if t is not None))
    return select_backend(backend, x.device, dtypes)


LINEAR_ENV_VAR = "WSPO_KERNELS_LINEAR"   # auto (= chunked) | chunked | fused


def _linear_impl(rows):
    """The chunked GEMM driver (``auto``, ``chunked``), or the backend's logits-free kernels (``fused``).

    The chunked driver is the default on every device: its GEMMs are cuBLAS / MKL in a fixed order,
    bitwise reproducible, and on a GPU they run on tensor cores in bf16 with fp32 accumulation, as
    Liger's do.  The logits-free Triton kernels (opt-in) accumulate the gradient with fp32 atomics,
    non-deterministic and, by the review's estimate, slower at the Llama-3-8B shape; until a GPU run
    measures the two side by side (``benchmarks/gpu_validate.py`` times both), the deterministic design
    is the default.
    """
    choice = os.environ.get(LINEAR_ENV_VAR, "auto")
    if choice not in ("auto", "chunked", "fused"):
        raise ValueError(f"{LINEAR_ENV_VAR} must be auto, chunked or fused, got {choice!r}")
    if choice != "fused":
        return chunked_linear
    fused = getattr(rows, "linear", None)
    if fused is None:
        raise RuntimeError(f"{LINEAR_ENV_VAR}=fused: backend {rows.NAME!r} has no logits-free linear kernels")
    return fused


# ----------------------------------------------------------------------------- logprobs
@torch.library.custom_op(f"{_LIB}::logprobs", mutates_args=())
def logprobs(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tuple[Tensor, Tensor]:
    check_labels_range(labels, ignore_index, logits=logits.shape[-1])
    return _rows_backend(backend, logits).logprobs(logits, labels, ignore_index)


@logprobs.register_fake
def _(logits, labels, ignore_index, backend):
    n = num_rows(logits)
    return logits.new_empty(n, dtype=_acc(logits)), logits.new_empty(STATS_ROWS, n, dtype=_acc(logits))


@torch.library.custom_op(f"{_LIB}::logprobs_backward", mutates_args=())
def logprobs_backward(grad_logp: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, ignore_index: int,
                      backend: str) -> Tensor:
    rows = _rows_backend(backend, logits)
    return rows.logprobs_backward(logits, labels, stats, grad_logp, ignore_index, _grad_buffer(logits, True, rows))


@logprobs_backward.register_fake
def _(grad_logp, logits, labels, stats, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logprobs_setup(ctx, inputs, output):
    logits, labels, ignore_index, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _logprobs_bwd(ctx, grad_logp, grad_stats):
    refuse_double_backward()
    logits, labels, stats = ctx.saved_tensors
    grad = logprobs_backward(grad_logp.contiguous(), logits, labels, stats, ctx.ignore_index, ctx.backend)
    return grad, None, None, None


logprobs.register_autograd(_logprobs_bwd, setup_context=_logprobs_setup)


# ----------------------------------------------------------------------------- weak log-ratio
@torch.library.custom_op(f"{_LIB}::weak_log_ratio", mutates_args=())
def weak_log_ratio(aligned: Tensor, base: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    check_labels_range(labels, ignore_index, weak_aligned=aligned.shape[-1], weak_base=base.shape[-1])
    return _rows_backend(backend, aligned, base).weak_log_ratio(aligned, base, labels, ignore_index)


@weak_log_ratio.register_fake
def _(aligned, base, labels, ignore_index, backend):
    return aligned.new_empty(num_rows(aligned), dtype=_acc(aligned, base))


# ----------------------------------------------------------------------------- WSPO from logits
def _grad_buffer(policy: Tensor, compute_grad: bool, rows=None) -> Tensor:
    """A gradient buffer of the policy operand's shape ([N, V] or [B, T, V]), contiguous: from the
    backend's buffer cache where it keeps one (``rows.empty_grad_like``: native CPU), else fresh."""
    if not compute_grad:
        return policy.new_empty(0)
    new = getattr(rows, "empty_grad_like", None)
    return new(policy) if new is not None else torch.empty_like(policy, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_LIB}::wspo_rows", mutates_args=())
def wspo_rows(policy: Tensor, labels: Tensor, k: Tensor, weight: Tensor, gamma: float, ignore_index: int,
              compute_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    grad = _grad_buffer(policy, compute_grad, _rows_backend(backend, policy))
    loss, logp = run_wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad if compute_grad else None,
                               backend)
    return loss, logp, grad


def run_wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad, backend):
    """Check labels, pick the backend, run its wspo_rows kernel (gradient into ``grad`` if given)."""
    check_labels_range(labels, ignore_index, policy_logits=policy.shape[-1])
    return _rows_backend(backend, policy).wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad)


@wspo_rows.register_fake
def _(policy, labels, k, weight, gamma, ignore_index, compute_grad, backend):
    n = labels.shape[0]
    return policy.new_empty(n, dtype=_acc(policy)), policy.new_empty(n, dtype=_acc(policy)), \
        _grad_buffer(policy, compute_grad)


@torch.library.custom_op(f"{_LIB}::wspo_four", mutates_args=())
def wspo_four(policy: Tensor, ref: Tensor, aligned: Tensor, base: Tensor, labels: Tensor, weight: Tensor,
              gamma: float, ignore_index: int, compute_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    grad = _grad_buffer(policy, compute_grad, _rows_backend(backend, policy, ref, aligned, base))
    loss, logps = run_wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index,
                                grad if compute_grad else None, backend)
    return loss, logps, grad


def run_wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad, backend):
    """Check labels against all four vocabularies, run the backend's one-pass kernel."""
    check_labels_range(labels, ignore_index, policy_logits=policy.shape[-1], ref=ref.shape[-1],
                       weak_aligned=aligned.shape[-1], weak_base=base.shape[-1])
    return _rows_backend(backend, policy, ref, aligned, base).wspo_four(policy, ref, aligned, base, labels, weight,
                                                                        gamma, ignore_index, grad)


@wspo_four.register_fake
def _(policy, ref, aligned, base, labels, weight, gamma, ignore_index, compute_grad, backend):
    n = labels.shape[0]
    return policy.new_empty(n, dtype=_acc(policy)), policy.new_empty(4, n, dtype=_acc(policy)), \
        _grad_buffer(policy, compute_grad)


_CONSUMED = ("the gradient saved by the forward pass was consumed by a first backward (it is scaled in place "
             "to keep memory at one logits tensor); backward through the same graph twice is not supported")


def _save_grads(ctx, grads):
    """Keep forward-pass gradients on ctx, detached: backward hands them over without a copy.

    Not ``save_for_backward``: a saved tensor stays referenced by the graph, so autograd would
    have to clone it when accumulating into ``.grad`` (one more N x V buffer).
    """
    ctx.grads = [g.detach() for g in grads]
    # The gradient outputs themselves get no incoming gradient: don't materialise zeros of their size.
    ctx.set_materialize_grads(False)


def _take_grads(ctx):
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(_CONSUMED)
    # float64 is the verification dtype: keep the graph reusable there (gradcheck, retain_graph).
    reusable = any(g.dtype == torch.float64 for g in grads)
    if not reusable:
        ctx.grads = None
    return grads, reusable


def _save_grad(ctx, inputs, output):
    _save_grads(ctx, output[2:3])
    ctx.num_inputs = len(inputs)
    ctx.backend = inputs[-1]


@torch.library.custom_op(f"{_LIB}::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, scale: Tensor, backend: str) -> None:
    """grad[i, :] *= scale[i] in float32, in place (no temporary of grad's size for bf16/fp16)."""
    _rows_backend(backend, grad).scale_rows_(grad, scale)


def _per_row(scale: Tensor, grad: Tensor) -> Tensor:
    """[N] row scales shaped to broadcast over a [N, V] or [B, T, V] gradient."""
    return scale.reshape(*grad.shape[:-1], 1)


def _scale_saved_grad(ctx, grad_loss, *unused):
    refuse_double_backward()
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    (grad,), reusable = _take_grads(ctx)
    if reusable:
        return (grad * _per_row(grad_loss, grad),) + (None,) * (ctx.num_inputs - 1)
    scale_rows_(grad, grad_loss.contiguous(), ctx.backend)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


wspo_rows.register_autograd(_scale_saved_grad, setup_context=_save_grad)
wspo_four.register_autograd(_scale_saved_grad, setup_context=_save_grad)


class GradOverPolicy(torch.autograd.Function):
    """Opt-in in-place variant: the policy gradient is written over the policy logits themselves.

    ``run`` is ``run_wspo_rows`` / ``run_wspo_four`` with every argument but ``grad`` bound; it is
    called with the policy rows as the gradient buffer, so no N x V tensor is allocated.  The
    logits' values are destroyed (their version counter is bumped, so autograd refuses a graph that
    saved them).  Eager only: torch.compile callers get the regular op (same values).
    """

    @staticmethod
    def forward(ctx, policy, run, backend):
        loss, logps = run(grad=policy)
        torch.autograd.graph.increment_version(policy)
        _save_grads(ctx, [policy])
        ctx.backend = backend
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, grad_logps):
        refuse_double_backward()
        if grad_loss is None:
            return None, None, None
        (grad,), reusable = _take_grads(ctx)
        if reusable:
            return grad * _per_row(grad_loss, grad), None, None
        scale_rows_(grad, grad_loss.contiguous(), ctx.backend)
        return grad, None, None


# ----------------------------------------------------------------------------- linear forms
@torch.library.custom_op(f"{_LIB}::linear_logprobs", mutates_args=())
def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                    backend: str) -> Tuple[Tensor, Tensor]:
    check_labels_range(labels, ignore_index, lm_head_weight=weight.shape[0])
    rows = _rows_backend(backend, hidden, weight, bias)
    return _linear_impl(rows).linear_logprobs(rows, hidden, weight, bias, labels, ignore_index)


@linear_logprobs.register_fake
def _(hidden, weight, bias, labels, ignore_index, backend):
    n, acc = hidden.shape[0], _acc(hidden, weight)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(STATS_ROWS, n, dtype=acc)


def _grad_likes(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grad_hidden: bool, grad_weight: bool):
    """Fake (dh, dW, db): an empty tensor stands for a gradient that is not computed."""
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if grad_weight and bias is not None else hidden.new_empty(0))


@torch.library.custom_op(f"{_LIB}::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             labels: Tensor, stats: Tensor, ignore_index: int, grad_hidden: bool, grad_weight: bool,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    rows = _rows_backend(backend, hidden, weight, bias)
    return _linear_impl(rows).linear_logprobs_backward(rows, grad_logp, hidden, weight, bias, labels, stats,
                                                       ignore_index, grad_hidden, grad_weight)


@linear_logprobs_backward.register_fake
def _(grad_logp, hidden, weight, bias, labels, stats, ignore_index, grad_hidden, grad_weight, backend):
    return _grad_likes(hidden, weight, bias, grad_hidden, grad_weight)


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _linear_logprobs_bwd(ctx, grad_logp, grad_stats):
    refuse_double_backward()
    hidden, weight, bias, labels, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, dw, db = linear_logprobs_backward(grad_logp.contiguous(), hidden, weight, bias, labels, stats,
                                          ctx.ignore_index, need[0], need[1] or need[2], ctx.backend)
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None)


linear_logprobs.register_autograd(_linear_logprobs_bwd, setup_context=_linear_logprobs_setup)


@torch.library.custom_op(f"{_LIB}::linear_wspo", mutates_args=())
def linear_wspo(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, k: Tensor,
                token_weight: Tensor, gamma: float, ignore_index: int, grad_hidden: bool, grad_weight: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_labels_range(labels, ignore_index, lm_head_weight=weight.shape[0])
    rows = _rows_backend(backend, hidden, weight, bias)
    return _linear_impl(rows).linear_wspo(rows, hidden, weight, bias, labels, k, token_weight, gamma, ignore_index,
                                          grad_hidden, grad_weight)


@linear_wspo.register_fake
def _(hidden, weight, bias, labels, k, token_weight, gamma, ignore_index, grad_hidden, grad_weight, backend):
    acc = _acc(hidden, weight)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc),
            *_grad_likes(hidden, weight, bias, grad_hidden, grad_weight))


def _linear_wspo_setup(ctx, inputs, output):
    ctx.computed = (inputs[8], inputs[9], inputs[9] and inputs[2] is not None)
    _save_grads(ctx, output[2:])


def _linear_wspo_bwd(ctx, grad_loss, *unused):
    refuse_double_backward()
    if grad_loss is None:
        return (None,) * 11
    grads, reusable = _take_grads(ctx)
    # Gradients were written for d(sum loss); scale them by the incoming scalar.
    scaled = tuple((g * grad_loss if reusable else g.mul_(grad_loss)) if done else None
                   for g, done in zip(grads, ctx.computed))
    return scaled + (None,) * 8


linear_wspo.register_autograd(_linear_wspo_bwd, setup_context=_linear_wspo_setup)
