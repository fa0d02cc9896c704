"""Triton backend: the row kernels as Triton programs, one program per row.

Math (see ``torch_rows`` for the contract; here in the exp2 form):

    online log-sum-exp over vocab blocks of BLOCK columns, for a row z (log2e = 1/ln 2):
        m' = max(m, max_j z_j);   s' = s * 2^((m - m') log2e) + sum_j 2^((z_j - m') log2e)
        lse = m + ln(s)
    logp = z_y - lse                       (z_y loaded directly; ignore_index rows do no work)
    WSPO: d = gamma * logp^policy - k,  k = gamma * l^ref + l^aligned - l^base (read from the frozen
          rows in the same program, or given), loss = w d^2, and in a second sweep of the policy row
          grad_v = c (1[v = y] - 2^((z_v - lse) log2e)),  c = 2 gamma w d.

Nothing is saved but what the caller keeps (the lse for logprobs, the gradient for WSPO); the
gradient may be written over the policy logits.  Row offsets are int64; accumulation is fp32.
Every kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (how CI tests it).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as exc:  # the backend reports itself unavailable
    triton = tl = None
    _IMPORT_ERROR = f"triton is not installed ({exc})"

NAME = "triton"
MAX_BLOCK = 4096          # vocab columns per step (a power of two)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # decided when the kernels are defined
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if dtype not in _DTYPES:
        return f"Triton kernels take float32/bfloat16/float16, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRETED:
        return None
    return "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before import)"


if triton is not None:
    from . import triton_linear as linear  # logits-free kernels for the hidden-state forms

    @triton.jit
    def _row_lse(x_ptr, V, BLOCK: tl.constexpr):
        """Online log-sum-exp of one row (fp32)."""
        offs = tl.arange(0, BLOCK)
        m = -float("inf")
        s = 0.0
        for v0 in range(0, V, BLOCK):
            x = tl.load(x_ptr + v0 + offs, mask=v0 + offs < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all -inf prefix has nothing to rescale
            s = s * tl.exp2((m - shift) * 1.4426950408889634) + tl.sum(tl.exp2((x - shift) * 1.4426950408889634),
                                                                     axis=0)
            m = m_new
        return tl.where(m == -float("inf"), m, m + tl.log2(s) * 0.6931471805599453)

    @triton.jit
    def _row_grad(x_ptr, out_ptr, V, lse, coef, y, BLOCK: tl.constexpr):
        """out = coef * (onehot(y) - exp(x - lse)); out may be x (each block is read before written)."""
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            x = tl.load(x_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            g = -coef * tl.exp2((x - lse) * 1.4426950408889634)
            g = tl.where(cols == y, g + coef, g)
            tl.store(out_ptr + cols, g.to(out_ptr.dtype.element_ty), mask=cols < V)

    @triton.jit
    def _zero_row(out_ptr, V, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            tl.store(out_ptr + v0 + offs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=v0 + offs < V)

    @triton.jit
    def _logprobs_kernel(x_ptr, stride, V, labels_ptr, ignore_index, logp_ptr, lse_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        if y == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            return
        x_row = x_ptr + row * stride
        lse = _row_lse(x_row, V, BLOCK)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, tl.load(x_row + y).to(tl.float32) - lse)

    @triton.jit
    def _logprobs_backward_kernel(x_ptr, stride, V, labels_ptr, ignore_index, lse_ptr, g_ptr, out_ptr,
                                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        out_row = out_ptr + row * V
        if y == ignore_index:
            _zero_row(out_row, V, BLOCK)
            return
        _row_grad(x_ptr + row * stride, out_row, V, tl.load(lse_ptr + row), tl.load(g_ptr + row), y, BLOCK)

    @triton.jit
    def _weak_log_ratio_kernel(a_ptr, a_stride, Va, b_ptr, b_stride, Vb, labels_ptr, ignore_index, out_ptr,
                               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        if y == ignore_index:
            tl.store(out_ptr + row, 0.0)
            return
        a_row = a_ptr + row * a_stride
        b_row = b_ptr + row * b_stride
        la = tl.load(a_row + y).to(tl.float32) - _row_lse(a_row, Va, BLOCK_A)
        lb = tl.load(b_row + y).to(tl.float32) - _row_lse(b_row, Vb, BLOCK_B)
        tl.store(out_ptr + row, la - lb)

    @triton.jit
    def _wspo_kernel(p_ptr, p_stride, V, r_ptr, r_stride, Vr, a_ptr, a_stride, Va, b_ptr, b_stride, Vb, k_ptr,
                     labels_ptr, w_ptr, gamma, ignore_index, loss_ptr, logps_ptr, n_rows, grad_ptr,
                     FOUR: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        if y == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            tl.store(logps_ptr + row, 0.0)
            if FOUR:
                tl.store(logps_ptr + n_rows + row, 0.0)
                tl.store(logps_ptr + 2 * n_rows + row, 0.0)
                tl.store(logps_ptr + 3 * n_rows + row, 0.0)
            if WRITE_GRAD:
                _zero_row(grad_ptr + row * V, V, BLOCK)
            return
        if FOUR:
            r_row = r_ptr + row * r_stride
            a_row = a_ptr + row * a_stride
            b_row = b_ptr + row * b_stride
            lr = tl.load(r_row + y).to(tl.float32) - _row_lse(r_row, Vr, BLOCK_F)
            la = tl.load(a_row + y).to(tl.float32) - _row_lse(a_row, Va, BLOCK_F)
            lb = tl.load(b_row + y).to(tl.float32) - _row_lse(b_row, Vb, BLOCK_F)
            tl.store(logps_ptr + n_rows + row, lr)
            tl.store(logps_ptr + 2 * n_rows + row, la)
            tl.store(logps_ptr + 3 * n_rows + row, lb)
            k = gamma * lr + la - lb
        else:
            k = tl.load(k_ptr + row)
        p_row = p_ptr + row * p_stride
        lse = _row_lse(p_row, V, BLOCK)
        z_y = tl.load(p_row + y).to(tl.float32)
        d = gamma * (z_y - lse) - k
        w = tl.load(w_ptr + row)
        tl.store(logps_ptr + row, z_y - lse)
        tl.store(loss_ptr + row, w * d * d)
        if WRITE_GRAD:
            _row_grad(p_row, grad_ptr + row * V, V, lse, 2.0 * gamma * w * d, y, BLOCK)

    @triton.jit
    def _scale_rows_kernel(g_ptr, scale_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s = tl.load(scale_ptr + row)
        if s == 1.0:
            return
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            g = tl.load(g_ptr + row * V + cols, mask=cols < V, other=0.0).to(tl.float32)
            tl.store(g_ptr + row * V + cols, (g * s).to(g_ptr.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------------------------- launchers
def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)


def _warps(block: int) -> int:
    return 16 if block >= 4096 else 8 if block >= 1024 else 4


def _f32(n, like):
    return torch.empty(n, dtype=torch.float32, device=like.device)


def logprobs(logits, labels, ignore_index):
    n, V = logits.shape
    logp, lse = _f32(n, logits), _f32(n, logits)
    if n:
        block = _block(V)
        _logprobs_kernel[(n,)](logits, logits.stride(0), V, labels, ignore_index, logp, lse, BLOCK=block,
                               num_warps=_warps(block))
    return logp, lse


def logprobs_backward(logits, labels, lse, grad_logp, ignore_index, out):
    n, V = logits.shape
    if n:
        block = _block(V)
        _logprobs_backward_kernel[(n,)](logits, logits.stride(0), V, labels, ignore_index, lse.float().contiguous(),
                                        grad_logp.float().contiguous(), out, BLOCK=block, num_warps=_warps(block))
    return out


def weak_log_ratio(aligned, base, labels, ignore_index):
    n = aligned.shape[0]
    out = _f32(n, aligned)
    if n:
        ba, bb = _block(aligned.shape[1]), _block(base.shape[1])
        _weak_log_ratio_kernel[(n,)](aligned, aligned.stride(0), aligned.shape[1], base, base.stride(0),
                                     base.shape[1], labels, ignore_index, out, BLOCK_A=ba, BLOCK_B=bb,
                                     num_warps=_warps(max(ba, bb)))
    return out


def _wspo(policy, frozen, k, labels, weight, gamma, ignore_index, grad):
    n, V = policy.shape
    loss = _f32(n, policy)
    logps = torch.empty(4 if frozen else 1, n, dtype=torch.float32, device=policy.device)
    if n:
        r, a, b = frozen if frozen else (policy, policy, policy)
        block = _block(V)
        _wspo_kernel[(n,)](
            policy, policy.stride(0), V, r, r.stride(0), r.shape[1], a, a.stride(0), a.shape[1], b, b.stride(0),
            b.shape[1], loss if k is None else k.float().contiguous(), labels, weight.float().contiguous(),
            float(gamma), ignore_index, loss, logps, n, policy if grad is None else grad,
            FOUR=frozen is not None, WRITE_GRAD=grad is not None, BLOCK=block,
            BLOCK_F=_block(max(r.shape[1], a.shape[1], b.shape[1])), num_warps=_warps(block))
    return loss, (logps if frozen else logps[0])


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    return _wspo(policy, None, k, labels, weight, gamma, ignore_index, grad)


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    return _wspo(policy, (ref, aligned, base), None, labels, weight, gamma, ignore_index, grad)


def scale_rows_(grad, scale):
    n, V = grad.shape
    if n:
        block = _block(V)
        _scale_rows_kernel[(n,)](grad, scale.float().contiguous(), V, BLOCK=block, num_warps=_warps(block))
    return grad
