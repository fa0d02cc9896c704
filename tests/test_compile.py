"""torch.compile(fullgraph=True) traces every public function without graph breaks, same values."""
import pytest
import torch

import wspo_kernels as wk

from helpers import make_labels


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(seed=0, B=2, T=6, H=8, V=40):
    g = torch.Generator().manual_seed(seed)
    labels = make_labels((B, T), V, generator=g)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    frozen = [torch.randn(B, T, V, generator=g) for _ in range(3)]
    return labels, hidden, weight, frozen


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_wspo_loss_compiles(reduction):
    labels, hidden, weight, frozen = _data()
    def fn(h, w):
        logits = h @ w.t()
        return wk.wspo_loss(logits, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                            reduction=reduction).sum()
    h = hidden.clone().requires_grad_()
    eager = fn(h, weight)
    (g_eager,) = torch.autograd.grad(eager, h)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, weight)
    (g_comp,) = torch.autograd.grad(compiled, h)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_linear_wspo_loss_compiles_with_precomputed_logps():
    labels, hidden, weight, frozen = _data(1)
    logps = [wk.token_logprobs(x, labels, shift=True) for x in frozen]
    def fn(h, w):
        return wk.linear_wspo_loss(h, w, labels, ref=logps[0], weak_aligned=logps[1], weak_base=logps[2])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = fn(h, w)
    g_eager = torch.autograd.grad(eager, (h, w))
    compiled = torch.compile(fn, fullgraph=True)(h, w)
    g_comp = torch.autograd.grad(compiled, (h, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_token_logprobs_compiles():
    labels, _, _, frozen = _data(2)
    x = frozen[0].clone().requires_grad_()
    fn = lambda t: wk.token_logprobs(t, labels, shift=True).sum()  # noqa: E731
    (g_eager,) = torch.autograd.grad(fn(x), x)
    (g_comp,) = torch.autograd.grad(torch.compile(fn, fullgraph=True)(x), x)
    torch.testing.assert_close(g_comp, g_eager)


def test_label_check_still_runs_when_compiled():
    labels, _, _, frozen = _data(3)
    labels[0, 0] = 1000
    fn = torch.compile(lambda x: wk.token_logprobs(x, labels), fullgraph=True)
    with pytest.raises(Exception, match=r"labels must be in \[0, 40\)"):
        fn(frozen[0])
