"""Public functions (DESIGN.md section 2): shape checks, the row layout, then one op each.

Frozen-model inputs (``ref``, ``weak_aligned``, ``weak_base``) are each one of
- logits ``[B, T, V_m]`` (or ``[N, V_m]``), V_m may differ between models;
- per-token logps exactly as ``token_logprobs(..., shift=shift)`` returns them;
- a ``(hidden, weight)`` or ``(hidden, weight, bias)`` tuple: that model's final hidden states and lm_head.
They are constants of the loss: no gradient flows into them.

Sequences without a single response token contribute 0 and are left out of the mean (B' counts
only sequences with at least one token); the official implementation returns NaN there.
"""
import functools
from typing import NamedTuple

import torch

from . import ops, vocab_parallel
from ._inputs import (acc_dtype, check_flag, check_float, check_gamma, check_labels_range, check_normalizer,
                      check_reduction, check_same_device, make_layout, rows_of, writable_in_place)
from .dispatch import check_choice

__all__ = ["token_logprobs", "linear_token_logprobs", "weak_log_ratio", "wspo_loss", "linear_wspo_loss",
           "WSPOOutput"]


class WSPOOutput(NamedTuple):
    """``return_metrics=True``: the loss and detached per-token metrics (0 on ignored tokens)."""
    loss: torch.Tensor
    policy_logps: torch.Tensor       # l^policy_t
    strong_log_ratio: torch.Tensor   # Δs_t = l^policy_t - l^ref_t   (implicit reward: gamma * Δs_t)
    weak_log_ratio: torch.Tensor     # Δw_t = l^aligned_t - l^base_t
    mask: torch.Tensor               # True on tokens that count


def _linear_rows(hidden, weight, bias, layout, name):
    """Check a (hidden, lm_head weight, bias) triple against the label grid; hidden as [N, H] rows."""
    check_float(hidden, f"{name} hidden")
    check_float(weight, f"{name} weight")
    if bias is not None:
        check_float(bias, f"{name} bias")
    check_same_device(layout.labels, **{f"{name} hidden": hidden, f"{name} weight": weight, f"{name} bias": bias})
    grid = layout.grid
    if hidden.dim() != len(grid) + 1 or tuple(hidden.shape[:-1]) != grid:
        raise ValueError(f"{name} hidden must have shape {grid + ('H',)} to match labels, got {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{name} hidden has hidden size H=0")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{name} weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    return hidden.reshape(-1, hidden.shape[-1])


def _frozen(x, layout, name, vocab_group=None):
    """A frozen model's input, checked: ('logits', [N, V] rows, name), ('linear', (h [N, H], weight, bias),
    name) or ('logps', [N] float, name).  Nothing is computed yet (``_logps_of`` does)."""
    if isinstance(x, (tuple, list)):
        if len(x) not in (2, 3):
            raise ValueError(f"{name} as a tuple must be (hidden, weight) or (hidden, weight, bias)")
        hidden, weight, bias = (*x, None)[:3]
        h = _linear_rows(hidden, weight, bias, layout, name)
        if vocab_group is None:  # sharded: checked against the global vocabulary by vocab_parallel
            check_labels_range(layout.labels, layout.ignore_index, **{name: weight.shape[0]})  # names the model
        return "linear", (h.detach(), weight.detach(), None if bias is None else bias.detach()), name
    check_float(x, name)
    check_same_device(layout.labels, **{name: x})
    x = x.detach()
    if x.dim() == len(layout.token_shape) + 1:
        return "logits", rows_of(x, layout, name), name
    if tuple(x.shape) != tuple(layout.token_shape):
        raise ValueError(
            f"{name} must be logits of shape {layout.grid + ('V',)} or per-token logps of shape "
            f"{tuple(layout.token_shape)} (as token_logprobs returns them with shift={layout.shift}); "
            f"got {tuple(x.shape)}")
    return "logps", layout.from_user(x, name), name


def _logps_of(frozen, layout, backend, vocab_group=None):
    kind, value, name = frozen
    if kind == "logps":
        return value
    if kind == "linear":
        with torch.no_grad():
            if vocab_group is not None:
                return vocab_parallel.linear_logprobs(*value, layout.labels, layout.ignore_index, backend, vocab_group,
                                                      name)
            return ops.linear_logprobs(*value, layout.labels, layout.ignore_index, backend)[0]
    if vocab_group is not None:
        with torch.no_grad():
            return vocab_parallel.logprobs(value, layout.labels, layout.ignore_index, backend, vocab_group, name)
    # The one-pass and weak-pair ops check labels against each model by name; the generic logprobs op
    # only knows "logits", so name the model here.
    check_labels_range(layout.labels, layout.ignore_index, **{name: value.shape[-1]})
    with torch.no_grad():
        return ops.logprobs(value, layout.labels, layout.ignore_index, backend)[0]


