"""linear_token_logprobs and linear_wspo_loss (hidden states + lm_head) against float64 references."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels import chunked_linear, ops
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import BACKENDS, backend_params, check_grad, check_loss, make_labels

CASES = {  # (B, T, H, vocab of policy/ref/aligned/base, shift, bias, ignored rows)
    "small-bias": (2, 5, 16, (50, 50, 53, 49), True, True, ()),
    "V1000-nobias": (3, 4, 32, (1000, 1000, 1000, 1000), True, False, (2,)),
    "T1": (3, 1, 8, (7, 7, 7, 7), False, True, ()),
    "V1": (2, 3, 8, (1, 1, 1, 1), False, False, ()),
}


@pytest.fixture(autouse=True)
def _triton_runs_its_logits_free_kernels(request, monkeypatch):
    """Triton cases check its logits-free kernels (opt-in: WSPO_KERNELS_LINEAR=fused); the default chunked
    driver is what the torch and native cases check, and test_fused_equals_chunked compares the two."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton":
        monkeypatch.setenv(ops.LINEAR_ENV_VAR, "fused")


def _params(case, dtype, seed=0):
    B, T, H, vocabs, shift, bias, ignore_rows = CASES[case]
    g = torch.Generator().manual_seed(seed)
    models = []
    for v in vocabs:
        h = torch.randn(B, T, H, generator=g).to(dtype)
        w = (torch.randn(v, H, generator=g) / H ** 0.5 * 3).to(dtype)
        b = torch.randn(v, generator=g).to(dtype) if bias else None
        models.append((h, w, b))
    labels = make_labels((B, T), min(vocabs), generator=g, ignore_rows=ignore_rows)
    return models, labels, shift


def _logits(h, w, b, dtype=torch.float64):
    z = h.to(dtype) @ w.to(dtype).t()
    return z if b is None else z + b.to(dtype)


def _leaves(model, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in model]


def _reference(models, labels, shift, reduction, dtype=torch.float64):
    leaves = _leaves(models[0], dtype)
    frozen = [_logits(*m, dtype=dtype) for m in models[1:]]
    loss = reference_wspo_loss(_logits(*leaves, dtype=dtype), labels, ref=frozen[0], weak_aligned=frozen[1],
                               weak_base=frozen[2], shift=shift, reduction=reduction, dtype=dtype)
    return loss, [t for t in leaves if t is not None]


def _check_grads(grads, ref_grads, low_grads, dtype):
    for name, got, want, low in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, low_grads):
        assert got.dtype == dtype
        check_grad(got, want, dtype, low, what=name)


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_wspo_loss(backend, dtype, case, reduction, monkeypatch):
    monkeypatch.setattr(chunked_linear, "LINEAR_CHUNK_ELEMS", 2000)  # several chunks even at tiny shapes
    monkeypatch.setattr(chunked_linear, "MIN_CHUNK_ROWS", 1)
    models, labels, shift = _params(case, dtype)
    leaves = _leaves(models[0], dtype)
    h, w, b = leaves
    frozen = [m if m[2] is not None else m[:2] for m in models[1:]]
    loss = wk.linear_wspo_loss(h, w, labels, bias=b, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                               shift=shift, reduction=reduction, backend=backend)
    ref_loss, ref_leaves = _reference(models, labels, shift, reduction)
    check_loss(loss, ref_loss, dtype)
    up = torch.linspace(0.5, 1.5, ref_loss.numel(), dtype=torch.float64).reshape(ref_loss.shape) \
        if ref_loss.dim() else torch.tensor(0.7, dtype=torch.float64)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, params, up.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, up)
    low_grads = [None] * len(params)
    if dtype != torch.float32:
        low_loss, low_leaves = _reference(models, labels, shift, reduction, dtype=dtype)
        low_grads = torch.autograd.grad(low_loss, low_leaves, up.to(dtype))
    _check_grads(grads, ref_grads, low_grads, dtype)


@pytest.mark.parametrize("backend,dtype", backend_params((torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_gemm_precision_on_the_cpu(backend, dtype, case, reduction, monkeypatch):
    """The chunked path's GPU numbers (bf16 / fp16 GEMMs with fp32 results, G rounded to the inputs' dtype
    for the gradient GEMMs), computed on the CPU: within the same tolerances."""
    monkeypatch.setattr(chunked_linear, "EMULATE_LOWP_GEMMS", True)
    monkeypatch.setenv(ops.LINEAR_ENV_VAR, "chunked")
    test_linear_wspo_loss(backend, dtype, case, reduction, monkeypatch)


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("case", ["small-bias", "V1000-nobias"])
def test_linear_token_logprobs(backend, dtype, case, monkeypatch):
    monkeypatch.setattr(chunked_linear, "LINEAR_CHUNK_ELEMS", 3000)
    monkeypatch.setattr(chunked_linear, "MIN_CHUNK_ROWS", 1)
    models, labels, shift = _params(case, dtype)
    leaves = _leaves(models[0], dtype)
    logp = wk.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], shift=shift, backend=backend)
    ref_leaves = _leaves(models[0], torch.float64)
    ref = reference_token_logprobs(_logits(*ref_leaves), labels, shift=shift)
    check_loss(logp, ref, dtype, what="logps")
    up = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(logp, params, up.float())
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], up)
    low_grads = [None] * len(params)
    if dtype != torch.float32:
        low = [t for t in _leaves(models[0], dtype)]
        low_lp = reference_token_logprobs(_logits(*low, dtype=dtype), labels, shift=shift, dtype=dtype)
        low_grads = torch.autograd.grad(low_lp, [t for t in low if t is not None], up.to(dtype))
    _check_grads(grads, ref_grads, low_grads, dtype)


