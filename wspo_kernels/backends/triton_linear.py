"""Logits-free linear kernels (Triton): the loss from hidden states and lm_head without a logits buffer.

For rows h_t (hidden [N, H]) and an lm_head W [V, H] (+ bias b), logits z = h W^T + b exist only as
[BM, BV] tiles in SRAM:

    forward   grid (row blocks, vocab splits): each program runs a K-loop of tl.dot per tile and merges
              the tile into a per-row online log-sum-exp (m, s); the label logit z_y is picked out of
              the tile that holds it (the very value the log-sum-exp saw).  The splits' partials are
              merged afterwards in a fixed order (deterministic).  Frozen models stop here
              (logp = z_y - lse).
    gradient  grid (row blocks, vocab blocks): recompute the tile, G = c_t (1[v = y_t] - exp(z - lse_t))
              with c_t = dL/dlogp_t (WSPO: 2 gamma w_t d_t), then dH += G W_tile and dW += G^T H_tile,
              db += sum_rows G, accumulated in fp32 with atomic adds.  Row blocks whose c_t are all 0
              (ignored tokens) do no work.

Saved: nothing but lse [N] (and the caller's c_t).  Extra memory: O(N) plus the fp32 dH / dW
accumulators.  The atomic accumulation order varies from run to run (last-bit differences); under
``torch.use_deterministic_algorithms(True)`` or ``WSPO_KERNELS_LINEAR=chunked`` the chunked path
(``chunked_linear``: a bounded chunk of logits, GEMMs in a fixed order) runs instead.
fp32 inputs use IEEE-exact fp32 dot products (no TF32).
"""
import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_V = 128
BLOCK_K = 32
VOCAB_SPLITS = 8          # forward programs per row block along the vocabulary (merged deterministically)


