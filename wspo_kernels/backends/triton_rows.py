"""Triton backend: the row kernels as Triton programs, one program per row.

Math (see ``torch_rows`` for the contract; here in the exp2 form):

    row statistics over vocab blocks of BLOCK columns, for a row z (log2e = 1/ln 2), the label's own
    term left out of the sum:
        m' = max(m, max_j z_j);   r' = r * 2^((m - m') log2e) + sum_{j != y} 2^((z_j - m') log2e)
    s = r + exp(z_y - m), q = r / s = 1 - p_y          (z_y loaded directly)
    logp = log1p(-q) if q < 1/2 else (z_y - m) - ln(s)  (exact at large offsets and as p_y -> 1)
    WSPO: d = gamma * logp^policy - k,  k = gamma * l^ref + l^aligned - l^base (read from the frozen
          rows in the same program, or given), loss = w d^2, and in a second sweep of the policy row
          grad_v = -c 2^((z_v - m) log2e) / s,  grad_y = c q,  c = 2 gamma w d.
    Rows whose label is ignore_index are never read.

Rows are addressed as (b, t) = (row // T, row % T) with each operand's own strides, so views of a
wider vocabulary, transposed or expanded logits are read where they lie, and the gradient is written
with the gradient buffer's own strides (it may be the policy logits).  Row offsets are int64;
accumulation is fp32.  Launches run under the operands' CUDA device.  Every kernel also runs under
``TRITON_INTERPRET=1`` on CPU tensors (how CI tests it).
"""
import contextlib
import os

import torch