def test_linear_equals_logits_equals_logps():
    """The three ways of feeding the same models give the same loss and policy-logit gradient."""
    models, labels, shift = _params("small-bias", torch.float32, seed=9)
    frozen_logits = [_logits(*m, dtype=torch.float32) for m in models[1:]]
    frozen_logps = [wk.token_logprobs(z, labels, shift=shift) for z in frozen_logits]
    h, w, b = _leaves(models[0], torch.float32)
    lin = wk.linear_wspo_loss(h, w, labels, bias=b, ref=models[1], weak_aligned=models[2], weak_base=models[3])
    z = _logits(*models[0], dtype=torch.float32).requires_grad_()
    from_logits = wk.wspo_loss(z, labels, ref=frozen_logits[0], weak_aligned=frozen_logits[1],
                               weak_base=frozen_logits[2])
    from_logps = wk.wspo_loss(z, labels, ref=frozen_logps[0], weak_aligned=frozen_logps[1],
                              weak_base=frozen_logps[2])
    torch.testing.assert_close(from_logps, from_logits, rtol=1e-6, atol=0)
    torch.testing.assert_close(lin, from_logits, rtol=1e-5, atol=0)
    (gz,) = torch.autograd.grad(from_logits, z)
    gh, gw, gb = torch.autograd.grad(lin, (h, w, b))
    hf, wf = models[0][0].float(), models[0][1].float()
    torch.testing.assert_close(gh, gz @ wf, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw, gz.reshape(-1, gz.shape[-1]).t() @ hf.reshape(-1, hf.shape[-1]),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb, gz.sum((0, 1)), rtol=1e-4, atol=1e-7)


def test_frozen_lm_head_gets_no_gradient_work():
    """A frozen lm_head (LoRA) must not receive a gradient; hidden still does."""
    models, labels, shift = _params("small-bias", torch.float32)
    h = models[0][0].clone().requires_grad_()
    loss = wk.linear_wspo_loss(h, models[0][1], labels, bias=models[0][2], ref=models[1], weak_aligned=models[2],
                               weak_base=models[3])
    (gh,) = torch.autograd.grad(loss, h)
    ref_loss, ref_leaves = _reference(models, labels, shift, "mean")
    (ref_gh,) = torch.autograd.grad(ref_loss, ref_leaves[0])
    check_grad(gh, ref_gh, torch.float32)


def test_module_form_and_gradcheck():
    models, labels, shift = _params("T1", torch.float64)
    h, w, b = _leaves(models[0], torch.float64)
    module = wk.LinearWSPOLoss(gamma=0.3)
    frozen = dict(ref=models[1], weak_aligned=models[2], weak_base=models[3])
    assert torch.autograd.gradcheck(lambda *p: module(p[0], p[1], labels, bias=p[2], **frozen), (h, w, b))


def test_chunk_rows_follow_the_byte_budget(monkeypatch):
    def sizes(n, v):
        step = chunked_linear._chunk_rows(n, v)
        return [min(step, n - r0) for r0 in range(0, n, step)]

    assert sizes(4096, 32000) == [1024] * 4                             # <= 128 MB of fp32 logits, equal chunks
    assert sizes(4000, 32000) == [1000] * 4
    assert set(sizes(1024, 152064)) == {256}                             # never skinnier than MIN_CHUNK_ROWS
    gpu = lambda n, v, h: chunked_linear._chunk_rows(n, v, h, "cuda")  # noqa: E731
    assert gpu(8192, 128256, 4096) == 256 and gpu(65536, 152064, 3584) == 2048   # Liger: N / ceil(V / H) rows
    assert gpu(100, 128256, 4096) == 100                                           # one chunk, never skinnier
    monkeypatch.setenv(chunked_linear.CHUNK_ENV_VAR, "256")
    assert sizes(4096, 32000) == [2048] * 2


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_ignored_rows_do_no_gemm_work_on_the_cpu(backend, monkeypatch):
    """Counted rows are compacted before the GEMMs (as CCE does): same loss, logps and gradients as without
    compaction, and the GEMMs see only the counted rows."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} unavailable")
    models, labels, shift = _params("V1000-nobias", torch.float32)
    labels[0, :3] = -100                                      # a prompt, besides the fully ignored row

    def run():
        h, w = (t.detach().clone().requires_grad_() for t in models[0][:2])
        frozen = [m[:2] for m in models[1:]]
        out = wk.linear_wspo_loss(h, w, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                  shift=shift, return_metrics=True, backend=backend)
        out.loss.backward()
        return out.loss, out.strong_log_ratio, h.grad, w.grad

    rows_seen = []
    logits = chunked_linear._Gemms.logits
    monkeypatch.setattr(chunked_linear._Gemms, "logits",
                        lambda self, h_c, out: rows_seen.append(h_c.shape[0]) or logits(self, h_c, out))
    compacted = run()
    counted = int((labels[:, 1:] != -100).sum()) if shift else int((labels != -100).sum())
    assert sum(rows_seen) == 4 * counted                      # three frozen forwards and the policy's, live rows only
    monkeypatch.setattr(chunked_linear, "_live_rows", lambda *a: None)
    for a, b in zip(compacted, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
