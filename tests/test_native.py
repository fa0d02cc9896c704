"""The native CPU build: every compiled capability module (not only the one auto loads) on odd shapes."""
import importlib

import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.backends import native
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import check_grad, check_loss, make_labels, make_logits


def _capability_modules():
    mods = []
    for name in ("avx512", "avx2", "default"):
        try:
            mods.append(importlib.import_module(f"wspo_kernels._C_{name}"))
        except ImportError:
            pass
    return mods


MODULES = _capability_modules()
pytestmark = pytest.mark.skipif(not MODULES, reason="native CPU kernels are not built in this install")
# Modules this CPU can execute: the ones native.py would fall back through for its capability.
RUNNABLE = native._CAPABILITY_ORDER.get(torch.backends.cpu.get_cpu_capability(), ("default",))
CPU_CAPS = [m for m in MODULES if m.capability in RUNNABLE]


@pytest.fixture(params=CPU_CAPS, ids=lambda m: m.capability)
def capability(request, monkeypatch):
    monkeypatch.setitem(native._loaded, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 5, 31, 33, 4097, 8195])  # tails of every vector width, > one L1 block
def test_wspo_four_every_capability(capability, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = [make_logits((3, 6, vocab), dtype, kind="neginf", generator=g) for _ in range(4)]
    finite = torch.stack([torch.isfinite(x.float()) for x in logits]).all(0)
    labels = make_labels((3, 6), vocab, generator=g, ignore_rows=(1,), avoid=torch.where(finite, 0.0, -float("inf")))
    policy = logits[0].clone().requires_grad_()
    loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                        reduction="none", shift=False, backend="native")
    p64 = logits[0].double().requires_grad_()
    ref = reference_wspo_loss(p64, labels, ref=logits[1].double(), weak_aligned=logits[2].double(),
                              weak_base=logits[3].double(), reduction="none", shift=False)
    check_loss(loss, ref, dtype)
    up = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, policy, up.float())
    (ref_grad,) = torch.autograd.grad(ref, p64, up)
    lowp = None
    if dtype != torch.float32:
        pl = logits[0].clone().requires_grad_()
        low = reference_wspo_loss(pl, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                                  reduction="none", shift=False, dtype=dtype)
        (lowp,) = torch.autograd.grad(low, pl, up.to(dtype))
    check_grad(grad, ref_grad, dtype, lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_ratio_every_capability(capability, dtype):
    g = torch.Generator().manual_seed(7)
    a = make_logits((17, 1003), dtype, kind="extreme", generator=g)
    b = make_logits((17, 998), dtype, generator=g)
    labels = make_labels((17,), 998, generator=g)
    check_loss(wk.token_logprobs(a, labels, backend="native"), reference_token_logprobs(a, labels), dtype, "logps")
    want = reference_token_logprobs(a, labels) - reference_token_logprobs(b, labels)
    check_loss(wk.weak_log_ratio(a, b, labels, backend="native"), want, dtype, "ratio")


def test_row_stride_views_are_read_in_place():
    """A [N, V] view with a row stride > V (e.g. a slice of a wider buffer) needs no copy."""
    g = torch.Generator().manual_seed(3)
    wide = make_logits((8, 300), torch.float32, generator=g)
    view = wide[:, :257]
    labels = make_labels((8,), 257, generator=g)
    check_loss(wk.token_logprobs(view, labels, backend="native"), reference_token_logprobs(view, labels),
               torch.float32)


def test_results_do_not_depend_on_the_thread_count():
    """Rows are independent: splitting them over torch.get_num_threads() threads changes no bit."""
    before = torch.get_num_threads()
    x, y = torch.randn(64, 5000), torch.randint(0, 5000, (64,))
    try:
        torch.set_num_threads(1)
        one = wk.token_logprobs(x, y, backend="native")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, wk.token_logprobs(x, y, backend="native"), rtol=0, atol=0)


def test_missing_build_falls_back_with_reason(monkeypatch):
    monkeypatch.setitem(native._loaded, "cpu", "no compiled module (simulated)")
    with pytest.raises(RuntimeError, match=r"backend 'native' cannot run on cpu .*simulated"):
        wk.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), backend="native")
    assert wk.select_backend("", torch.device("cpu"), torch.float32).NAME == "torch"


def test_cuda_tensors_without_cuda_build_give_a_clear_reason(monkeypatch):
    monkeypatch.delitem(native._loaded, "cuda", raising=False)
    reason = native.unavailable_reason(torch.device("cuda"), torch.float32)
    assert reason is None or "CUDA kernels" in reason
