"""Portable backend: the row kernels in plain PyTorch, chunked so nothing of size N*V is allocated.

This module is also the readable statement of every algorithm the other backends implement.  All
kernels work on rows: logits ``[N, V]`` or ``[B, T, V]`` (unit stride in V, any strides across rows:
the public functions pass a view as it is whenever a kernel can address it, see ``_inputs.rows_of``),
``labels [N]`` already shifted, rows with ``labels == ignore_index`` contribute 0 and their values
are never used (NaN or inf there changes nothing).  Accumulation is float32 (float64 for float64).

Row statistics, one read of the row in blocks of ``VOCAB_BLOCK`` columns, merged online:

    m' = max(m, max_{j in block} z_j);   s' = s * exp(m - m') + sum_{j in block} exp(z_j - m')

with the label's own term left out of the sum: r = sum_{v != y} exp(z_v - m), s = r + exp(z_y - m).
The statistics ("stats", ``[3, N]``: m, s, r) are never folded into lse = m + log(s): for logits with
a large common offset that sum rounds to the offset's ulp, and 1 - p_y = r / s keeps its relative
accuracy as p_y -> 1, where 1 - exp(logp) cancels to 0:

    q = r / s = 1 - p_y,   logp = log1p(-q) if q < 1/2 else (z_y - m) - log(s),   p_v = exp(z_v - m) / s

WSPO gradient in forward: with ``w_t`` the per-token weight of the reduction (m_t / n_b / B') and
``k_t = gamma * l^ref_t + l^aligned_t - l^base_t`` (constants for the policy),

    d_t = gamma * logp_t - k_t,   loss_t = w_t * d_t^2,   c_t = 2 * gamma * w_t * d_t
    dL/dz_{t,v} = -c_t * p_{t,v}   (v != y_t),    dL/dz_{t,y} = c_t * q_t

so the policy row is swept twice (statistics, then the gradient) and nothing is saved but the gradient.

The contract every backend module implements:

    logprobs(logits, labels, ignore_index) -> (logp [N], stats [3, N])   stats: (m, s, r); (0, 1, 0) if ignored
    logprobs_backward(logits, labels, stats, grad_logp, ignore_index, out) -> out      (dL/dlogits)
    weak_log_ratio(aligned, base, labels, ignore_index) -> l^a - l^w [N]            (vocab may differ)
    wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad) -> (loss_t [N], logp [N])
    wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad)
        -> (loss_t [N], logps [4, N])            (rows of logps: policy, ref, aligned, base)
    scale_rows_(grad, scale)                     grad[i, :] *= scale[i], in place, float32 math

``grad`` / ``out`` is a tensor of the logits' shape (``[N, V]`` or ``[B, T, V]``, unit stride in V,
rows that do not overlap) the gradient is written into -- it may be ``policy`` itself, for an
in-place gradient -- or None when no gradient is needed.  Inputs may differ in dtype.
"""
import torch

from .._inputs import acc_dtype as _acc_dtype

NAME = "torch"
ROW_BLOCK = 128        # rows per step: bounds the fp32 temporaries to ROW_BLOCK * VOCAB_BLOCK elements
VOCAB_BLOCK = 8192     # columns per step of the online log-sum-exp


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    """None: this backend runs everywhere PyTorch does."""
    return None


def _row_blocks(n_rows: int, seq_len=None):
    """Slices of at most ROW_BLOCK rows; with ``seq_len`` (a [B, T, V] operand) none crosses a sequence."""
    if seq_len is None:
        for r0 in range(0, n_rows, ROW_BLOCK):
            yield slice(r0, min(r0 + ROW_BLOCK, n_rows))
        return
    for s0 in range(0, n_rows, max(seq_len, 1)):
        for r0 in range(s0, s0 + seq_len, ROW_BLOCK):
            yield slice(r0, min(r0 + ROW_BLOCK, s0 + seq_len))


def _seq_len(*tensors):
    """T of the [B, T, V] operands (they share the label grid), None when every operand is [N, V]."""
    return next((t.shape[1] for t in tensors if t is not None and t.dim() == 3), None)


