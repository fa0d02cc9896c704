"""Logits-free linear kernels (Triton): the loss from hidden states and lm_head without a logits buffer.

For rows h_t (hidden [N, H]) and an lm_head W [V, H] (+ bias b), logits z = h W^T + b exist only as
[BM, BV] tiles in SRAM:

    forward   grid (row blocks, vocab splits; on a GPU enough splits for two programs per SM, so a short
              batch still fills it): each program runs a K-loop of tl.dot per tile and merges
              the tile into per-row statistics (m, r) = (max, sum of exp(z - m) without the label's
              term); the label logit z_y is picked out of the tile that holds it (the very value the
              statistics saw).  The splits' partials are merged afterwards in a fixed order
              (deterministic): m = max_i m_i, r = sum_i r_i exp(m_i - m), s = r + exp(z_y - m),
              q = r / s = 1 - p_y, logp = log1p(-q) if q < 1/2 else (z_y - m) - log(s).
              Frozen models stop here.
    gradient  grid (row blocks x vocab blocks, in grouped order: GROUP_M row blocks at a time across
              the vocabulary): recompute the tile, G = -c_t exp(z - m_t) / s_t off the
              label and c_t q_t on it, with c_t = dL/dlogp_t (WSPO: 2 gamma w_t d_t), then
              dH += G W_tile and dW += G^T H_tile, db += sum_rows G, accumulated in fp32 with atomic adds.
              Row blocks whose c_t are all 0 (ignored tokens) do no work.

Every operand is read through its own strides (hidden, weight and bias may be any view) with int64
offsets (V * H may exceed 2^31).  Ignored rows are masked at the load, so NaN or inf hidden states
there never reach a GEMM.  Mixed dtypes run in the promoted dtype (fp16 hidden with an fp32 weight:
fp32); gradients come back in each input's dtype.

Saved: nothing but the statistics [2, N] (and the caller's c_t).  Extra memory: O(N) plus the fp32
dH / dW accumulators.  The atomic accumulation order varies from run to run (last-bit differences), so
these kernels are opt-in (``WSPO_KERNELS_LINEAR=fused``); the default is the chunked path
(``chunked_linear``: a bounded chunk of logits, GEMMs in a fixed order, bitwise reproducible).
fp32 inputs use IEEE fp32 dot products unless the user allowed TF32 for matmuls
(``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``), as
cuBLAS does: then tf32 (10-bit mantissa inputs, fp32 accumulation: logits off by about 1e-3 relative,
outside the documented 1e-5 fp32 tolerance, so it is opt-in, exactly like PyTorch's own matmuls).
"""
import torch
import triton
import triton.language as tl

from .._inputs import STATS_ROWS
from .torch_rows import logp_and_q
from .triton_rows import device_guard

BLOCK_M = 64
BLOCK_V = 128
BLOCK_K = 32
VOCAB_SPLITS = 8          # forward programs per row block along the vocabulary on the CPU (interpreter)
WAVES = 2                 # on a GPU: enough vocabulary splits for this many programs per SM
GROUP_M = 8               # gradient programs: row blocks per group of the grouped launch order


