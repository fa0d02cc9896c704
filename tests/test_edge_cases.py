"""Legal inputs at the edges: empty batches, NaN/inf in ignored rows, mixed dtypes, large offsets,
p_y -> 1, torch.compile(dynamic=True), metrics and module options -- on every backend."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels import chunked_linear, ops
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import BACKENDS, assert_close, check_grad, check_loss

V, H = 13, 6


def _frozen(shape, n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]


def _loss(policy, labels, frozen, **kw):
    return wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], **kw)


# ------------------------------------------------------------------------------------------ empty batches
EMPTY = {  # name: (logits shape, labels shape, options)
    "B1-T1-shift": ((2, 1, V), (2, 1), dict(shift=True)),
    "T0-shift": ((2, 0, V), (2, 0), dict(shift=True)),
    "B0": ((0, 4, V), (0, 4), dict()),
    "N0-flat": ((0, V), (0,), dict(shift=False)),
    "N0-flat-shift": ((0, V), (0,), dict(shift=True)),
    "N0-packed": ((0, V), (0,), dict(cu_seqlens=torch.tensor([0, 0]))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy-grad", "inplace"])
def test_empty_batch_gives_zero_loss_and_zero_grad(backend, case, reduction, inplace):
    shape, label_shape, kw = EMPTY[case]
    labels = torch.randint(0, V, label_shape)
    policy = torch.randn(*shape, requires_grad=True)
    loss = _loss(policy * 1, labels, _frozen(shape), reduction=reduction, inplace_grad=inplace, backend=backend, **kw)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert policy.grad is not None and torch.equal(policy.grad, torch.zeros_like(policy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_batch_other_functions(backend, case):
    shape, label_shape, kw = EMPTY[case]
    kw = dict(kw)
    kw.setdefault("shift", True)
    labels = torch.randint(0, V, label_shape)
    x = torch.randn(*shape, requires_grad=True)
    logp = wk.token_logprobs(x, labels, backend=backend, **kw)
    logp.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert wk.weak_log_ratio(x.detach(), x.detach(), labels, backend=backend, **kw).numel() == logp.numel()
    h = torch.randn(*shape[:-1], H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    logps = [wk.token_logprobs(f, labels, **kw) for f in _frozen(shape)]
    loss = wk.linear_wspo_loss(h, w, labels, ref=logps[0], weak_aligned=logps[1], weak_base=logps[2],
                               backend=backend, **kw)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------ NaN where counted
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_counted_row_is_never_hidden(backend):
    """NaN anywhere in a counted row (a lone element, the label, a whole 4096-wide block) gives NaN for
    that row and only that row, forward and through the WSPO gradient."""
    vocab = 4096 + 904
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, vocab, generator=g)
    labels = torch.tensor([7, 4000, 4500, 3, 4100, 11])
    x[0, 2000] = float("nan")           # one element
    x[1, 4000] = float("nan")           # the label
    x[2, :4096] = float("nan")          # a whole block, the label outside it
    x[3, -1] = float("nan")             # the tail
    x[4, :4096] = -float("inf")         # a block of -inf but for one NaN
    x[4, 5] = float("nan")
    logp = wk.token_logprobs(x, labels, backend=backend)
    assert logp[:5].isnan().all() and torch.isfinite(logp[5]), logp
    clean, labels = x[5], labels[1:]
    frozen = [torch.randn(5, vocab, generator=g) for _ in range(3)]
    for poisoned in range(4):            # NaN in the policy, then in each frozen model
        for reduction in ("none", "sum"):  # gradient through the logps / written by the one-pass kernel
            inputs = [clean.expand(5, vocab).clone()] + [f.clone() for f in frozen]
            inputs[poisoned][0, 123] = float("nan")
            policy = inputs[0].requires_grad_()
            loss = wk.wspo_loss(policy, labels, ref=inputs[1], weak_aligned=inputs[2], weak_base=inputs[3],
                                reduction=reduction, shift=False, backend=backend)
            per_row = loss if reduction == "none" else loss[None]
            assert per_row[0].isnan() and torch.isfinite(per_row[1:]).all(), (poisoned, loss)
            loss.sum().backward()
            assert policy.grad[0].isnan().all() and torch.isfinite(policy.grad[1:]).all(), (poisoned, reduction)


# ------------------------------------------------------------------------------------------ NaN where ignored
def _poisoned(B=2, T=5, seed=1):
    """Inputs whose ignored rows hold NaN / inf, and the same inputs with those rows zeroed (the reference)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[1, 0] = labels[1, 3] = -100
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100          # shift=True: row t scores label t+1
    ignored[:, -1] = True
    logits = [torch.randn(B, T, V, generator=g) for _ in range(4)]
    clean = [x.clone() for x in logits]
    for i, x in enumerate(logits):
        x[ignored] = float("nan") if i % 2 == 0 else float("inf")
        x[0, -1, 0] = float("-inf")
    return labels, logits, clean, ignored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen_as", ["logits", "logps"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy-grad", "inplace"])
