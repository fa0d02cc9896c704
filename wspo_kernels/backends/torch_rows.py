"""Portable backend: the row kernels in plain PyTorch, chunked so nothing of size N*V is allocated.

This module is also the readable statement of every algorithm the other backends implement.  All
kernels work on rows: ``logits [N, V]`` (unit stride in V), ``labels [N]`` already shifted, rows with
``labels == ignore_index`` contribute 0.  Accumulation is float32 (float64 for float64 inputs).

Online log-sum-exp (one read of the row, in blocks of ``VOCAB_BLOCK`` columns): each block's
log-sum-exp is merged into a running one,

    lse' = logaddexp(lse, logsumexp_{j in block} z_j)        (lse starts at -inf)

the label logit z_y is gathered from the same rows, and ``logp = z_y - lse``.

WSPO gradient in forward: with ``w_t`` the per-token weight of the reduction (m_t / n_b / B') and
``k_t = gamma * l^ref_t + l^aligned_t - l^base_t`` (constants for the policy),

    d_t = gamma * logp_t - k_t,   loss_t = w_t * d_t^2,   c_t = 2 * gamma * w_t * d_t
    dL/dz_{t,v} = c_t * (1[v = y_t] - exp(z_{t,v} - lse_t))

so the policy row is swept twice (lse, then the gradient) and nothing is saved but the gradient.

The contract every backend module implements:

    logprobs(logits, labels, ignore_index) -> (logp [N], lse [N])
    logprobs_backward(logits, labels, lse, grad_logp, ignore_index, out) -> out      (dL/dlogits)
    weak_log_ratio(aligned, base, labels, ignore_index) -> l^a - l^w [N]            (vocab may differ)
    wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad) -> (loss_t [N], logp [N])
    wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad)
        -> (loss_t [N], logps [4, N])            (rows of logps: policy, ref, aligned, base)
    scale_rows_(grad, scale)                     grad[i, :] *= scale[i], in place, float32 math

``grad`` is an ``[N, V]`` tensor the gradient is written into (it may be ``policy`` itself, for an
in-place gradient), or None when no gradient is needed.
"""
import torch

from .._inputs import acc_dtype as _acc_dtype

NAME = "torch"
ROW_BLOCK = 128        # rows per step: bounds the fp32 temporaries to ROW_BLOCK * VOCAB_BLOCK elements
VOCAB_BLOCK = 8192     # columns per step of the online log-sum-exp


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    """None: this backend runs everywhere PyTorch does."""
    return None


def _row_blocks(n_rows: int):
    for r0 in range(0, n_rows, ROW_BLOCK):
        yield slice(r0, min(r0 + ROW_BLOCK, n_rows))


def _lse_and_logp(x: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Online log-sum-exp over vocab blocks for a block of rows; returns (lse, logp), logp 0 if ignored."""
    acc = _acc_dtype(x)
    lse = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)
    for v0 in range(0, x.shape[1], VOCAB_BLOCK):
        lse = torch.logaddexp(lse, torch.logsumexp(x[:, v0:v0 + VOCAB_BLOCK].to(acc), dim=1))
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    z_y = x.gather(1, safe[:, None]).squeeze(1).to(acc)
    logp = torch.where(mask, z_y - lse, torch.zeros_like(lse))
    return lse, logp


def _write_grad(x, labels, lse, coef, ignore_index, out):
    """out = coef * (onehot(label) - softmax(x)), block by block; rows with coef == 0 get zeros.

    ``out`` may be ``x`` itself: each block is read before it is overwritten.
    """
    acc = _acc_dtype(x)
    mask = labels != ignore_index
    # Ignored rows get exp(z - inf) = 0: their lse may be anything (-inf, or unrelated to huge z).
    safe_lse = torch.where(mask, lse, torch.full_like(lse, float("inf")))[:, None]
    neg_coef = torch.where(mask, -coef, torch.zeros_like(coef))[:, None]
    for v0 in range(0, x.shape[1], VOCAB_BLOCK):
        o = out[:, v0:v0 + VOCAB_BLOCK]
        # Write straight into ``out`` when it already has the accumulation dtype.
        g = o if o.dtype == acc else torch.empty(o.shape, dtype=acc, device=o.device)
        torch.sub(x[:, v0:v0 + VOCAB_BLOCK].to(acc), safe_lse, out=g).exp_().mul_(neg_coef)
        local = labels - v0
        hit = mask & (local >= 0) & (local < g.shape[1])
        g.scatter_add_(1, torch.where(hit, local, torch.zeros_like(local))[:, None],
                       torch.where(hit[:, None], -neg_coef, torch.zeros_like(neg_coef)))
        if g is not o:
            o.copy_(g)
    return out


def logprobs(logits, labels, ignore_index):
    acc = _acc_dtype(logits)
    n = logits.shape[0]
    lse = torch.empty(n, dtype=acc, device=logits.device)
    logp = torch.empty(n, dtype=acc, device=logits.device)
    for r in _row_blocks(n):
        lse[r], logp[r] = _lse_and_logp(logits[r], labels[r], ignore_index)
    return logp, lse


def logprobs_backward(logits, labels, lse, grad_logp, ignore_index, out):
    for r in _row_blocks(logits.shape[0]):
        _write_grad(logits[r], labels[r], lse[r], grad_logp[r].to(lse.dtype), ignore_index, out[r])
    return out


def weak_log_ratio(aligned, base, labels, ignore_index):
    out = torch.empty(aligned.shape[0], dtype=_acc_dtype(aligned), device=aligned.device)
    for r in _row_blocks(aligned.shape[0]):
        _, la = _lse_and_logp(aligned[r], labels[r], ignore_index)
        _, lw = _lse_and_logp(base[r], labels[r], ignore_index)
        out[r] = la - lw.to(la.dtype)
    return out


def _policy_block(policy, labels, k, weight, gamma, ignore_index, grad):
    lse, logp = _lse_and_logp(policy, labels, ignore_index)
    d = gamma * logp - k.to(logp.dtype)
    w = weight.to(logp.dtype)
    if grad is not None:
        _write_grad(policy, labels, lse, 2.0 * gamma * w * d, ignore_index, grad)
    return w * d * d, logp


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    n = policy.shape[0]
    acc = _acc_dtype(policy)
    loss = torch.empty(n, dtype=acc, device=policy.device)
    logp = torch.empty(n, dtype=acc, device=policy.device)
    for r in _row_blocks(n):
        loss[r], logp[r] = _policy_block(policy[r], labels[r], k[r], weight[r], gamma, ignore_index,
                                         None if grad is None else grad[r])
    return loss, logp


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    n = policy.shape[0]
    acc = _acc_dtype(policy)
    loss = torch.empty(n, dtype=acc, device=policy.device)
    logps = torch.empty(4, n, dtype=acc, device=policy.device)
    for r in _row_blocks(n):
        for i, frozen in enumerate((ref, aligned, base), start=1):
            logps[i, r] = _lse_and_logp(frozen[r], labels[r], ignore_index)[1]
        k = gamma * logps[1, r] + logps[2, r] - logps[3, r]
        loss[r], logps[0, r] = _policy_block(policy[r], labels[r], k, weight[r], gamma, ignore_index,
                                             None if grad is None else grad[r])
    return loss, logps


def scale_rows_(grad, scale):
    acc = _acc_dtype(grad)
    if grad.dtype == acc:
        return grad.mul_(scale.to(acc)[:, None])
    for r in _row_blocks(grad.shape[0]):  # bounded float temporaries for bf16 / fp16 gradients
        grad[r].copy_(grad[r].to(acc).mul_(scale[r, None].to(acc)))
    return grad
