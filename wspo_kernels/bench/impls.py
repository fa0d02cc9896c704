"""The implementations compared by the benchmarks, each written the way its users write it.

A factory takes the case's inputs (a dict from ``runner.make_inputs``) and returns a zero-argument
step: forward+backward of the WSPO loss (the policy gets a gradient, the frozen models do not), or,
for the ``logps`` kind, the forward-only per-token logps of one frozen model.  ``available(device)``
says why a peer cannot run (not installed, GPU only) instead of faking it.
"""
import contextlib
import importlib.util
import os

import torch
from torch.utils.checkpoint import checkpoint

import wspo_kernels as wk
from wspo_kernels import ops

GAMMA = 0.1
IGNORE = -100


def official_reduction(lp, lr, la, lw, mask, gamma=GAMMA):
    """The official reduction: per-sequence mean of d^2 over response tokens, mean over sequences."""
    d = gamma * (lp - lr) - (la - lw)
    return ((d * d * mask).sum(-1) / mask.sum(-1)).mean()


def shifted(labels):
    lab = labels[:, 1:]
    mask = lab != IGNORE
    return lab.masked_fill(~mask, 0), mask


def official_token_logps(z, lab):
    """The official code's per-token logps: fp32 upcast, full log_softmax, gather."""
    return torch.gather(z[:, :-1].float().log_softmax(-1), 2, lab.unsqueeze(-1)).squeeze(-1)


def _selective_log_softmax(logits, index):
    """TRL's selective_log_softmax: gather the label logit, then a logsumexp per sequence in a loop."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([torch.gather(row.log_softmax(-1), -1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def _four_logps(logps_of, policy, frozen, lab, mask):
    with torch.no_grad():
        lr, la, lw = (logps_of(z) for z in frozen)
    official_reduction(logps_of(policy), lr, la, lw, mask).backward()


# ------------------------------------------------------------------------------------------ logits
def official_logits(x):
    lab, mask = shifted(x["labels"])
    return lambda: _four_logps(lambda z: official_token_logps(z, lab), x["policy"], x["frozen"], lab, mask)


def trl_logits(x):
    lab, mask = shifted(x["labels"])
    return lambda: _four_logps(lambda z: _selective_log_softmax(z[:, :-1], lab), x["policy"], x["frozen"], lab, mask)


def ours_logits(backend, *, inplace_grad=False, precomputed=False):
    def factory(x):
        frozen = x["frozen"]
        if precomputed:  # the frozen models' logps were computed once, offline
            frozen = [wk.token_logprobs(z, x["labels"], shift=True, backend=backend) for z in frozen]

        def step():
            # In place, the gradient overwrites the input logits from the first step on; the work
            # does not depend on the values, so later steps time the same thing.
            wk.wspo_loss(x["policy"], x["labels"], ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                         gamma=GAMMA, backend=backend, inplace_grad=inplace_grad).backward()
        return step
    return factory


# ------------------------------------------------------------------------------------------ linear
def official_linear(x):
    lab, mask = shifted(x["labels"])

    def step():
        with torch.no_grad():
            lr, la, lw = (official_token_logps(h @ w.t(), lab) for h, w in zip(x["hidden"][1:], x["weights"][1:]))
        official_reduction(official_token_logps(x["hidden"][0] @ x["weights"][0].t(), lab), lr, la, lw, mask).backward()
    return step


def hand_chunked_linear(x, chunk=1024):
    """What a careful user writes: rows in chunks, each chunk's logits under activation checkpointing."""
    lab, mask = shifted(x["labels"])
    B, T, H = x["hidden"][0].shape

    def chunk_logps(h, w, y):
        return torch.gather((h @ w.t()).float().log_softmax(-1), 1, y.unsqueeze(-1)).squeeze(-1)

    def logps(h, w, grad):
        flat_h, flat_y = h[:, :-1].reshape(-1, H), lab.reshape(-1)
        parts = []
        for r0 in range(0, flat_h.shape[0], chunk):
            args = (flat_h[r0:r0 + chunk], w, flat_y[r0:r0 + chunk])
            parts.append(checkpoint(chunk_logps, *args, use_reentrant=False) if grad else chunk_logps(*args))
        return torch.cat(parts).view(B, T - 1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w, False) for h, w in zip(x["hidden"][1:], x["weights"][1:]))
        official_reduction(logps(x["hidden"][0], x["weights"][0], True), lr, la, lw, mask).backward()
    return step


def cce_linear(x):
    """Cut Cross-Entropy per model (reduction='none' gives -logp): torch_compile on CPU, its kernel on GPU."""
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if x["hidden"][0].is_cuda else "torch_compile"
    _, mask = shifted(x["labels"])

    def logps(h, w):
        return -linear_cross_entropy(h, w, x["labels"], reduction="none", shift=1, impl=impl)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w) for h, w in zip(x["hidden"][1:], x["weights"][1:]))
        official_reduction(logps(x["hidden"][0], x["weights"][0]), lr, la, lw, mask).backward()
    return step


