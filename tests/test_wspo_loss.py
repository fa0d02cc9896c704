"""wspo_loss (four logits, or precomputed frozen logps) against the float64 reference."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import backend_params, check_grad, check_loss, make_labels, make_logits

# (B, T, vocab of policy/ref/aligned/base, logits kind, shift, fully ignored rows)
CASES = {
    "V7": (2, 5, (7, 7, 7, 7), "normal", True, ()),
    "V1000-mixed-vocab": (3, 4, (1000, 1000, 1003, 998), "normal", True, (1,)),
    "T1-noshift": (2, 1, (1000, 1000, 1000, 1000), "normal", False, ()),
    "T1-shift-empty": (2, 1, (50, 50, 50, 50), "normal", True, ()),
    "V32003": (2, 3, (32003, 32003, 32000, 32003), "normal", True, ()),
    "V1": (2, 6, (1, 1, 1, 1), "normal", False, ()),
    "extreme": (2, 4, (257, 257, 257, 257), "extreme", True, ()),
    "neginf": (2, 4, (257, 257, 260, 257), "neginf", False, (0,)),
}


def _inputs(case, dtype, seed=0):
    B, T, vocabs, kind, shift, ignore_rows = CASES[case]
    g = torch.Generator().manual_seed(seed)
    logits = [make_logits((B, T, v), dtype, kind=kind, generator=g) for v in vocabs]
    # Labels must be legal for every model and, for -inf rows, finite in all of them.
    finite = torch.stack([torch.isfinite(x[..., :min(vocabs)].float()) for x in logits]).all(0)
    avoid = torch.where(finite, 0.0, float("-inf"))
    labels = make_labels((B, T), min(vocabs), generator=g, ignore_rows=ignore_rows, avoid=avoid)
    return logits, labels, shift


def _reference(logits, labels, shift, reduction, dtype=torch.float64, normalizer=None):
    policy = logits[0].detach().to(dtype).requires_grad_()
    frozen = [x.to(dtype) for x in logits[1:]]
    loss = reference_wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                               gamma=0.1, shift=shift, reduction=reduction, normalizer=normalizer, dtype=dtype)
    return loss, policy


def _upstream(loss):
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape) if loss.dim() \
        else torch.tensor(1.3, dtype=torch.float64)


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, dtype, case, reduction):
    logits, labels, shift = _inputs(case, dtype)
    policy = logits[0].clone().requires_grad_()
    loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                        shift=shift, reduction=reduction, backend=backend)
    ref_loss, ref_policy = _reference(logits, labels, shift, reduction)
    check_loss(loss, ref_loss, dtype)
    up = _upstream(ref_loss)
    (grad,) = torch.autograd.grad(loss, policy, up.to(loss.dtype))
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_policy, up)
    lowp = None
    if dtype != torch.float32:
        low_loss, low_policy = _reference(logits, labels, shift, reduction, dtype=dtype)
        (lowp,) = torch.autograd.grad(low_loss, low_policy, up.to(dtype))
    assert grad.dtype == dtype
    check_grad(grad, ref_grad, dtype, lowp, what="dL/dpolicy_logits")


@pytest.mark.parametrize("backend,dtype", backend_params(dtypes=(torch.float32, torch.bfloat16)))
def test_frozen_logits_equal_precomputed_logps(backend, dtype):
    logits, labels, shift = _inputs("V1000-mixed-vocab", dtype, seed=3)
    logps = [wk.token_logprobs(x, labels, shift=shift, backend=backend) for x in logits[1:]]
    grads, losses = [], []
    for frozen in (logits[1:], logps, [logits[1], logps[1], logits[3]]):
        policy = logits[0].clone().requires_grad_()
        out = wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], shift=shift,
                           backend=backend, return_metrics=True)
        out.loss.backward()
        losses.append(out.loss)
        grads.append(policy.grad)
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-7)


def test_metrics_match_reference():
    logits, labels, shift = _inputs("V1000-mixed-vocab", torch.float32)
    out = wk.wspo_loss(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3], shift=shift,
                       return_metrics=True)
    lp = [reference_token_logprobs(x, labels, shift=shift) for x in logits]
    mask = labels[:, 1:] != -100
    assert torch.equal(out.mask, mask)
    for got, want in ((out.policy_logps, lp[0]), (out.strong_log_ratio, lp[0] - lp[1]),
                      (out.weak_log_ratio, lp[2] - lp[3])):
        check_loss(got, want, torch.float32, what="metric")
    assert not out.policy_logps.requires_grad


@pytest.mark.parametrize("normalizer", [1.0, 7, torch.tensor(4.0)])
def test_normalizer_replaces_sequence_count(normalizer):
    logits, labels, shift = _inputs("V7", torch.float32)
    loss = wk.wspo_loss(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                        normalizer=normalizer)
    ref, _ = _reference(logits, labels, shift, "mean", normalizer=float(normalizer))
    check_loss(loss, ref, torch.float32)


def test_gradient_accumulation_equals_one_big_batch():
    """Micro-batches with normalizer=B_total sum to the full batch's loss and gradient."""
    logits, labels, _ = _inputs("V1000-mixed-vocab", torch.float32)
    full = logits[0].clone().requires_grad_()
    wk.wspo_loss(full, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3]).backward()
    n_seq = int(((labels[:, 1:] != -100).sum(1) > 0).sum())
    micro = logits[0].clone().requires_grad_()
    for rows in (slice(0, 1), slice(1, 3)):
        wk.wspo_loss(micro[rows], labels[rows], ref=logits[1][rows], weak_aligned=logits[2][rows],
                     weak_base=logits[3][rows], normalizer=n_seq).backward()
    torch.testing.assert_close(micro.grad, full.grad, rtol=1e-5, atol=1e-8)


