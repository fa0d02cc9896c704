"""Logits-free Triton linear kernels vs the chunked path; the choice between them."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels import chunked_linear, ops

from helpers import BACKENDS, make_labels

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable (no GPU, no interpreter)")


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    """These tests are about the logits-free kernels, which are opt-in (the chunked driver is the default)."""
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")


def _models(seed=0, B=2, T=9, H=40, V=300, bias=True, ignore_rows=(1,)):
    g = torch.Generator().manual_seed(seed)
    models = []
    for v in (V, V, V + 7, V - 5):
        models.append((torch.randn(B, T, H, generator=g), torch.randn(v, H, generator=g) / H ** 0.5 * 3,
                       torch.randn(v, generator=g) if bias else None))
    labels = make_labels((B, T), V - 5, generator=g, ignore_rows=ignore_rows)
    return models, labels


def _run(models, labels, reduction):
    h, w, b = (t.clone().requires_grad_() for t in models[0])
    loss = wk.linear_wspo_loss(h, w, labels, bias=b, ref=models[1], weak_aligned=models[2], weak_base=models[3],
                               reduction=reduction, backend="triton")
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_equals_chunked(reduction, monkeypatch):
    models, labels = _models()
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")
    fused = _run(models, labels, reduction)
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "chunked")
    monkeypatch.setattr(chunked_linear, "LINEAR_CHUNK_ELEMS", 1000)
    monkeypatch.setattr(chunked_linear, "MIN_CHUNK_ROWS", 1)
    chunked = _run(models, labels, reduction)
    for a, b in zip(fused, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_order_covers_every_tile(monkeypatch):
    """The gradient kernel's grouped launch order: more row blocks than a group (2 x 322 rows: 11 blocks of
    64, groups of 8, so a partial last group), a partial vocab block: every tile once, as the chunked path
    computes."""
    from wspo_kernels.backends import triton_linear
    models, labels = _models(seed=4, B=2, T=5 * triton_linear.BLOCK_M + 3, H=16, V=2 * triton_linear.BLOCK_V + 8,
                             ignore_rows=())   # every row block does work
    assert triton_linear.GROUP_M < 11
    fused = _run(models, labels, "sum")
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "chunked")
    for a, b in zip(fused, _run(models, labels, "sum")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_choice_of_linear_implementation(monkeypatch):
    """Chunked (deterministic) by default, also for Triton; the logits-free kernels only when asked for."""
    rows = wk.select_backend("triton", torch.device("cpu"), torch.float32)
    monkeypatch.delenv(ops.LINEAR_ENV_VAR, raising=False)
    assert ops._linear_impl(rows) is chunked_linear
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")
    assert ops._linear_impl(rows) is rows.linear
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="auto, chunked or fused"):
        ops._linear_impl(rows)
    torch_rows = wk.select_backend("torch", torch.device("cpu"), torch.float32)
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")
    with pytest.raises(RuntimeError, match="has no logits-free linear kernels"):
        ops._linear_impl(torch_rows)


def test_fully_ignored_batch_does_no_gradient_work():
    models, labels = _models(seed=2)
    labels = torch.full_like(labels, -100)
    loss, dh, dw, db = _run(models, labels, "mean")
    assert loss.item() == 0.0
    assert not dh.any() and not dw.any() and not db.any()


def test_launches_run_under_the_operands_device():
    """Every Triton launch sits inside ``device_guard`` (tensors on a second GPU), and the guard names
    the tensor's device, not the current one."""
    import ast
    import inspect

    from wspo_kernels.backends import triton_linear, triton_rows

    class OnSecondGPU:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = triton_rows.device_guard(OnSecondGPU())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for module in (triton_rows, triton_linear):
        tree = ast.parse(inspect.getsource(module))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "device_guard"
                    for i in node.items):
                guarded |= {id(n) for n in ast.walk(node)}
        launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]
        assert launches, module.__name__
        unguarded = [ast.unparse(n.func) for n in launches if id(n) not in guarded]
        assert not unguarded, f"{module.__name__}: launches outside device_guard: {unguarded}"


def test_fp32_dot_precision_follows_torch_matmul_setting():
    """IEEE fp32 unless the user allowed TF32 for matmuls, as cuBLAS does; low-precision inputs are unaffected."""
    from wspo_kernels.backends import triton_linear
    h, w = torch.randn(3, 8), torch.randn(5, 8)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_linear._operands(h, w, None)[1]["IEEE"]
        torch.set_float32_matmul_precision("high")
        assert not triton_linear._operands(h, w, None)[1]["IEEE"]
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9's API
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            assert triton_linear._operands(h, w, None)[1]["IEEE"]
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            assert not triton_linear._operands(h, w, None)[1]["IEEE"]
        assert not triton_linear._operands(h.bfloat16(), w.bfloat16(), None)[1]["IEEE"]
    finally:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "none"   # the default: inherit the global setting
        torch.set_float32_matmul_precision(before)


def test_vocab_splits_fill_the_gpu(monkeypatch):
    """Few rows: many splits of the vocabulary (2 programs per SM); many rows: one; never more than its blocks."""
    from wspo_kernels.backends import triton_linear as L

    class Props:
        multi_processor_count = 132
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda")
    assert L.vocab_splits(1024, 128256, cuda) == 17             # 16 row blocks x 17 splits >= 2 x 132 programs
    assert L.vocab_splits(64, 128256, cuda) == 264               # one row block: 264 splits
    assert L.vocab_splits(32768, 128256, cuda) == 1              # 512 row blocks already fill 132 SMs twice
    assert L.vocab_splits(64, 300, cuda) == 3                    # at most one split per vocabulary block
    assert L.vocab_splits(64, 128256, torch.device("cpu")) == L.VOCAB_SPLITS