@triton.jit
def _tile_logits(h_ptr, h_sn, h_sk, w_ptr, w_sv, w_sk, b_ptr, b_s, rows, row_ok, cols, V, H,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    """z[BM, BV] = h[rows] W[cols]^T (+ b[cols]) in fp32; rows not ``row_ok`` read zeros, columns past V are -inf."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        h = tl.load(h_ptr + rows[:, None] * h_sn + ks[None, :] * h_sk, mask=row_ok[:, None] & (ks < H)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * w_sv + ks[:, None] * w_sk, mask=(cols < V)[None, :] & (ks < H)[:, None],
                    other=0.0)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * b_s, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where((cols < V)[None, :], acc, -float("inf"))


@triton.jit
def _stats_kernel(h_ptr, h_sn, h_sk, w_ptr, w_sv, w_sk, b_ptr, b_s, labels_ptr, ignore_index, N, V, H,
                  cols_per_split, m_ptr, r_ptr, zy_ptr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  IEEE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1).to(tl.int64)
    v_start = split * cols_per_split
    v_end = tl.minimum(V, v_start + cols_per_split)
    y = tl.load(labels_ptr + rows, mask=rows < N, other=ignore_index)
    row_ok = (rows < N) & (y != ignore_index)
    m = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    r = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _tile_logits(h_ptr, h_sn, h_sk, w_ptr, w_sv, w_sk, b_ptr, b_s, rows, row_ok, cols, v_end, H, HAS_BIAS,
                         BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
        is_label = cols[None, :] == y[:, None]
        zy += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        e = tl.where(is_label, 0.0, tl.exp2((z - shift[:, None]) * 1.4426950408889634))
        r = r * tl.exp2((m - shift) * 1.4426950408889634) + tl.sum(e, axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=rows < N)
    tl.store(r_ptr + out, r, mask=rows < N)
    tl.store(zy_ptr + out, zy, mask=rows < N)


@triton.jit
def _grad_kernel(h_ptr, h_sn, h_sk, w_ptr, w_sv, w_sk, b_ptr, b_s, labels_ptr, stats_ptr, coef_ptr, N, V, H,
                 dh_ptr, dw_ptr, db_ptr, HAS_BIAS: tl.constexpr, GRAD_H: tl.constexpr, GRAD_W: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # Grouped order: consecutive programs take GROUP_M row blocks across every vocab block, so those
    # rows' hidden states stay in L2 while W streams past once per group (row-block-major order reads
    # all N rows again for every vocab block), and at most GROUP_M programs add into one dW tile at a time.
    pid = tl.program_id(0)
    blocks_m, blocks_v = tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V)
    per_group = GROUP_M * blocks_v
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_v = (pid % per_group) // group_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + rows, mask=rows < N, other=0.0)
    if tl.max(tl.abs(coef), axis=0) == 0.0:
        return
    live = (rows < N) & (coef != 0.0)   # ignored rows are never read: NaN there stays out of dW
    z = _tile_logits(h_ptr, h_sn, h_sk, w_ptr, w_sv, w_sk, b_ptr, b_s, rows, live, cols, V, H, HAS_BIAS,
                     BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
    m = tl.load(stats_ptr + rows, mask=live, other=0.0)
    s = tl.load(stats_ptr + N + rows, mask=live, other=1.0)
    q = tl.load(stats_ptr + 2 * N + rows, mask=live, other=0.0) / s
    y = tl.load(labels_ptr + rows, mask=live, other=-1)
    g = (-coef / s)[:, None] * tl.exp2((z - m[:, None]) * 1.4426950408889634)
    g = tl.where(cols[None, :] == y[:, None], (coef * q)[:, None], g)
    g = tl.where((cols < V)[None, :] & live[:, None], g, 0.0)
    if GRAD_W and HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols < V)
    g_in = g.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        if GRAD_H:
            w = tl.load(w_ptr + cols[:, None] * w_sv + ks[None, :] * w_sk, mask=(cols < V)[:, None] & (ks < H)[None, :],
                        other=0.0)
            if IEEE:
                part = tl.dot(g_in, w, input_precision="ieee")
            else:
                part = tl.dot(g_in, w)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], part, mask=live[:, None] & (ks < H)[None, :])
        if GRAD_W:
            h = tl.load(h_ptr + rows[:, None] * h_sn + ks[None, :] * h_sk, mask=live[:, None] & (ks < H)[None, :],
                        other=0.0)
            if IEEE:
                part = tl.dot(tl.trans(g_in), h, input_precision="ieee")
            else:
                part = tl.dot(tl.trans(g_in), h)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], part, mask=(cols < V)[:, None] & (ks < H)[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def tf32_allowed():
    """Whether the user allowed TF32 for fp32 matmuls: torch >= 2.9's ``fp32_precision`` (reading the
    legacy flag after the new API was used raises), else ``allow_tf32``; ``set_float32_matmul_precision``
    sets both."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def _operands(hidden, weight, bias):
    """(hidden, weight, bias) in one dtype (the promoted one; a copy only for mixed dtypes) and their strides."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    h, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    args = (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1),
            h if b is None else b, 0 if b is None else b.stride(0))
    ieee = dtype == torch.float32 and not tf32_allowed()  # follows torch's matmul setting
    meta = dict(HAS_BIAS=b is not None, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K, IEEE=ieee)
    return args, meta


def vocab_splits(n_rows, vocab, device):
    """Forward programs per row block: on a GPU enough to give every SM ``WAVES`` programs (few rows, as
    in a short batch, need many splits; 8192 rows need none), never more than the vocabulary's blocks."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(WAVES * sms, triton.cdiv(n_rows, BLOCK_M))
    else:
        wanted = VOCAB_SPLITS
    return max(1, min(wanted, triton.cdiv(vocab, BLOCK_V)))


