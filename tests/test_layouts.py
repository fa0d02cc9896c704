"""Every memory layout the API accepts gives the float64 reference's answer, on every backend.

The matrix: policy/frozen logits as {contiguous, vocab-sliced, transposed, expanded, vocab-strided,
flat rows of a strided buffer with strided labels} x frozen models as {logits, logps, (hidden, weight,
bias) tuples, (hidden, weight) tuples} x {inplace_grad on, off} x {mean, sum, none}.  The policy is a
view of a leaf ``base``: its gradient is checked against the reference's gradient w.r.t. the same
view of a float64 base, and nothing of ``base`` outside the view may change.
"""
import os
import zlib

import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import BACKENDS, check_grad, check_loss

B, T, V, H, PAD = 2, 5, 37, 6, 11
LAYOUTS = ("contiguous", "vocab-sliced", "transposed", "expanded", "vocab-strided", "flat-strided")
FROZEN = ("logits", "logps", "tuple-bias", "tuple")
SEED = int(os.environ.get("WSPO_TEST_SEED", "0"))  # other seeds: WSPO_TEST_SEED=n pytest tests/test_layouts.py


def _params():
    """(backend, dtype): fp32 everywhere, bf16 on the CPU backends, fp16 under the Triton interpreter."""
    out = []
    for b in BACKENDS:
        for d in (torch.float32, torch.float16 if b == "triton" else torch.bfloat16):
            out.append(pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}"))
    return out


def _base_and_view(layout, values):
    """(base, view_fn): a tensor ``base`` and the function giving the layout's view of it.

    ``values`` is [B, T, V]; the view holds those values (row 0 of the batch for 'expanded'), shaped
    [B, T, V], or [2*B*T... even rows] -> [B*T, V] for 'flat-strided'.
    """
    if layout == "contiguous":
        return values.clone(), lambda b: b.view(b.shape)
    if layout == "vocab-sliced":  # padded vocabulary, e.g. Qwen2's 152064 columns for 151665 tokens
        base = torch.full((B, T, V + PAD), 7.5, dtype=values.dtype)
        base[..., :V] = values
        return base, lambda b: b[..., :V]
    if layout == "transposed":  # sequence-first storage (Megatron's [S, B, V])
        return values.transpose(0, 1).contiguous(), lambda b: b.transpose(0, 1)
    if layout == "expanded":
        return values[:1].clone(), lambda b: b.expand(B, T, V)
    if layout == "vocab-strided":
        return values.transpose(1, 2).contiguous(), lambda b: b.transpose(1, 2)
    if layout == "flat-strided":
        base = torch.full((2 * B * T, V), -3.25, dtype=values.dtype)
        base[::2] = values.reshape(B * T, V)
        return base, lambda b: b[::2]
    raise AssertionError(layout)


def _outside(layout, base):
    """Elements of ``base`` that are not part of the view (must never change), or None."""
    if layout == "vocab-sliced":
        return base[..., V:]
    if layout == "flat-strided":
        return base[1::2]
    return None


def _labels(layout, g):
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.25] = -100
    y[1, :3] = -100
    if layout == "expanded":
        y[1] = y[0]  # expanded logits repeat batch row 0; keep the sequences different anyway via the mask
        y[1, :3] = -100
    if layout == "flat-strided":  # labels read with a stride too
        wide = torch.full((2 * B * T,), 5, dtype=torch.long)
        wide[::2] = y.reshape(-1)
        return wide[::2]
    return y


def _frozen_inputs(kind, layout, labels, shift, dtype, g):
    """(inputs for wk, float64 logits for the reference) of one frozen model."""
    grid = (B * T,) if layout == "flat-strided" else (B, T)
    if kind.startswith("tuple"):
        hidden = torch.randn(*grid, H, generator=g).to(dtype)
        weight = torch.randn(H, V, generator=g).to(dtype).t()            # column-major lm_head
        bias = torch.randn(2 * V, generator=g).to(dtype)[::2] if kind == "tuple-bias" else None  # strided bias
        logits64 = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
        return ((hidden, weight) if bias is None else (hidden, weight, bias)), logits64
    values = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    base, view = _base_and_view(layout, values)
    logits = view(base)
    logits64 = logits.double()
    if kind == "logps":
        return reference_token_logprobs(logits64, labels, shift=shift).float(), logits64
    return logits, logits64