def _take(x, r: slice, seq_len):
    """Rows ``r`` of an [N, V] or [B, T, V] operand as an [n, V] view (``r`` stays inside one sequence)."""
    if x.dim() == 2:
        return x[r]
    b = r.start // seq_len
    return x[b, r.start - b * seq_len:r.stop - b * seq_len]


def _set_label_entry(block, labels, mask, v0, value):
    """block[i, labels[i] - v0] = value (a number or [n, 1]) on the rows whose label lies in this block."""
    local = labels - v0
    hit = (mask & (local >= 0) & (local < block.shape[1]))[:, None]
    idx = torch.where(hit, local[:, None], torch.zeros_like(local[:, None]))
    value = torch.as_tensor(value, dtype=block.dtype, device=block.device)
    block.scatter_(1, idx, torch.where(hit, value, block.gather(1, idx)))


def logp_and_q(z_y, m, s, r):
    """(logp, q = 1 - p_y) from the label logit and the row statistics, both accurate as p_y -> 1."""
    q = r / s
    return torch.where(q < 0.5, torch.log1p(-q), (z_y - m) - torch.log(s)), q


def _scratch(x: torch.Tensor) -> torch.Tensor:
    """One [ROW_BLOCK, VOCAB_BLOCK] buffer in the accumulation dtype, reused by every block of a call:
    a fresh temporary per block would be page-faulted in each time (several times the arithmetic)."""
    return torch.empty(ROW_BLOCK, VOCAB_BLOCK, dtype=_acc_dtype(x), device=x.device)


def _stats_and_logp(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, scratch: torch.Tensor):
    """Row statistics (m, s, r) over vocab blocks for a block of rows, logp and q; ignored rows (0, 1, 0), 0, 0."""
    acc = _acc_dtype(x)
    if scratch.dtype != acc:  # models of different dtypes
        scratch = _scratch(x)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    m = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)
    r = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    for v0 in range(0, x.shape[1], VOCAB_BLOCK):
        xb = x[:, v0:v0 + VOCAB_BLOCK]
        m_new = torch.maximum(m, xb.amax(1).to(acc))
        shift = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)  # all -inf so far: no rescale
        e = torch.sub(xb, shift[:, None], out=scratch[:xb.shape[0], :xb.shape[1]]).exp_()
        _set_label_entry(e, labels, mask, v0, 0.0)  # the label's term stays out of r
        r = r * torch.exp(m - shift) + e.sum(1)
        m = m_new
    z_y = x.gather(1, safe[:, None]).squeeze(1).to(acc)
    s = r + torch.exp(z_y - m)
    logp, q = logp_and_q(z_y, m, s, r)
    zero = torch.zeros_like(m)
    return (torch.where(mask, m, zero), torch.where(mask, s, torch.ones_like(s)), torch.where(mask, r, zero),
            torch.where(mask, logp, zero), torch.where(mask, q, zero))


def _write_grad(x, labels, m, s, q, coef, ignore_index, out, scratch):
    """out = coef * (onehot(label) - exp(x - m) / s), block by block, the label entry as coef * q;
    ignored rows get zeros.  ``out`` may be ``x`` itself: each block is read before it is overwritten.
    """
    acc = _acc_dtype(x)
    mask = labels != ignore_index
    ignored = ~mask[:, None]
    m_col = m[:, None]
    scale = torch.where(mask, -coef / s, torch.zeros_like(coef))[:, None]
    label_value = (coef * q)[:, None]
    for v0 in range(0, x.shape[1], VOCAB_BLOCK):
        o = out[:, v0:v0 + VOCAB_BLOCK]
        # Write straight into ``out`` when it already has the accumulation dtype.
        g = o if o.dtype == acc else scratch[:o.shape[0], :o.shape[1]]
        torch.sub(x[:, v0:v0 + VOCAB_BLOCK], m_col, out=g).exp_().mul_(scale)
        g.masked_fill_(ignored, 0.0)  # NaN / inf in an ignored row must not leak (0 * NaN)
        _set_label_entry(g, labels, mask, v0, label_value)
        if g is not o:
            o.copy_(g)
    return out


