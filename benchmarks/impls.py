"""The implementations compared by the benchmarks, each written the way its users write it.

Every factory takes the case's inputs and returns a zero-argument callable that runs one
forward+backward of the WSPO loss (the policy gets a gradient; the frozen models do not).
"""
import torch
from torch.utils.checkpoint import checkpoint

import wspo_kernels as wk

GAMMA = 0.1
IGNORE = -100


def _wspo_from_logps(lp, lr, la, lw, mask):
    """The official reduction: per-sequence mean of d^2 over response tokens, mean over sequences."""
    d = GAMMA * (lp - lr) - (la - lw)
    return ((d * d * mask).sum(-1) / mask.sum(-1)).mean()


def _shifted(labels):
    lab = labels[:, 1:]
    mask = lab != IGNORE
    return lab.masked_fill(~mask, 0), mask


# ------------------------------------------------------------------------------------------ logits
def official_logits(policy, frozen, labels):
    """The official WSPO code: fp32 upcast, full log_softmax and gather for all four models."""
    lab, mask = _shifted(labels)

    def logps(z):
        return torch.gather(z[:, :-1].float().log_softmax(-1), 2, lab.unsqueeze(-1)).squeeze(-1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(z) for z in frozen)
        _wspo_from_logps(logps(policy), lr, la, lw, mask).backward()
    return step


def _selective_log_softmax(logits, index):
    """TRL's selective_log_softmax: gather the label logit, then a logsumexp per sequence in a loop."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    return torch.stack([torch.gather(row.log_softmax(-1), -1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def trl_logits(policy, frozen, labels):
    lab, mask = _shifted(labels)

    def step():
        with torch.no_grad():
            lr, la, lw = (_selective_log_softmax(z[:, :-1], lab) for z in frozen)
        _wspo_from_logps(_selective_log_softmax(policy[:, :-1], lab), lr, la, lw, mask).backward()
    return step


def ours_logits(backend, inplace_grad=False):
    def factory(policy, frozen, labels):
        def step():
            # In place, the gradient overwrites the input logits from the first step on; the kernel's
            # work does not depend on the values, so later steps time the same thing.
            wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                         gamma=GAMMA, backend=backend, inplace_grad=inplace_grad).backward()
        return step
    return factory


# ------------------------------------------------------------------------------------------ linear
def official_linear(hidden, weights, labels):
    """lm_head GEMM for each model, then the official formulation on the four logits."""
    lab, mask = _shifted(labels)

    def logps(h, w):
        return torch.gather((h @ w.t())[:, :-1].float().log_softmax(-1), 2, lab.unsqueeze(-1)).squeeze(-1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w) for h, w in zip(hidden[1:], weights[1:]))
        _wspo_from_logps(logps(hidden[0], weights[0]), lr, la, lw, mask).backward()
    return step


def hand_chunked_linear(hidden, weights, labels, chunk=1024):
    """What a careful user writes: rows in chunks, each chunk's logits under activation checkpointing."""
    lab, mask = _shifted(labels)
    B, T, H = hidden[0].shape

    def chunk_logps(h, w, y):
        z = (h @ w.t()).float()
        return torch.gather(z.log_softmax(-1), 1, y.unsqueeze(-1)).squeeze(-1)

    def logps(h, w, grad):
        flat_h, flat_y = h[:, :-1].reshape(-1, H), lab.reshape(-1)
        parts = []
        for r0 in range(0, flat_h.shape[0], chunk):
            args = (flat_h[r0:r0 + chunk], w, flat_y[r0:r0 + chunk])
            parts.append(checkpoint(chunk_logps, *args, use_reentrant=False) if grad else chunk_logps(*args))
        return torch.cat(parts).view(B, T - 1)

    def step():
        with torch.no_grad():
            lr, la, lw = (logps(h, w, False) for h, w in zip(hidden[1:], weights[1:]))
        _wspo_from_logps(logps(hidden[0], weights[0], True), lr, la, lw, mask).backward()
    return step


def ours_linear(backend):
    def factory(hidden, weights, labels):
        def step():
            wk.linear_wspo_loss(hidden[0], weights[0], labels, gamma=GAMMA, backend=backend,
                                ref=(hidden[1], weights[1]), weak_aligned=(hidden[2], weights[2]),
                                weak_base=(hidden[3], weights[3])).backward()
        return step
    return factory


LOGITS_IMPLS = {"official": official_logits, "trl": trl_logits,
                "ours-torch": ours_logits("torch"), "ours-native": ours_logits("native"),
                "ours-native-inplace": ours_logits("native", inplace_grad=True)}
LINEAR_IMPLS = {"official": official_linear, "hand-chunked": hand_chunked_linear,
                "ours-torch": ours_linear("torch"), "ours-native": ours_linear("native")}