def test_nan_in_ignored_rows_changes_nothing(backend, frozen_as, reduction, inplace):
    labels, logits, clean, ignored = _poisoned()
    if frozen_as == "logps":  # precomputed logps holding NaN at the ignored positions
        frozen = [wk.token_logprobs(x, labels, shift=True, backend="torch") for x in clean[1:]]
        for f in frozen:
            f[ignored[:, :-1]] = float("nan")
    else:
        frozen = logits[1:]
    policy = logits[0].clone().requires_grad_()
    loss = _loss(policy * 1, labels, frozen, reduction=reduction, inplace_grad=inplace, backend=backend)
    p64 = clean[0].double().requires_grad_()
    ref = reference_wspo_loss(p64, labels, ref=clean[1].double(), weak_aligned=clean[2].double(),
                              weak_base=clean[3].double(), reduction=reduction)
    check_loss(loss, ref, torch.float32)
    loss.sum().backward()
    ref.sum().backward()
    check_grad(policy.grad, p64.grad, torch.float32)
    assert torch.equal(policy.grad[ignored], torch.zeros_like(policy.grad[ignored]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", ["compacted", "masked", "fused"])
def test_nan_hidden_state_in_ignored_row_keeps_dw_finite(backend, with_bias, rows, monkeypatch):
    """On the CPU the chunked driver drops ignored rows before its GEMMs ("compacted"); on GPUs it masks
    them ("masked", forced here by turning the compaction off); Triton's opt-in kernels mask at the load."""
    if rows == "fused":
        if backend != "triton":
            pytest.skip("logits-free linear kernels are Triton's")
        monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")
    if rows == "masked":
        monkeypatch.setattr(chunked_linear, "_live_rows", lambda *args: None)
    labels, _, _, ignored = _poisoned(seed=2)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g) if with_bias else None
    frozen_h = [hidden.clone() + 0.1 * i for i in range(3)]
    poisoned = hidden.clone()
    poisoned[ignored] = float("nan")
    for f in frozen_h:
        f[ignored] = float("inf")
    h = poisoned.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    tuples = [(f, weight) if bias is None else (f, weight, bias) for f in frozen_h]
    loss = wk.linear_wspo_loss(h, w, labels, ref=tuples[0], weak_aligned=tuples[1], weak_base=tuples[2], bias=b,
                               backend=backend)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    clean_frozen = [hidden + 0.1 * i for i in range(3)]
    lin = (lambda x, ww, bb: x @ ww.t() + (0 if bb is None else bb))
    ref = reference_wspo_loss(lin(h64, w64, b64), labels,
                              **{k: lin(f.double(), weight.double(), None if bias is None else bias.double())
                                 for k, f in zip(("ref", "weak_aligned", "weak_base"), clean_frozen)})
    ref.backward()
    check_loss(loss, ref, torch.float32)
    check_grad(w.grad, w64.grad, torch.float32, what="dW")
    check_grad(h.grad, h64.grad, torch.float32, what="dh")
    if b is not None:
        check_grad(b.grad, b64.grad, torch.float32, what="db")


# ------------------------------------------------------------------------------------------ mixed dtypes
@pytest.mark.parametrize("backend", [None] + BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64, torch.float64, torch.float64),
                                    (torch.float32, torch.float16, torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.float32, torch.float32, torch.float16)],
                         ids=["fp32-fp64", "fp32-fp16-bf16", "bf16-fp32-fp16"])
