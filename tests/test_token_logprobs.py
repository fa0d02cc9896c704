"""token_logprobs and weak_log_ratio against float64 log_softmax."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.reference import reference_token_logprobs

from helpers import backend_params, check_grad, check_loss, make_labels, make_logits

SHAPES = {"V1": (2, 3, 1), "V7": (2, 5, 7), "V1000": (3, 4, 1000), "V32003": (1, 3, 32003), "T1": (4, 1, 100),
          "flat": (17, 1000)}
KINDS = ("normal", "extreme", "neginf")


def _inputs(shape, dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, dtype, kind=kind, generator=g)
    labels = make_labels(shape[:-1], shape[-1], generator=g, avoid=logits)
    return logits, labels


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [False, True])
def test_token_logprobs(backend, dtype, shape, kind, shift):
    logits, labels = _inputs(SHAPES[shape], dtype, kind)
    x = logits.clone().requires_grad_()
    logp = wk.token_logprobs(x, labels, shift=shift, backend=backend)
    x64 = logits.double().requires_grad_()
    ref = reference_token_logprobs(x64, labels, shift=shift)
    assert logp.dtype == torch.float32 and logp.shape == ref.shape
    check_loss(logp, ref, dtype, what="logps")
    up = torch.linspace(-1.0, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (grad,) = torch.autograd.grad(logp, x, up.float())
    (ref_grad,) = torch.autograd.grad(ref, x64, up)
    lowp = None
    if dtype != torch.float32:
        xl = logits.clone().requires_grad_()
        (lowp,) = torch.autograd.grad(reference_token_logprobs(xl, labels, shift=shift, dtype=dtype), xl, up.to(dtype))
    assert grad.dtype == dtype
    check_grad(grad, ref_grad, dtype, lowp, what="dlogps/dlogits")


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("vocabs", [(1000, 1000), (1003, 998), (7, 32003)])
@pytest.mark.parametrize("shift", [False, True])
def test_weak_log_ratio(backend, dtype, vocabs, shift):
    g = torch.Generator().manual_seed(1)
    a = make_logits((2, 5, vocabs[0]), dtype, generator=g)
    w = make_logits((2, 5, vocabs[1]), dtype, generator=g)
    labels = make_labels((2, 5), min(vocabs), generator=g, ignore_rows=(1,))
    got = wk.weak_log_ratio(a, w, labels, shift=shift, backend=backend)
    want = reference_token_logprobs(a, labels, shift=shift) - reference_token_logprobs(w, labels, shift=shift)
    check_loss(got, want, dtype, what="weak log-ratio")
    assert not got.requires_grad


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 5, -100], [3, 3, 1]])
    assert torch.autograd.gradcheck(lambda t: wk.token_logprobs(t, labels, shift=True), (x,))


def test_packed_sequences_shift_within_each_sequence():
    g = torch.Generator().manual_seed(4)
    logits = make_logits((9, 50), torch.float32, generator=g)
    labels = make_labels((9,), 50, generator=g, ignore_frac=0.0)
    cu = torch.tensor([0, 4, 9])
    got = wk.token_logprobs(logits, labels, shift=True, cu_seqlens=cu)
    first = reference_token_logprobs(logits[:4], labels[:4], shift=True)
    second = reference_token_logprobs(logits[4:], labels[4:], shift=True)
    want = torch.cat([first, first.new_zeros(1), second, second.new_zeros(1)])
    check_loss(got, want, torch.float32, what="packed logps")
