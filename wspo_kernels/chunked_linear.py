"""Linear (hidden-state) forms: logits computed a chunk of rows at a time, never all N at once.

    z_c = h_c W^T + b          (one chunk of rows; fp32 results)
    row kernels of the chosen backend on z_c (statistics, label logit, gradient written over z_c)
    dh_c = G_c W,   dW += G_c^T h_c,   db += sum_rows G_c          (fp32 accumulation of dW, db)

GEMMs (``_Gemms``): bf16 / fp16 hidden states and head of one dtype on a GPU run as they are, on tensor
cores, with fp32 accumulation and fp32 results (``torch.mm(..., out_dtype=torch.float32)``, torch >=
2.8), G_c rounded to that dtype for the two gradient GEMMs (as Liger and the fused Triton kernel do);
nothing of the weight's size is copied.  Elsewhere (CPU, fp32, mixed dtypes, older torch) the weight is
upcast once per call and the GEMMs run in the accumulation dtype; ``EMULATE_LOWP_GEMMS = True`` computes
the GPU's numbers that way (G_c rounded; the tests check them on the CPU).

Ignored rows have a zero gradient row, and their hidden states are zeroed before the dW GEMM, so
NaN or inf there (0 * NaN = NaN) never reaches dW.  On the CPU they are first compacted away
(``_live_rows``): the GEMMs see only counted rows, as CCE's do.  Mixed dtypes compute in the promoted
accumulation dtype (fp16 hidden with an fp32 weight: fp32).

Peak extra memory is one chunk of fp32 logits plus the fp32 dW/db accumulators.  On the CPU a chunk is at
most ``LINEAR_CHUNK_ELEMS`` logits (128 MB; the rows split into equal chunks) but at least ``MIN_CHUNK_ROWS``
rows: skinny GEMMs are slow on CPUs, so a large vocabulary gets a larger chunk, not fewer rows: flat in N.
Measured on 2 Zen 4 cores, four models fwd+bwd at N=2048, H=512, V=32000 (before the compaction of
ignored rows): 131-row chunks 16% slower than 524-row ones; 524 / 1024 / 2048 rows (64 / 128 / 256 MB)
2.44 / 2.30 / 2.17 s at +132 / +195 / +320 MiB, CCE (which materialises all N rows) 2.16-2.20 s at
+285 MiB in the same runs.  On a GPU chunks are sized as
Liger sizes them (so they grow with N), the next power of two of N / ceil(V / H) rows (a chunk of logits about the size of the hidden
states: 256 rows, 131 MB, at N=8192, H=4096, V=128256), at least ``MIN_CHUNK_ROWS``: GEMMs with a few
dozen rows leave a GPU idle and stream the whole weight once per chunk.  ``WSPO_KERNELS_LINEAR_CHUNK_MB``
sets the chunk's size in MB of fp32 logits on either.
``linear_wspo`` writes the gradient in the forward pass (it needs the reduced loss to be a scalar:
the backward then only scales dh, dW, db); ``linear_logprobs`` saves only the per-row statistics and
recomputes each chunk's logits in its backward.
"""
import os

import torch

from ._inputs import STATS_ROWS, acc_dtype as _acc

LINEAR_CHUNK_ELEMS = 1 << 25   # fp32 logits per chunk (128 MB)
MIN_CHUNK_ROWS = 256
CHUNK_ENV_VAR = "WSPO_KERNELS_LINEAR_CHUNK_MB"