def test_mixed_dtypes_across_models(backend, dtypes):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, V, (2, 4), generator=g)
    logits = [torch.randn(2, 4, V, generator=g).to(d) for d in dtypes]
    takes_all = backend in (None, "torch") or torch.float64 not in dtypes
    policy = logits[0].clone().requires_grad_()
    if not takes_all:  # a forced backend without float64 kernels says so
        with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run on .*float64"):
            _loss(policy, labels, logits[1:], backend=backend)
        return
    loss = _loss(policy, labels, logits[1:], backend=backend)
    p64 = logits[0].double().requires_grad_()
    ref = reference_wspo_loss(p64, labels, ref=logits[1].double(), weak_aligned=logits[2].double(),
                              weak_base=logits[3].double())
    check_loss(loss, ref, dtypes[0])
    loss.backward()
    ref.backward()
    assert policy.grad.dtype == dtypes[0]
    atol = 1e-5 if dtypes[0] == torch.float32 else 2e-2
    assert_close(policy.grad.double(), p64.grad, atol=atol * p64.grad.abs().max().item(), what="grad")
    delta_w = wk.weak_log_ratio(logits[2], logits[3], labels, backend=backend)
    want = reference_token_logprobs(logits[2].double(), labels) - reference_token_logprobs(logits[3].double(), labels)
    check_loss(delta_w, want, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_mixed_hidden_and_weight_dtypes(backend):
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, V, (2, 4), generator=g)
    h = torch.randn(2, 4, H, generator=g).half().requires_grad_()
    w = torch.randn(V, H, generator=g).requires_grad_()             # fp32 master weight
    logps = [wk.token_logprobs(x, labels, shift=True) for x in _frozen((2, 4, V))]
    loss = wk.linear_wspo_loss(h, w, labels, ref=logps[0], weak_aligned=logps[1], weak_base=logps[2], backend=backend)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference_wspo_loss(h64 @ w64.t(), labels, ref=logps[0], weak_aligned=logps[1], weak_base=logps[2])
    ref.backward()
    check_loss(loss, ref, torch.float32)  # computed in fp32: the fp16 hidden states are exact in fp32
    assert h.grad.dtype == torch.float16 and w.grad.dtype == torch.float32
    check_grad(w.grad, w64.grad, torch.float32, what="dW")


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset_keeps_fp32_accuracy(backend):
    """logp = (z_y - m) - log(s): as exact as torch.log_softmax when every logit sits near 1e4."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 1000, generator=g) * 3 + 1e4).float()
    labels = torch.randint(0, 1000, (64,), generator=g)
    exact = reference_token_logprobs(x.double(), labels)
    torch_err = (torch.log_softmax(x, -1).gather(1, labels[:, None]).squeeze(1).double() - exact).abs().max()
    x_ = x.clone().requires_grad_()
    ours = wk.token_logprobs(x_, labels, backend=backend)
    assert_close(ours.double(), exact, atol=2 * torch_err.item() + 1e-6, what="logp at offset 1e4")
    ours.sum().backward()
    x64 = x.double().requires_grad_()
    reference_token_logprobs(x64, labels).sum().backward()
    check_grad(x_.grad, x64.grad, torch.float32, what="dlogp/dz at offset 1e4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_entry_of_gradient_as_p_y_tends_to_1(backend):
    """c (1 - p_y) with p_y = 1 - 1e-9: expm1 keeps its relative accuracy (c - c p_y cancels to 0)."""
    labels = torch.tensor([[0, 3, 5, 1]])
    policy = torch.zeros(1, 4, 50)
    policy[0, torch.arange(3), labels[0, 1:]] = 25.0   # row t scores label t+1
    frozen = _frozen((1, 4, 50), seed=8)
    p = policy.clone().requires_grad_()
    _loss(p, labels, frozen, backend=backend).backward()
    p64 = policy.double().requires_grad_()
    reference_wspo_loss(p64, labels, ref=frozen[0].double(), weak_aligned=frozen[1].double(),
                        weak_base=frozen[2].double()).backward()
    at = (0, torch.arange(3), labels[0, 1:])
    got, want = p.grad[at].double(), p64.grad[at]
    assert (want.abs() > 0).all()
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel < 1e-4, f"label entries {got.tolist()} vs {want.tolist()}: relative error {rel:.2e}"


# ------------------------------------------------------------------------------------------ metrics, modules
def test_metrics_are_detached():
    frozen = _frozen((2, 4, V))
    labels = torch.randint(0, V, (2, 4))
    for kind in ("logits", "logps"):
        fr = frozen if kind == "logits" else [wk.token_logprobs(f, labels, shift=True) for f in frozen]
        out = _loss(torch.randn(2, 4, V, requires_grad=True), labels, fr, return_metrics=True)
        assert out.loss.requires_grad
        for name in ("policy_logps", "strong_log_ratio", "weak_log_ratio"):
            assert not getattr(out, name).requires_grad, f"{name} ({kind}) keeps the graph alive"


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_exposes_inplace_grad(backend):
    frozen = _frozen((2, 4, V))
    labels = torch.randint(0, V, (2, 4))
    x = torch.randn(2, 4, V)
    module = wk.WSPOLoss(gamma=0.3, inplace_grad=True, backend=backend)
    assert "inplace_grad=True" in repr(module)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(a * 1, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2]).backward()
    _loss(b, labels, frozen, gamma=0.3, backend=backend).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ torch.compile dynamic
@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_compile_rows_without_one_stride(layout, dynamic):
    """[B, T, V] logits whose rows are not [N, V]-viewable trace too (the choice is made from strides)."""
    labels = torch.randint(0, V, (2, 5))
    x = torch.randn(5, 2, V).transpose(0, 1) if layout == "transposed" else torch.randn(1, 5, V).expand(2, 5, V)
    frozen = [f.transpose(0, 1).contiguous().transpose(0, 1) for f in _frozen((2, 5, V))]
    fn = lambda p: wk.wspo_loss(p, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],  # noqa: E731
                                normalizer=2.5)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, dynamic=dynamic)(x), fn(x))
    assert torch.equal(wk.token_logprobs(x, labels), torch.compile(
        lambda p: wk.token_logprobs(p, labels), fullgraph=True, dynamic=dynamic)(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_vocabulary_with_any_stride(backend):
    x = torch.randn(1, 4).t()                     # [4, 1] with stride (1, 4)
    labels = torch.tensor([0, 0, -100, 0])
    assert torch.equal(wk.token_logprobs(x, labels, backend=backend), torch.zeros(4))
    p = x.clone().t().contiguous().t().requires_grad_()
    loss = wk.wspo_loss(p, labels, ref=x, weak_aligned=x, weak_base=x, shift=False, backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(p.grad, torch.zeros_like(p))


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    x, labels = torch.randn(6, V), torch.randint(0, V, (6,))
    want = wk.token_logprobs(x, labels, ignore_index=-100, cu_seqlens=[0, 3, 6])
    got = wk.token_logprobs(x, labels, ignore_index=np.int64(-100), cu_seqlens=[np.int64(0), np.int32(3), 6])
    assert torch.equal(got, want)


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("form", ["function", "module", "linear-module", "gamma-argument", "float-normalizer"])
def test_compile_fullgraph_dynamic(form):
    labels = torch.randint(0, V, (2, 6))
    frozen = _frozen((2, 6, V))
    kw = dict(ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2])
    w = torch.randn(V, H)
    if form == "function":
        fn, arg = (lambda x: wk.wspo_loss(x, labels, **kw)), torch.randn(2, 6, V)
    elif form == "module":
        m = wk.WSPOLoss()
        fn, arg = (lambda x: m(x, labels, **kw)), torch.randn(2, 6, V)
    elif form == "linear-module":
        m = wk.LinearWSPOLoss(gamma=0.3)
        fn, arg = (lambda h: m(h, w, labels, **kw)), torch.randn(2, 6, H)
    elif form == "gamma-argument":
        fn, arg = (lambda x, gamma=0.25: wk.wspo_loss(x, labels, gamma=gamma, **kw)), torch.randn(2, 6, V)
    else:  # gradient accumulation: the global sequence count changes every step
        fn, arg = (lambda x, n=2.5: wk.wspo_loss(x, labels, normalizer=n, **kw)), torch.randn(2, 6, V)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    a, b = arg.clone().requires_grad_(), arg.clone().requires_grad_()
    got, want = compiled(a), fn(b)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    if form in ("gamma-argument", "float-normalizer"):
        torch.testing.assert_close(compiled(arg, 0.7), fn(arg, 0.7))