def _stats_and_label_logit(hidden, weight, bias, labels, ignore_index):
    n, H = hidden.shape
    V = weight.shape[0]
    splits = vocab_splits(n, V, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), BLOCK_V) * BLOCK_V
    m = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    r, zy = torch.empty_like(m), torch.empty_like(m)
    args, meta = _operands(hidden, weight, bias)
    with device_guard(hidden):
        _stats_kernel[(triton.cdiv(n, BLOCK_M), splits)](*args, labels, ignore_index, n, V, H, cols_per_split,
                                                         m, r, zy, **meta)
    # Fixed-order merge of the splits (an empty split has m = -inf, r = 0); exactly one split holds the
    # label, the others contribute 0.
    m_all = m.amax(0)
    safe = torch.where(m_all == float("-inf"), torch.zeros_like(m_all), m_all)
    r_all = torch.where(m == float("-inf"), torch.zeros_like(r), r * torch.exp(m - safe)).sum(0)
    z_y = zy.sum(0)
    return m_all, r_all + torch.exp(z_y - m_all), r_all, z_y


def _gradients(hidden, weight, bias, labels, stats, coef, grad_hidden, grad_weight):
    n, H = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(n, H, dtype=torch.float32, device=hidden.device) if grad_hidden else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if grad_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if grad_weight and bias is not None else None
    if n and (grad_hidden or grad_weight):
        args, meta = _operands(hidden, weight, bias)
        stub = stats
        with device_guard(hidden):
            _grad_kernel[(triton.cdiv(n, BLOCK_M) * triton.cdiv(V, BLOCK_V),)](
                *args, labels, stats.float().contiguous(), coef.float().contiguous(), n, V, H,
                stub if dh is None else dh, stub if dw is None else dw, stub if db is None else db,
                GRAD_H=grad_hidden, GRAD_W=grad_weight, GROUP_M=GROUP_M, **meta)
    return (hidden.new_empty(0) if dh is None else dh.to(hidden.dtype),
            hidden.new_empty(0) if dw is None else dw.to(weight.dtype),
            hidden.new_empty(0) if db is None else db.to(bias.dtype))


def _logp(hidden, weight, bias, labels, ignore_index):
    """(logp [N], stats [3, N] = (m, s, r), mask): 0 / (0, 1, 0) on ignored rows."""
    mask = labels != ignore_index
    n = hidden.shape[0]
    if n == 0:
        return (hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(STATS_ROWS, 0, dtype=torch.float32),
                mask)
    m, s, r, z_y = _stats_and_label_logit(hidden, weight, bias, labels, ignore_index)
    zero = torch.zeros_like(m)
    logp = torch.where(mask, logp_and_q(z_y, m, s, r)[0], zero)
    stats = torch.stack([torch.where(mask, m, zero), torch.where(mask, s, torch.ones_like(s)),
                         torch.where(mask, r, zero)])
    return logp, stats, mask


def linear_logprobs(rows, hidden, weight, bias, labels, ignore_index):
    logp, stats, _ = _logp(hidden, weight, bias, labels, ignore_index)
    return logp, stats


def linear_logprobs_backward(rows, grad_logp, hidden, weight, bias, labels, stats, ignore_index, grad_hidden,
                             grad_weight):
    coef = torch.where(labels != ignore_index, grad_logp.float(), torch.zeros_like(grad_logp, dtype=torch.float32))
    return _gradients(hidden, weight, bias, labels, stats, coef, grad_hidden, grad_weight)


def linear_wspo(rows, hidden, weight, bias, labels, k, weight_t, gamma, ignore_index, grad_hidden, grad_weight):
    logp, stats, mask = _logp(hidden, weight, bias, labels, ignore_index)
    d = gamma * logp - torch.where(mask, k.float(), torch.zeros_like(logp))
    w = torch.where(mask, weight_t.float(), torch.zeros_like(logp))
    loss = (w * d * d).sum()
    dh, dw, db = _gradients(hidden, weight, bias, labels, stats, 2.0 * gamma * w * d, grad_hidden, grad_weight)
    return loss, logp, dh, dw, db