def torch_lce_linear(x):
    """PyTorch's own chunked ``torch.nn.functional.linear_cross_entropy`` per model (torch >= 2.13, default
    ``LinearCrossEntropyOptions``; reduction='none' gives -logp): what a PyTorch user reaches for first."""
    F = torch.nn.functional
    options = torch.nn.LinearCrossEntropyOptions()
    _, mask = shifted(x["labels"])
    B, T, H = x["hidden"][0].shape
    flat_y = x["labels"][:, 1:].reshape(-1)

    def logps(h, w):
        return -F.linear_cross_entropy(h[:, :-1].reshape(-1, H), w, flat_y, reduction="none", ignore_index=-100,
                                       options=options).view(B, T - 1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w) for h, w in zip(x["hidden"][1:], x["weights"][1:]))
        official_reduction(logps(x["hidden"][0], x["weights"][0]), lr, la, lw, mask).backward()
    return step


def liger_linear(x):
    """Liger's fused linear cross-entropy per model, reduction='none' (GPU only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    lab, mask = shifted(x["labels"])
    ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    B, T, H = x["hidden"][0].shape
    flat_y = x["labels"][:, 1:].reshape(-1)

    def logps(h, w):
        return -ce(w, h[:, :-1].reshape(-1, H), flat_y).view(B, T - 1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w) for h, w in zip(x["hidden"][1:], x["weights"][1:]))
        official_reduction(logps(x["hidden"][0], x["weights"][0]), lr, la, lw, mask).backward()
    return step


@contextlib.contextmanager
def _linear_choice(linear):
    """WSPO_KERNELS_LINEAR = ``linear`` for one step (None: as it is), restored after it."""
    before = os.environ.get(ops.LINEAR_ENV_VAR)
    if linear is not None:
        os.environ[ops.LINEAR_ENV_VAR] = linear
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ops.LINEAR_ENV_VAR, None)
        else:
            os.environ[ops.LINEAR_ENV_VAR] = before


def ours_linear(backend, *, precomputed=False, linear=None):
    """``linear``: WSPO_KERNELS_LINEAR for this implementation's steps (e.g. Triton's opt-in ``fused``)."""
    def factory(x):
        h, w = x["hidden"], x["weights"]
        frozen = list(zip(h[1:], w[1:]))
        if precomputed:
            frozen = [wk.linear_token_logprobs(hh, ww, x["labels"], shift=True, backend=backend) for hh, ww in frozen]

        def step():
            with _linear_choice(linear):
                wk.linear_wspo_loss(h[0], w[0], x["labels"], ref=frozen[0], weak_aligned=frozen[1],
                                    weak_base=frozen[2], gamma=GAMMA, backend=backend).backward()
        return step
    return factory


# ------------------------------------------------------------------------------------------ logps (forward only)
def official_logps(x):
    lab, _ = shifted(x["labels"])
    return lambda: official_token_logps(x["frozen"][0], lab)


def trl_logps(x):
    lab, _ = shifted(x["labels"])
    return lambda: _selective_log_softmax(x["frozen"][0][:, :-1], lab)


def ours_logps(backend):
    def factory(x):
        return lambda: wk.token_logprobs(x["frozen"][0], x["labels"], shift=True, backend=backend)
    return factory


# ------------------------------------------------------------------------------------------ registry
def _ours(kind):
    out = {}
    for b in ("torch", "native", "triton"):
        if kind == "logits":
            out[f"ours-{b}"] = ours_logits(b)
            out[f"ours-{b}-inplace"] = ours_logits(b, inplace_grad=True)
            out[f"ours-{b}-precomputed"] = ours_logits(b, precomputed=True)
        elif kind == "linear":
            out[f"ours-{b}"] = ours_linear(b)
            out[f"ours-{b}-precomputed"] = ours_linear(b, precomputed=True)
            if b == "triton":  # its opt-in logits-free kernels, timed beside the default chunked driver
                out[f"ours-{b}-fused"] = ours_linear(b, linear="fused")
        else:
            out[f"ours-{b}"] = ours_logps(b)
    return out


IMPLS = {
    "logits": {"official": official_logits, "trl": trl_logits, **_ours("logits")},
    "linear": {"official": official_linear, "hand-chunked": hand_chunked_linear, "cce": cce_linear,
               "torch-lce": torch_lce_linear, "liger": liger_linear, **_ours("linear")},
    "logps": {"official": official_logps, "trl": trl_logps, **_ours("logps")},
}
PEERS = ("official", "trl", "hand-chunked", "cce", "torch-lce", "liger")


def available(impl: str, device: torch.device, dtype: torch.dtype):
    """None if ``impl`` can run here, else why not (a skipped row, never a faked one)."""
    if impl == "cce" and importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy not installed (pip install .[bench])"
    if impl == "torch-lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch.nn.functional.linear_cross_entropy with options needs torch >= 2.13 (have {torch.__version__})"
    if impl == "liger":
        if device.type != "cuda":
            return "Liger is GPU only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
    if impl.startswith("ours-"):
        backend = impl.split("-")[1]
        try:
            wk.select_backend(backend, device, dtype)
        except RuntimeError as exc:
            return str(exc)
    return None