def test_sequences_without_tokens_give_zero_not_nan():
    logits, labels, shift = _inputs("V7", torch.float32)
    labels = torch.full_like(labels, -100)
    policy = logits[0].clone().requires_grad_()
    for reduction in ("mean", "sum", "none"):
        loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                            reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss))
        (grad,) = torch.autograd.grad(loss.sum(), policy)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_sequence_left_out_of_mean():
    logits, labels, shift = _inputs("V7", torch.float32)
    labels[1] = -100
    loss = wk.wspo_loss(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3])
    only = wk.wspo_loss(logits[0][:1], labels[:1], ref=logits[1][:1], weak_aligned=logits[2][:1],
                        weak_base=logits[3][:1])
    torch.testing.assert_close(loss, only)


def test_non_contiguous_inputs():
    logits, labels, shift = _inputs("V1000-mixed-vocab", torch.float32)
    # Transposed storage: same values, no unit stride along the vocabulary.
    strided = [x.transpose(0, 2).contiguous().transpose(0, 2) for x in logits]
    policy = strided[0].requires_grad_()
    loss = wk.wspo_loss(policy, labels, ref=strided[1], weak_aligned=strided[2], weak_base=strided[3])
    ref_loss, ref_policy = _reference(logits, labels, shift, "mean")
    check_loss(loss, ref_loss, torch.float32)
    loss.backward()
    ref_loss.backward()
    check_grad(policy.grad, ref_policy.grad, torch.float32)


def test_flat_and_packed_sequences():
    logits, labels, shift = _inputs("V1000-mixed-vocab", torch.float32)
    B, T, _ = logits[0].shape
    flat = [x.reshape(B * T, x.shape[-1]) for x in logits]
    cu = torch.arange(0, B * T + 1, T)
    for reduction in ("mean", "none"):
        packed = wk.wspo_loss(flat[0], labels.reshape(-1), ref=flat[1], weak_aligned=flat[2], weak_base=flat[3],
                              cu_seqlens=cu, reduction=reduction)
        batched = wk.wspo_loss(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                               reduction=reduction)
        torch.testing.assert_close(packed, batched, rtol=1e-6, atol=1e-9)
    one = wk.wspo_loss(flat[0][:T], labels[0], ref=flat[1][:T], weak_aligned=flat[2][:T], weak_base=flat[3][:T])
    torch.testing.assert_close(one, wk.wspo_loss(logits[0][:1], labels[:1], ref=logits[1][:1],
                                                 weak_aligned=logits[2][:1], weak_base=logits[3][:1]))


def test_module_form_matches_function():
    logits, labels, shift = _inputs("V7", torch.float32)
    module = wk.WSPOLoss(gamma=0.25, reduction="sum")
    got = module(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3])
    want = wk.wspo_loss(logits[0], labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3], gamma=0.25,
                        reduction="sum")
    assert torch.equal(got, want)
    assert "gamma=0.25" in repr(module)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 3, 5
    policy = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    frozen = [torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.tensor([[1, 2, -100], [4, -100, 0]])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda p: wk.wspo_loss(p, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                   shift=False, reduction=reduction, gamma=0.7), (policy,))


def test_second_backward_through_same_graph_is_refused():
    logits, labels, _ = _inputs("V7", torch.float32)
    policy = logits[0].clone().requires_grad_()
    loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()


@pytest.mark.parametrize("backend,dtype", backend_params(dtypes=(torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("frozen_as", ["logits", "logps"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_grad_matches_regular_path(backend, dtype, frozen_as, reduction):
    logits, labels, shift = _inputs("V1000-mixed-vocab", dtype, seed=11)
    frozen = logits[1:] if frozen_as == "logits" else [wk.token_logprobs(x, labels, shift=True) for x in logits[1:]]
    kw = dict(ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], reduction=reduction, backend=backend)
    h = torch.randn(*logits[0].shape[:2], 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    proj = (torch.linalg.pinv(h.reshape(-1, 8).float()) @ logits[0].reshape(-1, logits[0].shape[-1]).float())
    grads, losses = [], []
    for inplace in (False, True):
        w = proj.to(dtype).clone().requires_grad_()
        policy = h @ w  # a non-leaf like lm_head output; MmBackward saves h and w, not the logits
        loss = wk.wspo_loss(policy, labels, inplace_grad=inplace, **kw)
        up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.0)
        loss.backward(up)
        losses.append(loss.detach())
        grads.append(w.grad)
        if inplace:
            assert not torch.equal(policy.detach(), (h @ w).detach()), "the logits should hold the gradient now"
    if reduction == "mean":  # same kernel, same numbers
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    else:  # "none" backprops through the logps unless the gradient is written in place: last bits differ
        torch.testing.assert_close(losses[1], losses[0])
        torch.testing.assert_close(grads[1], grads[0])


def test_inplace_grad_refuses_a_graph_that_saved_the_logits():
    logits, labels, _ = _inputs("V7", torch.float32)
    x = logits[0].clone().requires_grad_()
    policy = x.exp()  # ExpBackward saves its output: the logits themselves
    loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                        inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