def _low_precision_grad(policy_values, labels, frozen64, shift, reduction, up, dtype):
    """PyTorch's own low-precision path on the same inputs (the yardstick for bf16/fp16 gradients)."""
    p = policy_values.detach().clone().requires_grad_()
    loss = reference_wspo_loss(p, labels, ref=frozen64[0].to(dtype), weak_aligned=frozen64[1].to(dtype),
                               weak_base=frozen64[2].to(dtype), shift=shift, reduction=reduction, dtype=dtype)
    (grad,) = torch.autograd.grad(loss, p, up.to(dtype))
    return grad


@pytest.mark.parametrize("backend,dtype", _params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("frozen_kind", FROZEN)
@pytest.mark.parametrize("inplace", [False, True], ids=["copy-grad", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_layout_matrix(backend, dtype, layout, frozen_kind, inplace, reduction):
    g = torch.Generator().manual_seed(SEED + zlib.crc32(f"{layout}/{frozen_kind}".encode()))
    shift = layout != "flat-strided"
    labels = _labels(layout, g)
    values = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    base, view = _base_and_view(layout, values)
    frozen = [_frozen_inputs(frozen_kind, layout, labels, shift, dtype, g) for _ in range(3)]
    frozen64 = [f[1] for f in frozen]
    original = base.clone()
    outside = _outside(layout, original)

    base.requires_grad_()
    policy = view(base)
    at_view = []
    policy.register_hook(at_view.append)  # the kernel's gradient, before autograd maps it onto ``base``
    loss = wk.wspo_loss(policy, labels, ref=frozen[0][0], weak_aligned=frozen[1][0], weak_base=frozen[2][0],
                        shift=shift, reduction=reduction, inplace_grad=inplace, backend=backend)

    base64 = original.double().requires_grad_()
    policy64 = view(base64)
    policy64.retain_grad()
    ref = reference_wspo_loss(policy64, labels, ref=frozen64[0], weak_aligned=frozen64[1],
                              weak_base=frozen64[2], shift=shift, reduction=reduction)
    check_loss(loss, ref, dtype)
    up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    loss.backward(up.to(loss.dtype))
    ref.backward(up)
    lowp = None if dtype == torch.float32 else _low_precision_grad(view(original), labels, frozen64, shift,
                                                                   reduction, up, dtype)
    if inplace and reduction == "none" and lowp is not None:
        # Written in the forward pass, scaled in the backward: rounded twice (documented), each time
        # by up to half an ulp, so the yardstick is two roundings: 2 x max(PyTorch's error, half an ulp).
        ref_grad = policy64.grad
        half_ulp = torch.finfo(dtype).eps / 2 * 2.0 ** torch.floor(torch.log2(ref_grad.abs().max()))
        one_rounding = torch.maximum((lowp.double() - ref_grad).abs().max(), half_ulp)
        lowp = ref_grad + 2 * one_rounding
    check_grad(at_view[0], policy64.grad, dtype, lowp, what=f"dL/dpolicy ({layout})")
    if dtype == torch.float32:  # low precision: autograd's own rounding when it sums an expanded view
        check_grad(base.grad, base64.grad, dtype, what=f"dL/dbase ({layout})")
    if outside is not None:
        assert torch.equal(_outside(layout, base.detach()), outside), f"{layout}: memory outside the view changed"
    if not inplace or layout in ("expanded", "vocab-strided"):  # no in-place write possible / asked for
        assert torch.equal(base.detach(), original), f"{layout}: the logits changed without inplace_grad"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["vocab-sliced", "transposed", "flat-strided"])
def test_inplace_grad_lands_in_the_views_own_memory(backend, layout):
    """Sliced and transposed views take the gradient where they lie: no N x V buffer is allocated."""
    g = torch.Generator().manual_seed(3)
    labels = _labels(layout, g)
    shift = layout != "flat-strided"
    base, view = _base_and_view(layout, torch.randn(B, T, V, generator=g))
    frozen = [view(_base_and_view(layout, torch.randn(B, T, V, generator=g))[0]) for _ in range(3)]
    regular = base.clone().requires_grad_()
    wk.wspo_loss(view(regular), labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], shift=shift,
                 backend=backend).backward()
    x = base.clone().requires_grad_()
    policy = view(x)
    loss = wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], shift=shift,
                        inplace_grad=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(view(x.grad), view(regular.grad), rtol=0, atol=0)
    torch.testing.assert_close(policy.detach(), view(regular.grad), rtol=0, atol=0)  # the view holds its gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_layouts(backend):
    g = torch.Generator().manual_seed(4)
    for layout in LAYOUTS:
        labels = _labels(layout, g)
        shift = layout != "flat-strided"
        base, view = _base_and_view(layout, torch.randn(B, T, V, generator=g) * 3)
        base.requires_grad_()
        logp = wk.token_logprobs(view(base), labels, shift=shift, backend=backend)
        base64 = base.detach().double().requires_grad_()
        ref = reference_token_logprobs(view(base64), labels, shift=shift)
        check_loss(logp, ref, torch.float32, what=f"logp ({layout})")
        up = torch.rand(ref.shape, generator=g, dtype=torch.float64)
        logp.backward(up.float())
        (ref_grad,) = torch.autograd.grad(ref, base64, up)
        check_grad(base.grad, ref_grad, torch.float32, what=f"dlogp/dbase ({layout})")
        a, w = (view(_base_and_view(layout, torch.randn(B, T, V, generator=g))[0]) for _ in range(2))
        got = wk.weak_log_ratio(a, w, labels, shift=shift, backend=backend)
        want = reference_token_logprobs(a.double(), labels, shift=shift) - \
            reference_token_logprobs(w.double(), labels, shift=shift)
        check_loss(got, want, torch.float32, what=f"weak_log_ratio ({layout})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_operands_of_any_strides(backend, reduction):
    """Hidden states, lm_head weight and bias as views (transposed storage, strided): no wrong reads."""
    g = torch.Generator().manual_seed(9)
    labels = _labels("contiguous", g)
    hidden = torch.randn(T, B, 2 * H, generator=g).transpose(0, 1)[..., ::2]     # [B, T, H], strided everywhere
    weight = torch.randn(H, V, generator=g).t()                                  # column-major [V, H]
    bias = torch.randn(3 * V, generator=g)[::3]
    frozen = [(torch.randn(B, T, H, generator=g).transpose(0, 1).contiguous().transpose(0, 1),
               torch.randn(H, V, generator=g).t(), torch.randn(2 * V, generator=g)[::2]) for _ in range(3)]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    hv, wv, bv = (x.detach().requires_grad_() for x in (hidden, weight, bias))  # the strided views themselves
    loss = wk.linear_wspo_loss(hv, wv, labels, bias=bv, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                               reduction=reduction, backend=backend)
    lin = (lambda x, ww, bb: x @ ww.t() + bb)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    ref = reference_wspo_loss(lin(h64, w64, b64), labels,
                              **{k: lin(*(t.double() for t in f)) for k, f in zip(("ref", "weak_aligned", "weak_base"),
                                                                                  frozen)}, reduction=reduction)
    check_loss(loss, ref, torch.float32)
    up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    loss.backward(up.float())
    ref.backward(up)
    for got, want, name in ((hv.grad, h64.grad, "dh"), (wv.grad, w64.grad, "dW"), (bv.grad, b64.grad, "db")):
        check_grad(got, want, torch.float32, what=name)
