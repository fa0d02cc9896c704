"""The op matrix on CUDA tensors (bf16 included) for every GPU backend; skipped without a GPU."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.dispatch import _module

from helpers import check_grad, check_loss
import test_linear
import test_wspo_loss

CUDA = torch.device("cuda")


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    names = []
    for name in ("triton", "native", "torch"):
        module, _ = _module(name)
        if module is not None and module.unavailable_reason(CUDA, torch.float32) is None:
            names.append(name)
    return names


GPU_BACKENDS = _gpu_backends()
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


@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(test_linear.CASES))
def test_linear_wspo_loss_on_gpu(backend, dtype, case):
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