def logprobs(logits, labels, ignore_index):
    acc = _acc_dtype(logits)
    n = labels.shape[0]
    stats = torch.empty(3, n, dtype=acc, device=logits.device)
    logp = torch.empty(n, dtype=acc, device=logits.device)
    T, scratch = _seq_len(logits), _scratch(logits)
    for r in _row_blocks(n, T):
        stats[0, r], stats[1, r], stats[2, r], logp[r], _ = _stats_and_logp(_take(logits, r, T), labels[r],
                                                                            ignore_index, scratch)
    return logp, stats


def logprobs_backward(logits, labels, stats, grad_logp, ignore_index, out):
    T, scratch = _seq_len(logits, out), _scratch(logits)
    for r in _row_blocks(labels.shape[0], T):
        m, s, rest = stats[0, r], stats[1, r], stats[2, r]
        _write_grad(_take(logits, r, T), labels[r], m, s, rest / s, grad_logp[r].to(m.dtype), ignore_index,
                    _take(out, r, T), scratch)
    return out


def weak_log_ratio(aligned, base, labels, ignore_index):
    acc = _acc_dtype(aligned, base)
    out = torch.empty(labels.shape[0], dtype=acc, device=aligned.device)
    T, scratch = _seq_len(aligned, base), _scratch(aligned)
    for r in _row_blocks(labels.shape[0], T):
        la = _stats_and_logp(_take(aligned, r, T), labels[r], ignore_index, scratch)[3]
        lw = _stats_and_logp(_take(base, r, T), labels[r], ignore_index, scratch)[3]
        out[r] = la.to(acc) - lw.to(acc)
    return out


def _policy_block(policy, labels, k, weight, gamma, ignore_index, grad, scratch):
    m, s, _, logp, q = _stats_and_logp(policy, labels, ignore_index, scratch)
    d = gamma * logp - k.to(logp.dtype)
    w = weight.to(logp.dtype)
    if grad is not None:
        _write_grad(policy, labels, m, s, q, 2.0 * gamma * w * d, ignore_index, grad, scratch)
    return w * d * d, logp


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    n = labels.shape[0]
    acc = _acc_dtype(policy)
    loss = torch.empty(n, dtype=acc, device=policy.device)
    logp = torch.empty(n, dtype=acc, device=policy.device)
    T, scratch = _seq_len(policy, grad), _scratch(policy)
    for r in _row_blocks(n, T):
        loss[r], logp[r] = _policy_block(_take(policy, r, T), labels[r], k[r], weight[r], gamma, ignore_index,
                                         None if grad is None else _take(grad, r, T), scratch)
    return loss, logp


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    n = labels.shape[0]
    acc = _acc_dtype(policy)
    loss = torch.empty(n, dtype=acc, device=policy.device)
    logps = torch.empty(4, n, dtype=acc, device=policy.device)
    T, scratch = _seq_len(policy, ref, aligned, base, grad), _scratch(policy)
    for r in _row_blocks(n, T):
        for i, frozen in enumerate((ref, aligned, base), start=1):
            logps[i, r] = _stats_and_logp(_take(frozen, r, T), labels[r], ignore_index, scratch)[3]
        k = gamma * logps[1, r] + logps[2, r] - logps[3, r]
        loss[r], logps[0, r] = _policy_block(_take(policy, r, T), labels[r], k, weight[r], gamma, ignore_index,
                                             None if grad is None else _take(grad, r, T), scratch)
    return loss, logps


def scale_rows_(grad, scale):
    acc = _acc_dtype(grad)
    T = _seq_len(grad)
    for r in _row_blocks(scale.shape[0], T):  # bounded float temporaries for bf16 / fp16 gradients
        g = _take(grad, r, T)
        if g.dtype == acc:
            g.mul_(scale[r, None].to(acc))
        else:
            g.copy_(g.to(acc).mul_(scale[r, None].to(acc)))
    return grad
