"""Bad input raises a clear error before any kernel runs."""
import math

import pytest
import torch

import wspo_kernels as wk
from helpers import BACKENDS


def _batch(B=2, T=4, V=11):
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, T, V, generator=g) for _ in range(4)]
    labels = torch.randint(0, V, (B, T), generator=g)
    return logits, labels


def _loss(policy, labels, frozen, **kw):
    return wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda p, y, f: (p[:, :3], y, f), ValueError, "policy_logits must have shape"),
    (lambda p, y, f: (p, y[:1], f), ValueError, "policy_logits must have shape"),
    (lambda p, y, f: (p, y, [f[0][:1], f[1], f[2]]), ValueError, r"ref must have shape \(2, 4, 'V'\)"),
    (lambda p, y, f: (p, y, [f[0], f[1][:, :2], f[2]]), ValueError, "weak_aligned must have shape"),
    (lambda p, y, f: (p, y, [f[0], f[1], torch.zeros(2, 5)]), ValueError, r"weak_base must be logits of shape \(2, 4, 'V'\) or per-token logps of shape \(2, 3\)"),
    (lambda p, y, f: (p.long(), y, f), TypeError, "float32, bfloat16, float16"),
    (lambda p, y, f: (p.to(torch.complex64), y, f), TypeError, "float32, bfloat16, float16"),
    (lambda p, y, f: (p, y, [f[0].int(), f[1], f[2]]), TypeError, "ref must be float32"),
    (lambda p, y, f: (p, y.float(), f), TypeError, "labels must be an integer tensor"),
    (lambda p, y, f: (p, y.fill_(11), f), ValueError, r"labels must be in \[0, 11\)"),
    (lambda p, y, f: (p, y.fill_(-3), f), ValueError, "found -3"),
    (lambda p, y, f: (p, y, [f[0], f[1][..., :5], f[2]]), ValueError, r"\[0, 5\) for weak_aligned"),
    (lambda p, y, f: (p, y, [f[0].to("meta"), f[1], f[2]]), ValueError, "ref is on meta"),
    (lambda p, y, f: (p, y, [("h", "w"), f[1], f[2]]), TypeError, "ref hidden must be a torch.Tensor"),
    (lambda p, y, f: (p, y, [(torch.randn(2, 4, 3), torch.randn(11, 5)), f[1], f[2]]), ValueError,
     r"ref weight must be \[V, H=3\]"),
])
def test_bad_inputs(mutate, exc, match):
    logits, labels = _batch()
    policy, labels, frozen = mutate(logits[0], labels.clone(), logits[1:])
    with pytest.raises(exc, match=match):
        _loss(policy, labels, frozen)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(gamma=math.nan), ValueError, "gamma must be finite"),
    (dict(gamma=math.inf), ValueError, "gamma must be finite"),
    (dict(gamma="0.1"), TypeError, "gamma must be a real number"),
    (dict(normalizer=0), ValueError, "normalizer must be finite and > 0"),
    (dict(normalizer=2, reduction="sum"), ValueError, "normalizer only applies"),
    (dict(backend="cuda-magic"), ValueError, "unknown backend"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_bad_options(kwargs, exc, match):
    logits, labels = _batch()
    with pytest.raises(exc, match=match):
        _loss(logits[0], labels, logits[1:], **kwargs)


def test_labels_checked_against_frozen_logps_path_too():
    logits, labels = _batch()
    logps = [wk.token_logprobs(x, labels, shift=True) for x in logits[1:]]
    labels[0, 2] = 99
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        _loss(logits[0], labels, logps)


def test_linear_bad_inputs():
    logits, labels = _batch()
    h, w = torch.randn(2, 4, 8), torch.randn(11, 8)
    frozen = dict(ref=logits[1], weak_aligned=logits[2], weak_base=logits[3])
    with pytest.raises(ValueError, match=r"policy weight must be \[V, H=8\]"):
        wk.linear_wspo_loss(h, w.t(), labels, **frozen)
    with pytest.raises(ValueError, match=r"policy bias must be \[V=11\]"):
        wk.linear_wspo_loss(h, w, labels, bias=torch.zeros(3), **frozen)
    with pytest.raises(ValueError, match="policy hidden must have shape"):
        wk.linear_wspo_loss(h[:, :2], w, labels, **frozen)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        wk.linear_wspo_loss(h, w, labels.fill_(20), **frozen)


def test_bad_cu_seqlens():
    x, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to N=6"):
        wk.token_logprobs(x, y, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="requires flat"):
        wk.token_logprobs(x.view(2, 3, 5), y.view(2, 3), cu_seqlens=torch.tensor([0, 3, 6]))


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        wk.WSPOLoss(reduction="median")
    with pytest.raises(ValueError, match="gamma must be finite"):
        wk.LinearWSPOLoss(gamma=float("nan"))


def test_label_check_cannot_be_switched_off_on_cpu(monkeypatch):
    """The opt-out only drops the GPU host sync; CPU tensors are always checked."""
    monkeypatch.setenv("WSPO_KERNELS_CHECK_LABELS", "0")
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
        _loss(logits[0], labels.fill_(11), logits[1:])


# ---------------------------------------------------------------------------------------------- the table
def _linear(h, w, labels, frozen, **kw):
    return wk.linear_wspo_loss(h, w, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], **kw)