def _frozen_all(ref, weak_aligned, weak_base, layout, vocab_group=None):
    return tuple(_frozen(x, layout, name, vocab_group)
                 for x, name in ((ref, "ref"), (weak_aligned, "weak_aligned"), (weak_base, "weak_base")))


def _frozen_terms_from(r, a, w, layout, backend, vocab_group=None):
    """(l^ref [N], Δw [N]) from resolved frozen inputs; aligned and base logits are read in one pass."""
    if a[0] == w[0] == "logits" and vocab_group is None:
        delta_w = ops.weak_log_ratio(a[1], w[1], layout.labels, layout.ignore_index, backend)
    else:
        delta_w = _logps_of(a, layout, backend, vocab_group) - _logps_of(w, layout, backend, vocab_group)
    return _logps_of(r, layout, backend, vocab_group), delta_w


def _policy_constant(gamma, lr, delta_w, layout, acc):
    """k_t = gamma * l^ref_t + Δw_t, 0 on ignored rows (whatever precomputed logps hold there: NaN too)."""
    k = gamma * lr.to(acc) + delta_w.to(acc)
    return torch.where(layout.labels != layout.ignore_index, k, torch.zeros((), dtype=acc, device=k.device))


def _prepare(labels, gamma, ignore_index, shift, reduction, normalizer, cu_seqlens, backend):
    check_choice(backend)
    gamma = check_gamma(gamma)
    check_reduction(reduction)
    normalizer = check_normalizer(normalizer, reduction)
    layout = make_layout(labels, shift=shift, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    return gamma, normalizer, layout


def _reduce(loss_t, layout, reduction):
    return layout.per_seq_sum(loss_t) if reduction == "none" else loss_t.sum()


def _with_metrics(loss, logp, lr, delta_w, layout):
    logp, lr, delta_w = logp.detach(), lr.detach(), delta_w.detach()
    mask = layout.labels != layout.ignore_index
    zero = torch.zeros_like(logp)
    strong = torch.where(mask, logp - lr.to(logp.dtype), zero)
    weak = torch.where(mask, delta_w.to(logp.dtype), zero)
    return WSPOOutput(loss, layout.to_user(logp), layout.to_user(strong), layout.to_user(weak), layout.to_user(mask))


def token_logprobs(logits, labels, *, ignore_index=-100, shift=False, cu_seqlens=None, vocab_group=None,
                   backend=None):
    """log softmax(logits)[label] per token, float32 (float64 for float64 logits), 0 where ignored.

    ``[B, T, V]`` logits with ``[B, T]`` labels give ``[B, T]`` (``[B, T-1]`` with ``shift=True``:
    logits at t score label t+1).  Differentiable w.r.t. ``logits`` (the backward recomputes the
    softmax from the saved log-sum-exp; no probabilities are stored).  ``vocab_group``: a process group
    across which the vocabulary is sharded (``logits`` is this rank's shard; see ``vocab_parallel``).
    """
    with vocab_parallel.agreed(vocab_group):  # every rank passes its checks, or every rank raises
        check_choice(backend)
        layout = make_layout(labels, shift=shift, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
        rows = rows_of(logits, layout, "logits")
    return layout.to_user(_policy_logps(rows, layout, backend or "", vocab_group, "logits"))


def _policy_logps(rows, layout, backend, vocab_group, name):
    if vocab_group is not None:
        return vocab_parallel.logprobs(rows, layout.labels, layout.ignore_index, backend, vocab_group, name)
    return ops.logprobs(rows, layout.labels, layout.ignore_index, backend)[0]


def linear_token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, shift=False, cu_seqlens=None,
                          vocab_group=None, reduce_hidden_grad=True, backend=None):
    """token_logprobs of ``hidden @ weight.T + bias`` without materialising more than a chunk of logits.

    Differentiable w.r.t. hidden, weight and bias (fp32 accumulation of the weight gradient).  With
    ``vocab_group``, ``weight`` / ``bias`` are this rank's vocabulary shard and the gradient of the
    replicated ``hidden`` is summed over the group (``reduce_hidden_grad=False``: the caller sums it).
    """
    with vocab_parallel.agreed(vocab_group):
        check_choice(backend)
        check_flag(reduce_hidden_grad, "reduce_hidden_grad")
        layout = make_layout(labels, shift=shift, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
        h = _linear_rows(hidden, weight, bias, layout, "linear_token_logprobs")
    return layout.to_user(_policy_linear_logps(h, weight, bias, layout, backend or "", vocab_group, reduce_hidden_grad))


def _policy_linear_logps(h, weight, bias, layout, backend, vocab_group, reduce_hidden_grad):
    if vocab_group is not None:
        return vocab_parallel.linear_logprobs(h, weight, bias, layout.labels, layout.ignore_index, backend,
                                              vocab_group, "lm_head", reduce_hidden_grad)
    return ops.linear_logprobs(h, weight, bias, layout.labels, layout.ignore_index, backend)[0]


def weak_log_ratio(aligned_logits, base_logits, labels, *, ignore_index=-100, shift=False, cu_seqlens=None,
                   vocab_group=None, backend=None):
    """Δw_t = l^aligned_t - l^base_t from both models' logits in one pass (vocab sizes may differ).

    The weak models are frozen: the result carries no gradient.
    """
    with vocab_parallel.agreed(vocab_group):
        check_choice(backend)
        layout = make_layout(labels, shift=shift, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
        a = rows_of(aligned_logits, layout, "aligned_logits").detach()
        w = rows_of(base_logits, layout, "base_logits").detach()
    if vocab_group is not None:
        with torch.no_grad():
            return layout.to_user(_policy_logps(a, layout, backend or "", vocab_group, "aligned_logits")
                                  - _policy_logps(w, layout, backend or "", vocab_group, "base_logits"))
    return layout.to_user(ops.weak_log_ratio(a, w, layout.labels, layout.ignore_index, backend or ""))


def wspo_loss(policy_logits, labels, *, ref, weak_aligned, weak_base, gamma=0.1, ignore_index=-100, shift=True,
              reduction="mean", normalizer=None, cu_seqlens=None, return_metrics=False, inplace_grad=False,
              vocab_group=None, backend=None):
    """The WSPO loss (DESIGN.md section 1) from the policy's logits; gradient w.r.t. the policy only.

    When ``ref``, ``weak_aligned`` and ``weak_base`` are all logits, one fused pass reads the four
    logits once and writes the policy gradient in the same pass ("mean" / "sum"; "none" backprops
    through the policy's logps, so a per-sequence upstream gradient rounds the gradient only once).
    ``reduction`` is "mean" (over sequences with at least one token, or divided by ``normalizer``),
    "sum" or "none" (``[B]``).
    ``return_metrics=True`` returns a :class:`WSPOOutput`.

    ``inplace_grad=True`` writes the policy gradient over ``policy_logits`` during the forward pass
    (no extra N x V memory; the logits' values are gone afterwards, use them before or not at all).
    That holds for any layout whose elements each have their own memory (contiguous, vocab-sliced,
    transposed); logits with a strided vocabulary are copied first and the gradient is written over
    the copy, and overlapping memory (an expanded tensor) gets a fresh gradient buffer.  With
    ``reduction="none"`` the per-sequence upstream gradient scales the written gradient afterwards
    (bf16/fp16: rounded twice, up to one ulp).  Eager mode only: under torch.compile the regular path
    runs, with the same values.

    ``vocab_group``: the vocabulary is sharded across this process group; ``policy_logits`` and any
    frozen logits / lm_heads are this rank's shards (frozen logps are replicated).  The gradient is then
    computed in the backward pass (after the per-row statistics are combined); not with ``inplace_grad``.
    """
    with vocab_parallel.agreed(vocab_group):
        check_flag(return_metrics, "return_metrics")
        check_flag(inplace_grad, "inplace_grad")
        if inplace_grad and vocab_group is not None:
            raise ValueError("inplace_grad=True is not supported with vocab_group (the gradient needs the whole "
                             "row's statistics, known only after the all-reduce)")
        gamma, normalizer, layout = _prepare(labels, gamma, ignore_index, shift, reduction, normalizer, cu_seqlens,
                                             backend)
        policy = rows_of(policy_logits, layout, "policy_logits")
        r, a, w = _frozen_all(ref, weak_aligned, weak_base, layout, vocab_group)
    backend = backend or ""
    acc = acc_dtype(policy)
    w_t = layout.token_weights(reduction, normalizer, acc)
    compute_grad = torch.is_grad_enabled() and policy_logits.requires_grad
    in_place = inplace_grad and compute_grad and not torch.compiler.is_compiling() and writable_in_place(policy)
    # Per-sequence losses get per-sequence upstream gradients: a gradient written in the forward pass
    # would be scaled, and in bf16/fp16 rounded, a second time.  So "none" backprops through the
    # policy's logps (one rounding), unless the gradient has to be written in place.
    grad_in_forward = vocab_group is None and (reduction != "none" or in_place or not compute_grad)
    one_pass = grad_in_forward and r[0] == a[0] == w[0] == "logits"
    if one_pass:
        lr = delta_w = None  # come out of the kernel
    else:
        lr, delta_w = _frozen_terms_from(r, a, w, layout, backend, vocab_group)
        k = _policy_constant(gamma, lr, delta_w, layout, acc)
    if not grad_in_forward:
        out = _policy_logps(policy, layout, backend, vocab_group, "policy_logits")
        d = gamma * out - k
        loss_t = w_t * d * d
    elif in_place:
        if one_pass:
            run = functools.partial(ops.run_wspo_four, policy, r[1], a[1], w[1], layout.labels, w_t, gamma,
                                    layout.ignore_index, backend=backend)
        else:
            run = functools.partial(ops.run_wspo_rows, policy, layout.labels, k, w_t, gamma, layout.ignore_index,
                                    backend=backend)
        loss_t, out = ops.GradOverPolicy.apply(policy, run, backend)
    elif one_pass:
        loss_t, out, _ = ops.wspo_four(policy, r[1], a[1], w[1], layout.labels, w_t, gamma, layout.ignore_index,
                                       compute_grad, backend)
    else:
        loss_t, out, _ = ops.wspo_rows(policy, layout.labels, k, w_t, gamma, layout.ignore_index, compute_grad, backend)
    if one_pass:
        logp, lr, delta_w = out[0], out[1], out[2] - out[3]
    else:
        logp = out
    loss = _reduce(loss_t, layout, reduction)
    return _with_metrics(loss, logp, lr, delta_w, layout) if return_metrics else loss


def linear_wspo_loss(policy_hidden, lm_head_weight, labels, *, ref, weak_aligned, weak_base, gamma=0.1, bias=None,
                     ignore_index=-100, shift=True, reduction="mean", normalizer=None, cu_seqlens=None,
                     return_metrics=False, vocab_group=None, reduce_hidden_grad=True, backend=None):
    """The WSPO loss from the policy's final hidden states and lm_head, never materialising the logits.

    Gradients w.r.t. ``policy_hidden``, ``lm_head_weight`` and ``bias`` (fp32 accumulation).  For
    "mean"/"sum" the gradient is written during the forward pass; "none" recomputes in the backward.
    ``vocab_group``: ``lm_head_weight`` / ``bias`` (and frozen lm_heads) are this rank's vocabulary
    shards; the gradient of the replicated hidden states is summed over the group unless
    ``reduce_hidden_grad=False`` (a framework that reduces it itself, as Megatron's tensor-parallel regions).
    """
    with vocab_parallel.agreed(vocab_group):
        check_flag(return_metrics, "return_metrics")
        check_flag(reduce_hidden_grad, "reduce_hidden_grad")
        gamma, normalizer, layout = _prepare(labels, gamma, ignore_index, shift, reduction, normalizer, cu_seqlens,
                                             backend)
        h = _linear_rows(policy_hidden, lm_head_weight, bias, layout, "policy")
        r, a, w = _frozen_all(ref, weak_aligned, weak_base, layout, vocab_group)
    backend = backend or ""
    acc = acc_dtype(h)
    w_t = layout.token_weights(reduction, normalizer, acc)
    lr, delta_w = _frozen_terms_from(r, a, w, layout, backend, vocab_group)
    k = _policy_constant(gamma, lr, delta_w, layout, acc)
    if reduction == "none" or vocab_group is not None:  # backprop through the logps
        logp = _policy_linear_logps(h, lm_head_weight, bias, layout, backend, vocab_group, reduce_hidden_grad)
        d = gamma * logp - k
        loss = _reduce(w_t * d * d, layout, reduction)
    else:
        grad_on = torch.is_grad_enabled()
        grad_hidden = grad_on and policy_hidden.requires_grad
        grad_weight = grad_on and (lm_head_weight.requires_grad or (bias is not None and bias.requires_grad))
        loss, logp, *_ = ops.linear_wspo(h, lm_head_weight, bias, layout.labels, k, w_t, gamma, layout.ignore_index,
                                         grad_hidden, grad_weight, backend)
    return _with_metrics(loss, logp, lr, delta_w, layout) if return_metrics else loss
