"""The op matrix on CUDA tensors (bf16 included) for every GPU backend; skipped without a GPU."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels import ops
from wspo_kernels.dispatch import available_backends

from helpers import check_grad, check_loss
import test_linear
import test_wspo_loss

CUDA = torch.device("cuda")


GPU_BACKENDS = available_backends(CUDA) if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(test_wspo_loss.CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_wspo_loss_on_gpu(backend, dtype, case, reduction):
    logits, labels, shift = test_wspo_loss._inputs(case, dtype)
    policy = logits[0].to(CUDA).requires_grad_()
    frozen = [x.to(CUDA) for x in logits[1:]]
    loss = wk.wspo_loss(policy, labels.to(CUDA), ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                        shift=shift, reduction=reduction, backend=backend)
    ref_loss, ref_policy = test_wspo_loss._reference(logits, labels, shift, reduction)
    check_loss(loss.cpu(), ref_loss, dtype)
    up = test_wspo_loss._upstream(ref_loss)
    (grad,) = torch.autograd.grad(loss, policy, up.to(loss.dtype).to(CUDA))
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_policy, up)
    lowp = None
    if dtype != torch.float32:
        low_loss, low_policy = test_wspo_loss._reference(logits, labels, shift, reduction, dtype=dtype)
        (lowp,) = torch.autograd.grad(low_loss, low_policy, up.to(dtype))
    check_grad(grad.cpu(), ref_grad, dtype, lowp)


LINEAR_IMPLS = ["chunked", "fused"]   # the default driver, and Triton's opt-in logits-free kernels


def _use_linear(backend, linear, monkeypatch):
    if linear == "fused" and backend != "triton":
        pytest.skip("logits-free linear kernels are Triton's")
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, linear)


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(test_linear.CASES))
@pytest.mark.parametrize("linear", LINEAR_IMPLS)
def test_linear_wspo_loss_on_gpu(backend, dtype, case, linear, monkeypatch):
    _use_linear(backend, linear, monkeypatch)
    models, labels, shift = test_linear._params(case, dtype)
    leaves = [None if t is None else t.to(CUDA).requires_grad_() for t in models[0]]
    frozen = [tuple(t.to(CUDA) for t in m if t is not None) for m in models[1:]]
    loss = wk.linear_wspo_loss(leaves[0], leaves[1], labels.to(CUDA), bias=leaves[2], ref=frozen[0],
                               weak_aligned=frozen[1], weak_base=frozen[2], shift=shift, backend=backend)
    ref_loss, ref_leaves = test_linear._reference(models, labels, shift, "mean")
    check_loss(loss.cpu(), ref_loss, dtype)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    low = [None] * len(params)
    if dtype != torch.float32:
        low_loss, low_leaves = test_linear._reference(models, labels, shift, "mean", dtype=dtype)
        low = torch.autograd.grad(low_loss, low_leaves)
    for got, want, lowp in zip(grads, ref_grads, low):
        check_grad(got.cpu(), want, dtype, lowp)


def test_large_rows_use_int64_offsets():
    """N * V > 2^31: row offsets must not overflow (one fp16 [70000, 32768] tensor = 4.6 GB)."""
    backend = GPU_BACKENDS[0]
    n, V = 70000, 32768
    logits = torch.randn(n, V, device=CUDA, dtype=torch.float16)
    labels = torch.randint(0, V, (n,), device=CUDA)
    got = wk.token_logprobs(logits[-4:], labels[-4:], backend=backend)
    full = wk.token_logprobs(logits, labels, backend=backend)[-4:]
    torch.testing.assert_close(full, got)


# The kernels the matrix above does not reach (issue 10, item 8): the logprobs backward, the weak pair,
# the policy-only kernel (frozen models precomputed), inplace_grad, and the linear kernels over several
# row and vocab blocks with H not a multiple of the K block.
from helpers import make_labels, make_logits  # noqa: E402
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss  # noqa: E402

ROWS_SHAPE = (3, 37, 1001)   # V odd: a masked tail in every row; 3 x 36 rows after the shift


def _lowp_grad(fn, x, dtype):
    """PyTorch's own gradient of ``fn`` at the inputs rounded to ``dtype``, in ``dtype`` (the low-precision yardstick)."""
    if dtype == torch.float32:
        return None
    x = x.to(dtype).requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x)
    return g


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_and_weak_pair_on_gpu(backend, dtype):
    g = torch.Generator().manual_seed(1)
    B, T, V = ROWS_SHAPE
    logits = [make_logits((B, T, V), dtype, generator=g) for _ in range(2)]
    labels = make_labels((B, T), V, generator=g, ignore_rows=(1,))
    up = torch.randn(B, T - 1, generator=g, dtype=torch.float64)
    x = logits[0].to(CUDA).requires_grad_()
    got = wk.token_logprobs(x, labels.to(CUDA), shift=True, backend=backend)
    x64 = logits[0].double().requires_grad_()
    want = reference_token_logprobs(x64, labels, shift=True)
    check_loss(got.cpu(), want, dtype, "token_logprobs")
    (grad,) = torch.autograd.grad(got, x, up.to(got.dtype).to(CUDA))   # the logprobs backward kernel
    (want_grad,) = torch.autograd.grad(want, x64, up)
    lowp = _lowp_grad(lambda z: (torch.log_softmax(z.float(), -1)[:, :-1].gather(
        -1, labels[:, 1:].clamp_min(0)[..., None])[..., 0] * (labels[:, 1:] != -100) * up).sum(), logits[0], dtype)
    check_grad(grad.cpu(), want_grad, dtype, lowp, "token_logprobs grad")
    delta = wk.weak_log_ratio(logits[0].to(CUDA), logits[1].to(CUDA), labels.to(CUDA), shift=True, backend=backend)
    check_loss(delta.cpu(), want.detach() - reference_token_logprobs(logits[1], labels, shift=True), dtype,
               "weak_log_ratio")


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_precomputed_frozen_and_inplace_on_gpu(backend, dtype, inplace):
    g = torch.Generator().manual_seed(2)
    B, T, V = ROWS_SHAPE
    logits = [make_logits((B, T, V), dtype, generator=g) for _ in range(4)]
    labels = make_labels((B, T), V, generator=g, ignore_rows=(2,))
    frozen = [reference_token_logprobs(z, labels, shift=True).float().to(CUDA) for z in logits[1:]]
    for kind, inputs in (("precomputed", frozen), ("logits", [z.to(CUDA) for z in logits[1:]])):
        x = logits[0].to(CUDA).requires_grad_()
        policy = x * 1 if inplace else x   # a non-leaf the loss may overwrite with its gradient
        loss = wk.wspo_loss(policy, labels.to(CUDA), ref=inputs[0], weak_aligned=inputs[1], weak_base=inputs[2],
                            gamma=0.3, inplace_grad=inplace, backend=backend)
        x64 = logits[0].double().requires_grad_()
        want = reference_wspo_loss(x64, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3], gamma=0.3)
        check_loss(loss.detach().cpu(), want, dtype, f"wspo_loss {kind} inplace={inplace}")
        (grad,) = torch.autograd.grad(loss, x)
        (want_grad,) = torch.autograd.grad(want, x64)
        lowp = _lowp_grad(lambda z: reference_wspo_loss(z, labels, ref=logits[1], weak_aligned=logits[2],
                                                        weak_base=logits[3], gamma=0.3, dtype=dtype), logits[0], dtype)
        check_grad(grad.cpu(), want_grad, dtype, lowp, f"wspo_loss {kind} inplace={inplace} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("linear", LINEAR_IMPLS)
def test_linear_over_many_blocks_on_gpu(backend, dtype, linear, monkeypatch):
    """N = 2 row blocks + a tail, H = 100 (not a multiple of the K block), V = 1000 (8 vocab blocks)."""
    _use_linear(backend, linear, monkeypatch)
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 50, 100, 1000
    hidden = [(torch.randn(B, T, H, generator=g)).to(dtype) for _ in range(4)]
    heads = [(torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype) for _ in range(4)]
    bias = torch.randn(V, generator=g).to(dtype)
    labels = make_labels((B, T), V, generator=g, ignore_rows=(1,))
    leaves = [hidden[0].to(CUDA).requires_grad_(), heads[0].to(CUDA).requires_grad_(), bias.to(CUDA).requires_grad_()]
    frozen = [(h.to(CUDA), w.to(CUDA)) for h, w in zip(hidden[1:], heads[1:])]
    loss = wk.linear_wspo_loss(leaves[0], leaves[1], labels.to(CUDA), bias=leaves[2], ref=frozen[0],
                               weak_aligned=frozen[1], weak_base=frozen[2], backend=backend)
    ref64 = [t.double().requires_grad_() for t in (hidden[0], heads[0], bias)]

    def reference(h, w, b, dt=torch.float64):
        z = [(h.to(dt) @ w.to(dt).T + b.to(dt))] + [hh.to(dt) @ ww.to(dt).T for hh, ww in zip(hidden[1:], heads[1:])]
        return reference_wspo_loss(z[0], labels, ref=z[1], weak_aligned=z[2], weak_base=z[3], dtype=dt)
    want = reference(*ref64)
    check_loss(loss.detach().cpu(), want, dtype, "linear_wspo_loss")
    grads = torch.autograd.grad(loss, leaves)
    want_grads = torch.autograd.grad(want, ref64)
    low = [None] * 3
    if dtype != torch.float32:
        low_leaves = [t.to(dtype).requires_grad_() for t in (hidden[0], heads[0], bias)]
        low = torch.autograd.grad(reference(*low_leaves, dt=dtype), low_leaves)
    for name, got, w, lowp in zip(("d hidden", "d weight", "d bias"), grads, want_grads, low):
        check_grad(got.cpu(), w, dtype, lowp, name)