_G = torch.Generator().manual_seed(1)
_LOGITS = [torch.randn(2, 4, 11, generator=_G) for _ in range(4)]
_LABELS = torch.randint(0, 11, (2, 4), generator=_G)
_HIDDEN, _WEIGHT = torch.randn(2, 4, 5, generator=_G), torch.randn(11, 5, generator=_G)
_BIG = torch.full((2, 4), 12)
_BIG[:, 0] = 0

# (call, exception, message that names the argument); every row must raise before any kernel runs.
BAD_INPUTS = {
    "normalizer tensor 0": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], normalizer=torch.tensor(0.0)),
                            ValueError, "normalizer must be finite and > 0"),
    "normalizer tensor < 0": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], normalizer=torch.tensor([-2.0])),
                              ValueError, "normalizer must be finite and > 0"),
    "normalizer tensor NaN": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], normalizer=torch.tensor(math.nan)),
                              ValueError, "normalizer must be finite and > 0"),
    "normalizer tensor inf": (lambda: _linear(_HIDDEN, _WEIGHT, _LABELS, _LOGITS[1:],
                                              normalizer=torch.tensor(math.inf)),
                              ValueError, "normalizer must be finite and > 0"),
    "normalizer 2 elements": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], normalizer=torch.ones(2)),
                              ValueError, "normalizer tensor must hold a single"),
    "cu_seqlens bool": (lambda: wk.token_logprobs(_LOGITS[0][0], _LABELS[0], cu_seqlens=torch.tensor([False, True])),
                        TypeError, "cu_seqlens must be an integer tensor"),
    "cu_seqlens float": (lambda: wk.token_logprobs(_LOGITS[0][0], _LABELS[0], cu_seqlens=torch.tensor([0.0, 4.0])),
                         TypeError, "cu_seqlens must be an integer tensor"),
    "cu_seqlens list of floats": (lambda: wk.token_logprobs(_LOGITS[0][0], _LABELS[0], cu_seqlens=[0, 4.0]),
                                  TypeError, "cu_seqlens as a list must hold ints"),
    "cu_seqlens string": (lambda: wk.token_logprobs(_LOGITS[0][0], _LABELS[0], cu_seqlens="0,4"),
                          TypeError, "cu_seqlens must be"),
    "shift None": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], shift=None), TypeError, "shift must be True or"),
    "shift string": (lambda: wk.token_logprobs(_LOGITS[0], _LABELS, shift="yes"), TypeError, "shift must be True"),
    "gamma 1e30": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], gamma=1e30), ValueError, "gamma must be finite"),
    "gamma tensor": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], gamma=torch.tensor(0.1)), TypeError,
                     "gamma must be a real number"),
    "gamma bool": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], gamma=True), TypeError, "gamma must be a real"),
    "ignore_index 2**70": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], ignore_index=2 ** 70), ValueError,
                           "ignore_index must fit in int64"),
    "ignore_index float": (lambda: wk.token_logprobs(_LOGITS[0], _LABELS, ignore_index=-100.0), TypeError,
                           "ignore_index must be an int"),
    "reduction None": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], reduction=None), ValueError,
                       "reduction must be one of"),
    "inplace_grad string": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], inplace_grad="yes"), TypeError,
                            "inplace_grad must be True or False"),
    "return_metrics int": (lambda: _loss(_LOGITS[0], _LABELS, _LOGITS[1:], return_metrics=1), TypeError,
                           "return_metrics must be True or False"),
    "hidden size 0": (lambda: _linear(torch.randn(2, 4, 0), torch.randn(11, 0), _LABELS, _LOGITS[1:]), ValueError,
                      "policy hidden has hidden size H=0"),
    "frozen tuple hidden size 0": (lambda: _loss(_LOGITS[0], _LABELS, [(torch.randn(2, 4, 0), torch.randn(11, 0)),
                                                                      *_LOGITS[2:]]),
                                   ValueError, "ref hidden has hidden size H=0"),
    "label outside ref logits": (lambda: _loss(torch.randn(2, 4, 13), _BIG, [torch.randn(2, 4, 12),
                                                                             torch.randn(2, 4, 13),
                                                                             torch.randn(2, 4, 13)]),
                                 ValueError, r"\[0, 12\) for ref"),
    "label outside weak_base logits (logps elsewhere)": (
        lambda: _loss(torch.randn(2, 4, 13), _BIG, [torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(2, 4, 12)]),
        ValueError, r"\[0, 12\) for weak_base"),
    "label outside weak_aligned lm_head": (
        lambda: _loss(torch.randn(2, 4, 13), _BIG, [torch.zeros(2, 3), (_HIDDEN, torch.randn(12, 5)),
                                                     torch.zeros(2, 3)]),
        ValueError, r"\[0, 12\) for weak_aligned"),
    "label outside policy lm_head": (lambda: _linear(_HIDDEN, torch.randn(12, 5), _BIG, [torch.zeros(2, 3)] * 3),
                                     ValueError, r"\[0, 12\) for lm_head_weight"),
    "labels 3-D": (lambda: wk.token_logprobs(_LOGITS[0], _LABELS[None]), ValueError, "labels must be"),
    "labels float": (lambda: wk.token_logprobs(_LOGITS[0], _LABELS.float()), TypeError, "labels must be an integer"),
    "weak_log_ratio base None": (lambda: wk.weak_log_ratio(_LOGITS[0], None, _LABELS), TypeError,
                                 "base_logits must be a torch.Tensor"),
    "weak_log_ratio aligned list": (lambda: wk.weak_log_ratio([1.0], _LOGITS[1], _LABELS), TypeError,
                                    "aligned_logits must be a torch.Tensor"),
    "weak_log_ratio base shape": (lambda: wk.weak_log_ratio(_LOGITS[0], _LOGITS[1][:1], _LABELS), ValueError,
                                  "base_logits must have shape"),
    "policy wrong device": (lambda: _loss(_LOGITS[0].to("meta"), _LABELS, _LOGITS[1:]), ValueError,
                            "policy_logits is on meta"),
    "module ignore_index float": (lambda: wk.WSPOLoss(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    "module shift string": (lambda: wk.LinearWSPOLoss(shift="yes"), TypeError, "shift must be True or False"),
    "module inplace_grad int": (lambda: wk.WSPOLoss(inplace_grad=1), TypeError, "inplace_grad must be True or"),
    "module gamma 1e30": (lambda: wk.WSPOLoss(gamma=1e30), ValueError, "gamma must be finite"),
    "module backend": (lambda: wk.LinearWSPOLoss(backend="cuda"), ValueError, "unknown backend"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_table(case):
    call, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        call()


def test_cu_seqlens_as_a_list_is_accepted():
    flat = _LOGITS[0].reshape(8, 11)
    got = wk.token_logprobs(flat, _LABELS.reshape(-1), cu_seqlens=[0, 4, 8], shift=True)
    want = wk.token_logprobs(flat, _LABELS.reshape(-1), cu_seqlens=torch.tensor([0, 4, 8]), shift=True)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- double backward
def _double_backward_cases():
    """Every differentiable entry point, as (name, make): make() -> (output to differentiate, leaves)."""
    def logits(reduction="mean", precomputed=False, inplace=False):
        def make(backend):
            f, y = _batch(T=5)
            p = f[0].clone().requires_grad_()
            frozen = [wk.token_logprobs(z, y, shift=True) for z in f[1:]] if precomputed else f[1:]
            loss = _loss(p if not inplace else p.clone(), y, frozen, reduction=reduction, inplace_grad=inplace,
                         backend=backend)
            return loss.sum(), [p]
        return make

    def linear(reduction="mean"):
        def make(backend):
            g = torch.Generator().manual_seed(1)
            h, w = torch.randn(2, 5, 3, generator=g).requires_grad_(), torch.randn(11, 3, generator=g).requires_grad_()
            f, y = _batch(T=5)
            return _linear(h, w, y, f[1:], reduction=reduction, backend=backend).sum(), [h, w]
        return make

    def token(backend):
        f, y = _batch(T=5)
        p = f[0].clone().requires_grad_()
        return wk.token_logprobs(p, y, backend=backend).sum(), [p]

    def linear_token(backend):
        f, y = _batch(T=5)
        h, w = torch.randn(2, 5, 3).requires_grad_(), torch.randn(11, 3).requires_grad_()
        return wk.linear_token_logprobs(h, w, y, backend=backend).sum(), [h, w]

    return {"wspo_loss four logits": logits(), "wspo_loss reduction none": logits("none"),
            "wspo_loss precomputed": logits(precomputed=True), "wspo_loss inplace_grad": logits(inplace=True),
            "linear_wspo_loss": linear(), "linear_wspo_loss reduction none": linear("none"),
            "token_logprobs": token, "linear_token_logprobs": linear_token}


DOUBLE_BACKWARD = _double_backward_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD))
def test_create_graph_is_refused_not_silently_first_order(case, backend):
    """The backward is a fused kernel with no derivative: create_graph=True names itself and the way out
    (before, the gradient came back without a graph: the Hessian was silently lost)."""
    out, leaves = DOUBLE_BACKWARD[case](backend)
    with pytest.raises(RuntimeError, match=r"create_graph=True \(double backward\) is not supported.*"
                                           r"first-order gradients.*reference_wspo_loss"):
        torch.autograd.grad(out, leaves, create_graph=True)
    out, leaves = DOUBLE_BACKWARD[case](backend)
    with pytest.raises(RuntimeError, match=r"create_graph=True"):
        out.backward(create_graph=True)
    out, leaves = DOUBLE_BACKWARD[case](backend)  # first order still works, also inside enable_grad
    with torch.enable_grad():
        grads = torch.autograd.grad(out, leaves)
    assert all(g is not None and torch.isfinite(g).all() and not g.requires_grad for g in grads)