@triton.jit
def _tile_logits(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, cols, N, V, H,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    """z[BM, BV] = h[rows] W[cols]^T (+ b[cols]) in fp32; columns past V are -inf."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * h_stride + ks[None, :], mask=(rows < N)[:, None] & (ks < H)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * w_stride + ks[:, None], mask=(cols < V)[None, :] & (ks < H)[:, None],
                    other=0.0)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where((cols < V)[None, :], acc, -float("inf"))


@triton.jit
def _lse_kernel(h_ptr, h_stride, w_ptr, w_stride, b_ptr, labels_ptr, N, V, H, cols_per_split, m_ptr, s_ptr, zy_ptr,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    v_start = split * cols_per_split
    v_end = tl.minimum(V, v_start + cols_per_split)
    y = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    m = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _tile_logits(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, cols, N, v_end, H, HAS_BIAS,
                         BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp2((m - shift) * 1.4426950408889634) + \
            tl.sum(tl.exp2((z - shift[:, None]) * 1.4426950408889634), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=rows < N)
    tl.store(s_ptr + out, s, mask=rows < N)
    tl.store(zy_ptr + out, zy, mask=rows < N)


@triton.jit
def _grad_kernel(h_ptr, h_stride, w_ptr, w_stride, b_ptr, labels_ptr, lse_ptr, coef_ptr, N, V, H,
                 dh_ptr, dw_ptr, db_ptr, HAS_BIAS: tl.constexpr, GRAD_H: tl.constexpr, GRAD_W: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + rows, mask=rows < N, other=0.0)
    if tl.max(tl.abs(coef), axis=0) == 0.0:
        return
    z = _tile_logits(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, cols, N, V, H, HAS_BIAS,
                     BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    y = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    p = tl.exp2((z - lse[:, None]) * 1.4426950408889634)
    g = coef[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    g = tl.where((cols < V)[None, :] & (rows < N)[:, None], g, 0.0)
    if GRAD_W and HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols < V)
    g_in = g.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if GRAD_H:
            w = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :], mask=(cols < V)[:, None] & (ks < H)[None, :],
                        other=0.0)
            if IEEE:
                part = tl.dot(g_in, w, input_precision="ieee")
            else:
                part = tl.dot(g_in, w)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], part, mask=(rows < N)[:, None] & (ks < H)[None, :])
        if GRAD_W:
            h = tl.load(h_ptr + rows[:, None] * h_stride + ks[None, :], mask=(rows < N)[:, None] & (ks < H)[None, :],
                        other=0.0)
            if IEEE:
                part = tl.dot(tl.trans(g_in), h, input_precision="ieee")
            else:
                part = tl.dot(tl.trans(g_in), h)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], part, mask=(cols < V)[:, None] & (ks < H)[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _common(hidden, weight, bias):
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise RuntimeError("the logits-free Triton kernels need hidden, weight and bias in one dtype")
    return dict(HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
                IEEE=hidden.dtype == torch.float32)


def _lse_and_label_logit(hidden, weight, bias, labels):
    n, H = hidden.shape
    V = weight.shape[0]
    splits = max(1, min(VOCAB_SPLITS, triton.cdiv(V, BLOCK_V)))
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), BLOCK_V) * BLOCK_V
    m = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    s, zy = torch.empty_like(m), torch.empty_like(m)
    _lse_kernel[(triton.cdiv(n, BLOCK_M), splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), hidden if bias is None else bias, labels, n, V, H,
        cols_per_split, m, s, zy, **_common(hidden, weight, bias))
    # Fixed-order merge of the splits: lse = logsumexp_split(m + log s) (an empty split has s = 0);
    # exactly one split holds the label, the others contribute 0.
    return torch.logsumexp(m + torch.log(s), dim=0), zy.sum(0)


def _gradients(hidden, weight, bias, labels, lse, coef, grad_hidden, grad_weight):
    n, H = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(n, H, dtype=torch.float32, device=hidden.device) if grad_hidden else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if grad_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if grad_weight and bias is not None else None
    if n and (grad_hidden or grad_weight):
        _grad_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(V, BLOCK_V))](
            hidden, hidden.stride(0), weight, weight.stride(0), hidden if bias is None else bias, labels,
            lse.contiguous(), coef.float().contiguous(), n, V, H, lse if dh is None else dh,
            lse if dw is None else dw, lse if db is None else db, GRAD_H=grad_hidden, GRAD_W=grad_weight,
            **_common(hidden, weight, bias))
    empty = hidden.new_empty(0)
    return (empty if dh is None else dh.to(hidden.dtype),
            hidden.new_empty(0) if dw is None else dw.to(weight.dtype),
            hidden.new_empty(0) if db is None else db.to(bias.dtype))


def _logp(hidden, weight, bias, labels, ignore_index):
    mask = labels != ignore_index
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, mask
    lse, z_y = _lse_and_label_logit(hidden, weight, bias, labels)
    return torch.where(mask, z_y - lse, torch.zeros_like(lse)), lse, mask


def linear_logprobs(rows, hidden, weight, bias, labels, ignore_index):
    logp, lse, _ = _logp(hidden, weight, bias, labels, ignore_index)
    return logp, lse


def linear_logprobs_backward(rows, grad_logp, hidden, weight, bias, labels, lse, ignore_index, grad_hidden,
                             grad_weight):
    coef = torch.where(labels != ignore_index, grad_logp.float(), torch.zeros_like(lse))
    return _gradients(hidden, weight, bias, labels, lse, coef, grad_hidden, grad_weight)


def linear_wspo(rows, hidden, weight, bias, labels, k, weight_t, gamma, ignore_index, grad_hidden, grad_weight):
    logp, lse, mask = _logp(hidden, weight, bias, labels, ignore_index)
    d = gamma * logp - k.float()
    w = torch.where(mask, weight_t.float(), torch.zeros_like(logp))
    loss = (w * d * d).sum()
    dh, dw, db = _gradients(hidden, weight, bias, labels, lse, 2.0 * gamma * w * d, grad_hidden, grad_weight)
    return loss, logp, dh, dw, db