from .._inputs import STATS_ROWS

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
HEAD_LANES = tl.constexpr(16) if tl is not None else 16  # columns before a 16-byte boundary: at most 15
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
    @triton.jit
    def _row_ptr(base, row, outer_stride, inner_stride, inner):
        """Row ``row`` of an [N, V] (outer_stride 0, inner N) or [B, T, V] (inner T) operand; int64 offsets."""
        return base + (row // inner) * outer_stride + (row % inner) * inner_stride

    @triton.jit
    def _log1p(x):
        """log(1 + x) without cancellation near 0 (Goldberg: x * log(u) / (u - 1), u = 1 + x)."""
        u = 1.0 + x
        log_u = tl.log(u)
        return tl.where(u == 1.0, x, x * log_u / tl.where(u == 1.0, 1.0, u - 1.0))

    @triton.jit
    def _logp_q(z_y, m, s, r):
        """(logp, q = 1 - p_y) from the label logit and the row statistics."""
        q = r / s
        return tl.where(q < 0.5, _log1p(-q), (z_y - m) - tl.log(s)), q

    @triton.jit
    def _aligned_start(x_ptr, V):
        """Columns before the row's first 16-byte boundary (at most V): peeled off, so that the full
        blocks after them are aligned and load as 16-byte vectors whatever V or the row stride is."""
        elem = x_ptr.dtype.element_ty.primitive_bitwidth // 8
        addr = x_ptr.to(tl.int64, bitcast=True)
        return tl.minimum(((16 - addr % 16) % 16) // elem, V)

    @triton.jit
    def _load(ptrs, mask, KEEP: tl.constexpr, MASKED: tl.constexpr):
        """fp32 values; masked lanes -inf.  ``KEEP``: the row is read again, keep it in L2."""
        if MASKED:
            if KEEP:
                x = tl.load(ptrs, mask=mask, other=-float("inf"), eviction_policy="evict_last")
            else:
                x = tl.load(ptrs, mask=mask, other=-float("inf"), eviction_policy="evict_first")
        else:
            if KEEP:
                x = tl.load(ptrs, eviction_policy="evict_last")
            else:
                x = tl.load(ptrs, eviction_policy="evict_first")
        return x.to(tl.float32)

    @triton.jit
    def _merge(x, cols, y, m, r_lanes):
        """Fold one block into (m, per-lane r): one block-wide reduction (the max)."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all -inf prefix has nothing to rescale
        e = tl.where(cols == y, 0.0, tl.exp2((x - shift) * 1.4426950408889634))
        return m_new, r_lanes * tl.exp2((m - shift) * 1.4426950408889634) + e

    @triton.jit
    def _row_stats(x_ptr, V, y, BLOCK: tl.constexpr, KEEP: tl.constexpr):
        """(m, s, r, z_y) of one row in fp32: max, sum of exp(z - m), that sum without the label's term.

        The row is read as a peeled head (up to its first 16-byte boundary), full aligned blocks without
        masks, and a masked tail.  One block-wide reduction per block (the max): the sums stay per lane,
        rescaled by the scalar exp(m - m'), and are reduced once per row.  ``KEEP``: the row is read again
        (the gradient sweep), so its lines are marked to stay in L2 (evict_last); else evict_first.
        """
        offs = tl.arange(0, BLOCK)
        head = _aligned_start(x_ptr, V)
        lanes = tl.arange(0, HEAD_LANES)   # the head is under 16 bytes: a small block of its own
        x_head = _load(x_ptr + lanes, lanes < head, KEEP, True)
        m, r_head = _merge(x_head, lanes, y, -float("inf"), tl.zeros([HEAD_LANES], dtype=tl.float32))
        r_lanes = tl.where(offs == 0, tl.sum(r_head, axis=0), 0.0)
        body = tl.multiple_of(x_ptr + head, 16)
        n_full = (V - head) // BLOCK * BLOCK
        for v0 in range(0, n_full, BLOCK):
            x = _load(body + (v0 + offs), None, KEEP, False)  # one offset: keeps the alignment hint
            m, r_lanes = _merge(x, head + v0 + offs, y, m, r_lanes)
        cols = n_full + offs
        x = _load(body + cols, cols < V - head, KEEP, True)
        m, r_lanes = _merge(x, head + cols, y, m, r_lanes)
        r = tl.sum(r_lanes, axis=0)
        z_y = tl.load(x_ptr + y).to(tl.float32)
        return m, r + tl.exp(z_y - m), r, z_y

    @triton.jit
    def _grad_block(x_ptrs, out_ptrs, cols, mask, m, scale, y, label_value, MASKED: tl.constexpr):
        x = _load(x_ptrs, mask, False, MASKED)
        g = tl.where(cols == y, label_value, scale * tl.exp2((x - m) * 1.4426950408889634))
        if MASKED:
            tl.store(out_ptrs, g.to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, g.to(out_ptrs.dtype.element_ty))

    @triton.jit
    def _row_grad(x_ptr, out_ptr, V, m, s, coef, y, q, BLOCK: tl.constexpr, OUT_ALIGNED: tl.constexpr):
        """out = coef * (onehot(y) - exp(x - m) / s), the label entry coef * q; out may be x.

        Read as ``_row_stats`` reads (a peeled head, aligned full blocks, a masked tail); the stores are
        aligned too when ``out`` sits at the same offset from a 16-byte boundary as ``x`` (``OUT_ALIGNED``,
        decided by the launcher: in place, or the same strides and a base 16 bytes apart).
        """
        # In place (out == x): every thread has loaded z_y (a scalar read across warps) before any store.
        tl.debug_barrier()
        offs = tl.arange(0, BLOCK)
        scale = -coef / s
        label_value = coef * q
        head = _aligned_start(x_ptr, V)
        lanes = tl.arange(0, HEAD_LANES)
        _grad_block(x_ptr + lanes, out_ptr + lanes, lanes, lanes < head, m, scale, y, label_value, True)
        body_x = tl.multiple_of(x_ptr + head, 16)
        if OUT_ALIGNED:
            body_out = tl.multiple_of(out_ptr + head, 16)
        else:
            body_out = out_ptr + head
        n_full = (V - head) // BLOCK * BLOCK
        for v0 in range(0, n_full, BLOCK):
            cols = v0 + offs
            _grad_block(body_x + cols, body_out + cols, head + cols, None, m, scale, y, label_value, False)
        cols = n_full + offs
        _grad_block(body_x + cols, body_out + cols, head + cols, cols < V - head, m, scale, y, label_value, True)

    @triton.jit
    def _zero_row(out_ptr, V, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            tl.store(out_ptr + v0 + offs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=v0 + offs < V)

    @triton.jit
    def _logprobs_kernel(x_ptr, x_s0, x_s1, x_t, V, labels_ptr, ignore_index, logp_ptr, stats_ptr, n_rows,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        if y == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            tl.store(stats_ptr + row, 0.0)
            tl.store(stats_ptr + n_rows + row, 1.0)
            tl.store(stats_ptr + 2 * n_rows + row, 0.0)
            return
        m, s, r, z_y = _row_stats(_row_ptr(x_ptr, row, x_s0, x_s1, x_t), V, y, BLOCK, False)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n_rows + row, s)
        tl.store(stats_ptr + 2 * n_rows + row, r)
        tl.store(logp_ptr + row, _logp_q(z_y, m, s, r)[0])

    @triton.jit
    def _logprobs_backward_kernel(x_ptr, x_s0, x_s1, x_t, V, labels_ptr, ignore_index, stats_ptr, n_rows, g_ptr,
                                  out_ptr, o_s0, o_s1, o_t, BLOCK: tl.constexpr, OUT_ALIGNED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        out_row = _row_ptr(out_ptr, row, o_s0, o_s1, o_t)
        if y == ignore_index:
            _zero_row(out_row, V, BLOCK)
            return
        x_row = _row_ptr(x_ptr, row, x_s0, x_s1, x_t)
        m = tl.load(stats_ptr + row)
        s = tl.load(stats_ptr + n_rows + row)
        q = tl.load(stats_ptr + 2 * n_rows + row) / s
        _row_grad(x_row, out_row, V, m, s, tl.load(g_ptr + row), y, q, BLOCK, OUT_ALIGNED)

    @triton.jit
    def _row_logp(x_row, V, y, BLOCK: tl.constexpr):
        m, s, r, z_y = _row_stats(x_row, V, y, BLOCK, False)
        return _logp_q(z_y, m, s, r)[0]

    @triton.jit
    def _weak_log_ratio_kernel(a_ptr, a_s0, a_s1, a_t, Va, b_ptr, b_s0, b_s1, b_t, Vb, labels_ptr, ignore_index,
                               out_ptr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        if y == ignore_index:
            tl.store(out_ptr + row, 0.0)
            return
        la = _row_logp(_row_ptr(a_ptr, row, a_s0, a_s1, a_t), Va, y, BLOCK_A)
        lb = _row_logp(_row_ptr(b_ptr, row, b_s0, b_s1, b_t), Vb, y, BLOCK_B)
        tl.store(out_ptr + row, la - lb)

    @triton.jit
    def _wspo_kernel(p_ptr, p_s0, p_s1, p_t, V, r_ptr, r_s0, r_s1, r_t, Vr, a_ptr, a_s0, a_s1, a_t, Va,
                     b_ptr, b_s0, b_s1, b_t, Vb, k_ptr, labels_ptr, w_ptr, gamma, ignore_index, loss_ptr, logps_ptr,
                     n_rows, grad_ptr, g_s0, g_s1, g_t,
                     FOUR: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr,
                     OUT_ALIGNED: tl.constexpr):
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
                _zero_row(_row_ptr(grad_ptr, row, g_s0, g_s1, g_t), V, BLOCK)
            return
        if FOUR:
            lr = _row_logp(_row_ptr(r_ptr, row, r_s0, r_s1, r_t), Vr, y, BLOCK_F)
            la = _row_logp(_row_ptr(a_ptr, row, a_s0, a_s1, a_t), Va, y, BLOCK_F)
            lb = _row_logp(_row_ptr(b_ptr, row, b_s0, b_s1, b_t), Vb, y, BLOCK_F)
            tl.store(logps_ptr + n_rows + row, lr)
            tl.store(logps_ptr + 2 * n_rows + row, la)
            tl.store(logps_ptr + 3 * n_rows + row, lb)
            k = gamma * lr + la - lb
        else:
            k = tl.load(k_ptr + row)
        p_row = _row_ptr(p_ptr, row, p_s0, p_s1, p_t)
        m, s, r, z_y = _row_stats(p_row, V, y, BLOCK, WRITE_GRAD)
        logp, q = _logp_q(z_y, m, s, r)
        d = gamma * logp - k
        w = tl.load(w_ptr + row)
        tl.store(logps_ptr + row, logp)
        tl.store(loss_ptr + row, w * d * d)
        if WRITE_GRAD:
            _row_grad(p_row, _row_ptr(grad_ptr, row, g_s0, g_s1, g_t), V, m, s, 2.0 * gamma * w * d, y, q, BLOCK,
                      OUT_ALIGNED)

    @triton.jit
    def _scale_rows_kernel(g_ptr, g_s0, g_s1, g_t, scale_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s = tl.load(scale_ptr + row)
        if s == 1.0:
            return
        g_row = _row_ptr(g_ptr, row, g_s0, g_s1, g_t)
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            g = tl.load(g_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (g * s).to(g_ptr.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------------------------- launchers
def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)


def _warps(block: int) -> int:
    return 16 if block >= 4096 else 8 if block >= 1024 else 4


def _f32(n, like):
    return torch.empty(n, dtype=torch.float32, device=like.device)


def _rows(x):
    """(pointer, outer stride, inner stride, inner length T) of an [N, V] or [B, T, V] operand.

    Row i is (i // T, i % T); an [N, V] operand has outer stride 0 and T = N.
    """
    if x.dim() == 3:
        return x, x.stride(0), x.stride(1), max(x.shape[1], 1)
    return x, 0, x.stride(0), max(x.shape[0], 1)


def device_guard(x: torch.Tensor):
    """Launch on the operands' device, not the current one (tensors on a second GPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def logprobs(logits, labels, ignore_index):
    n, V = labels.shape[0], logits.shape[-1]
    logp, stats = _f32(n, logits), torch.empty(STATS_ROWS, n, dtype=torch.float32, device=logits.device)
    if n:
        block = _block(V)
        with device_guard(logits):
            _logprobs_kernel[(n,)](*_rows(logits), V, labels, ignore_index, logp, stats, n, BLOCK=block,
                                   num_warps=_warps(block))
    return logp, stats


def _same_alignment(x, out):
    """Whether every row of ``out`` sits at the same offset from a 16-byte boundary as that row of ``x``
    (same dtype and strides, bases 16 bytes apart; in place included): the gradient's stores may then be
    declared aligned.  A wrong True would be a misaligned vector store, so anything else is False."""
    return x.dtype == out.dtype and x.stride() == out.stride() and (x.data_ptr() - out.data_ptr()) % 16 == 0


def logprobs_backward(logits, labels, stats, grad_logp, ignore_index, out):
    n, V = labels.shape[0], logits.shape[-1]
    if n:
        block = _block(V)
        with device_guard(logits):
            _logprobs_backward_kernel[(n,)](*_rows(logits), V, labels, ignore_index, stats.float().contiguous(), n,
                                            grad_logp.float().contiguous(), *_rows(out), BLOCK=block,
                                            OUT_ALIGNED=_same_alignment(logits, out), num_warps=_warps(block))
    return out


def weak_log_ratio(aligned, base, labels, ignore_index):
    n = labels.shape[0]
    out = _f32(n, aligned)
    if n:
        ba, bb = _block(aligned.shape[-1]), _block(base.shape[-1])
        with device_guard(aligned):
            _weak_log_ratio_kernel[(n,)](*_rows(aligned), aligned.shape[-1], *_rows(base), base.shape[-1], labels,
                                         ignore_index, out, BLOCK_A=ba, BLOCK_B=bb, num_warps=_warps(max(ba, bb)))
    return out


def _wspo(policy, frozen, k, labels, weight, gamma, ignore_index, grad):
    n, V = labels.shape[0], policy.shape[-1]
    loss = _f32(n, policy)
    logps = torch.empty(4 if frozen else 1, n, dtype=torch.float32, device=policy.device)
    if n:
        r, a, b = frozen if frozen else (policy, policy, policy)
        block = _block(V)
        with device_guard(policy):
            _wspo_kernel[(n,)](
                *_rows(policy), V, *_rows(r), r.shape[-1], *_rows(a), a.shape[-1], *_rows(b), b.shape[-1],
                loss if k is None else k.float().contiguous(), labels, weight.float().contiguous(), float(gamma),
                ignore_index, loss, logps, n, *_rows(policy if grad is None else grad),
                FOUR=frozen is not None, WRITE_GRAD=grad is not None, BLOCK=block,
                BLOCK_F=_block(max(r.shape[-1], a.shape[-1], b.shape[-1])),
                OUT_ALIGNED=grad is not None and _same_alignment(policy, grad), num_warps=_warps(block))
    return loss, (logps if frozen else logps[0])


def wspo_rows(policy, labels, k, weight, gamma, ignore_index, grad):
    return _wspo(policy, None, k, labels, weight, gamma, ignore_index, grad)


def wspo_four(policy, ref, aligned, base, labels, weight, gamma, ignore_index, grad):
    return _wspo(policy, (ref, aligned, base), None, labels, weight, gamma, ignore_index, grad)


def scale_rows_(grad, scale):
    n, V = scale.shape[0], grad.shape[-1]
    if n:
        block = _block(V)
        with device_guard(grad):
            _scale_rows_kernel[(n,)](*_rows(grad), scale.float().contiguous(), V, BLOCK=block, num_warps=_warps(block))
    return grad


if triton is not None:
    from . import triton_linear as linear  # noqa: E402  logits-free kernels for the hidden-state forms (uses the above)