def _chunk_rows(n_rows: int, vocab: int, hidden_size: int = 0, device_type: str = "cpu") -> int:
    if os.environ.get(CHUNK_ENV_VAR):
        step = max(1, int(float(os.environ[CHUNK_ENV_VAR]) * 2 ** 20) // 4 // vocab)
    elif device_type == "cuda" and hidden_size:
        rows = -(-n_rows // -(-vocab // hidden_size))
        step = max(MIN_CHUNK_ROWS, 1 << max(0, rows - 1).bit_length())
    else:
        step = max(MIN_CHUNK_ROWS, LINEAR_CHUNK_ELEMS // vocab)
    n_chunks = max(1, -(-n_rows // max(1, step)))
    return max(1, -(-n_rows // n_chunks))   # balanced: no short last chunk


class _Chunks:
    """Row slices of one call, and the one logits buffer every chunk's GEMM writes into (``z(r)``).

    One buffer per call rather than a fresh GEMM result per chunk; on the CPU it comes from the rows
    backend's buffer cache where it keeps one (native: a freed block is handed out again), as a fresh
    64 MB block costs a page fault per 4 KiB on first touch -- on every chunk of every model, since
    blocks this large go back to the OS when freed.
    """

    def __init__(self, rows, hidden, vocab, acc):
        n = hidden.shape[0]
        self.step = _chunk_rows(n, vocab, hidden.shape[1], hidden.device.type)
        self.slices = [slice(r0, min(r0 + self.step, n)) for r0 in range(0, n, self.step)]
        like = torch.empty((), dtype=acc, device=hidden.device).expand(self.step, vocab)
        new = getattr(rows, "empty_grad_like", None)
        self.buffer = new(like) if new is not None else torch.empty(like.shape, dtype=acc, device=hidden.device)

    def __iter__(self):
        return iter(self.slices)

    def z(self, r):
        return self.buffer[: r.stop - r.start]


_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=): torch >= 2.8
# addmm(fp32 accumulator, bf16, bf16, out_dtype=fp32): CUDA required the accumulator's dtype to match the
# inputs' before torch 2.10; older versions accumulate dW through an fp32 GEMM instead.
_ADDMM_MIXED = _HAS_OUT_DTYPE and torch.torch_version.TorchVersion(torch.__version__) >= (2, 10)
EMULATE_LOWP_GEMMS = False


class _Gemms:
    """The three GEMMs of one call, in the precision described in the module docstring."""

    def __init__(self, hidden, weight, bias):
        emulate = EMULATE_LOWP_GEMMS
        self.acc = _acc(hidden, weight)
        lowp = hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16)
        self.native = lowp and hidden.is_cuda and _HAS_OUT_DTYPE and not emulate
        self.round_g = lowp and (self.native or emulate)   # G_c in the inputs' dtype for the gradient GEMMs
        self.weight = weight if self.native else weight.to(self.acc)
        self.lowp_dtype = weight.dtype
        self.bias = None if bias is None else bias.to(self.acc)

    def logits(self, h_c, out):
        """z_c = h_c W^T + b into ``out`` (fp32, the chunk's rows)."""
        if self.native:
            torch.mm(h_c, self.weight.t(), out_dtype=torch.float32, out=out)
        else:
            torch.mm(h_c.to(self.acc), self.weight.t(), out=out)
        return out if self.bias is None else out.add_(self.bias)

    def backprop(self, g, h_c, labels_c, ignore_index, dh, dw, db, r):
        """One chunk's logits gradient ``g`` through the GEMM into dh, dW, db (None: not wanted).

        dW is written by the first chunk's GEMM and accumulated by the others' (no zeroing pass)."""
        first = r.start == 0
        if db is not None:
            db += g.sum(0)
        live = (labels_c != ignore_index)[:, None]
        g_in = g.to(self.lowp_dtype) if self.round_g else g
        if not self.native:
            g_in = g_in.to(self.acc)
        if dh is not None:   # accumulated in fp32 (cuBLAS does for bf16 / fp16), rounded once into dh
            if dh.dtype == g_in.dtype:
                torch.mm(g_in, self.weight, out=dh[r])
            else:
                dh[r] = g_in @ self.weight
        if dw is not None:
            h_live = torch.where(live, h_c, torch.zeros((), dtype=h_c.dtype, device=h_c.device))
            if self.native and _ADDMM_MIXED:
                if first:
                    torch.mm(g_in.t(), h_live, out_dtype=torch.float32, out=dw)
                else:
                    torch.addmm(dw, g_in.t(), h_live, out_dtype=torch.float32, out=dw)
            else:
                a, b = (g_in.t().float(), h_live.float()) if self.native else (g_in.t(), h_live.to(self.acc))
                torch.mm(a, b, out=dw) if first else dw.addmm_(a, b)


def _live_rows(hidden, labels, ignore_index):
    """The counted rows' indices when some rows are ignored and the rows are on the CPU, else None.

    Ignored rows then do no GEMM work at all (a prompt is often a third of the tokens; CCE drops
    ignored rows the same way), and get the ignored-row outputs: logp 0, statistics (0, 1, 0), a zero
    gradient row.  Not on GPUs: sizing the compacted rows would be a host synchronisation.
    """
    if hidden.device.type != "cpu":
        return None
    live = labels != ignore_index
    if bool(live.all()):
        return None
    return live.nonzero().squeeze(1)


def _spread(values, idx, n, fill=(0.0,)):
    """[..., n_live] -> [..., n]: the live rows' values at ``idx``; elsewhere ``fill`` (one per leading row)."""
    lead = values.shape[:-1]
    out = torch.tensor(fill, dtype=values.dtype, device=values.device).reshape(*lead, 1).expand(*lead, n).clone()
    out[..., idx] = values
    return out


def _spread_dh(dh, idx, hidden, grad_hidden):
    if not grad_hidden:
        return dh
    out = hidden.new_zeros(hidden.shape)
    out[idx] = dh
    return out


IGNORED_STATS = (0.0, 1.0, 0.0)   # (m, s, r) of an ignored row, as the row kernels write them


def linear_logprobs(rows, hidden, weight, bias, labels, ignore_index):
    idx = _live_rows(hidden, labels, ignore_index)
    if idx is not None:
        logp, stats = linear_logprobs(rows, hidden[idx], weight, bias, labels[idx], ignore_index)
        n = hidden.shape[0]
        return _spread(logp, idx, n), _spread(stats, idx, n, IGNORED_STATS)
    gemms = _Gemms(hidden, weight, bias)
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=gemms.acc, device=hidden.device)
    stats = torch.empty(STATS_ROWS, n, dtype=gemms.acc, device=hidden.device)
    chunks = _Chunks(rows, hidden, weight.shape[0], gemms.acc)
    for r in chunks:
        logp[r], stats[:, r] = rows.logprobs(gemms.logits(hidden[r], chunks.z(r)), labels[r], ignore_index)
    return logp, stats


def _grad_buffers(hidden, weight, bias, acc, grad_hidden, grad_weight):
    dh = torch.empty_like(hidden) if grad_hidden else None
    new = torch.empty if hidden.shape[0] > 0 else torch.zeros   # the first chunk writes dW; no chunk: zeros
    dw = new(weight.shape, dtype=acc, device=weight.device) if grad_weight else None
    db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if grad_weight and bias is not None else None
    return dh, dw, db


def _finish(hidden, weight, bias, dh, dw, db):
    """Gradients in the parameters' dtypes; an empty tensor stands for one that was not computed."""
    return (hidden.new_empty(0) if dh is None else dh,
            hidden.new_empty(0) if dw is None else dw.to(weight.dtype),
            hidden.new_empty(0) if db is None else db.to(bias.dtype))


def linear_logprobs_backward(rows, grad_logp, hidden, weight, bias, labels, stats, ignore_index,
                             grad_hidden, grad_weight):
    idx = _live_rows(hidden, labels, ignore_index)
    if idx is not None:
        dh, dw, db = linear_logprobs_backward(rows, grad_logp[idx], hidden[idx], weight, bias, labels[idx],
                                              stats[:, idx], ignore_index, grad_hidden, grad_weight)
        return _spread_dh(dh, idx, hidden, grad_hidden), dw, db
    gemms = _Gemms(hidden, weight, bias)
    dh, dw, db = _grad_buffers(hidden, weight, bias, gemms.acc, grad_hidden, grad_weight)
    chunks = _Chunks(rows, hidden, weight.shape[0], gemms.acc)
    for r in chunks:
        z = gemms.logits(hidden[r], chunks.z(r))
        g = rows.logprobs_backward(z, labels[r], stats[:, r], grad_logp[r], ignore_index, out=z)
        gemms.backprop(g, hidden[r], labels[r], ignore_index, dh, dw, db, r)
    return _finish(hidden, weight, bias, dh, dw, db)


def linear_wspo(rows, hidden, weight, bias, labels, k, weight_t, gamma, ignore_index, grad_hidden, grad_weight):
    """Returns (sum_t loss_t, logp [N], dh, dW, db): gradients of the summed loss, written in forward."""
    idx = _live_rows(hidden, labels, ignore_index)
    if idx is not None:
        loss, logp, dh, dw, db = linear_wspo(rows, hidden[idx], weight, bias, labels[idx], k[idx], weight_t[idx],
                                             gamma, ignore_index, grad_hidden, grad_weight)
        return loss, _spread(logp, idx, hidden.shape[0]), _spread_dh(dh, idx, hidden, grad_hidden), dw, db
    gemms = _Gemms(hidden, weight, bias)
    acc = gemms.acc
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    compute_grad = grad_hidden or grad_weight
    dh, dw, db = _grad_buffers(hidden, weight, bias, acc, grad_hidden, grad_weight)
    chunks = _Chunks(rows, hidden, weight.shape[0], acc)
    for r in chunks:
        z = gemms.logits(hidden[r], chunks.z(r))
        loss_r, logp[r] = rows.wspo_rows(z, labels[r], k[r], weight_t[r], gamma, ignore_index,
                                         z if compute_grad else None)
        loss += loss_r.sum()
        if compute_grad:
            gemms.backprop(z, hidden[r], labels[r], ignore_index, dh, dw, db, r)
    return (loss, logp, *_finish(hidden, weight, bias, dh, dw, db))
