"""The native CPU build: every kernel copy this CPU can run (not only the one auto picks) on odd shapes,
and the guarantee that nothing outside a kernel copy needs more than the baseline ISA."""
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.backends import native
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

from helpers import check_grad, check_loss, make_labels, make_logits


def _extension():
    try:
        return importlib.import_module("wspo_kernels._C")
    except ImportError:
        return None


EXT = _extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="native CPU kernels are not built in this install")
COPIES = EXT.available_capabilities() if EXT is not None else []


@pytest.fixture(params=COPIES)
def capability(request):
    """Run the test on one kernel copy, then restore the one native.py chose."""
    chosen = EXT.capability()
    EXT.use_capability(request.param)
    yield request.param
    EXT.use_capability(chosen)


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


def test_the_chosen_copy_follows_torch_and_the_cpu():
    assert native.capability() == native.preferred_capability(EXT) == EXT.capability()
    assert EXT.available_capabilities()[-1] == "default"
    with pytest.raises(RuntimeError, match="not available here"):
        EXT.use_capability("sve256")


# Instructions that need more than the x86-64 baseline: VEX/EVEX encodings (v-prefixed), ymm/zmm
# registers, AVX-512 masks.
_BEYOND_BASELINE = re.compile(r"\tv[a-z0-9]+\s|%[yz]mm|\{%k[1-7]\}")


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux"),
                    reason="needs objdump (binutils)")
def test_only_kernel_copies_contain_avx_instructions():
    """Bindings, module init and every shared inline function must run on a CPU without AVX: the linker
    keeps one copy of each inline function, so one compiled with -mavx512f would crash an AVX2 CPU."""
    if not any(c in COPIES for c in ("avx2", "avx512")):
        pytest.skip("no x86 kernel copies in this build")
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", EXT.__file__], capture_output=True,
                          text=True, check=True).stdout
    offenders, function = set(), ""
    for line in dump.splitlines():
        if line.endswith(">:"):
            function = line
        elif _BEYOND_BASELINE.search(line) and "wspo_avx2::" not in function and "wspo_avx512::" not in function:
            offenders.add(function)
    assert not offenders, f"AVX instructions outside the kernel copies: {sorted(offenders)[:5]}"


QEMU = shutil.which("qemu-x86_64")
_EMULATED = """
import torch, wspo_kernels as wk
from wspo_kernels.backends import native
from wspo_kernels.reference import reference_wspo_loss
g = torch.Generator().manual_seed(0)
x = [torch.randn(2, 5, 301, generator=g) for _ in range(4)]
y = torch.randint(0, 301, (2, 5), generator=g)
p = x[0].clone().requires_grad_()
loss = wk.wspo_loss(p, y, ref=x[1], weak_aligned=x[2], weak_base=x[3], backend="native")
loss.backward()
p64 = x[0].double().requires_grad_()
ref = reference_wspo_loss(p64, y, ref=x[1].double(), weak_aligned=x[2].double(), weak_base=x[3].double())
ref.backward()
assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)), (float(loss), float(ref))
assert (p.grad.double() - p64.grad).abs().max() <= 1e-5 * p64.grad.abs().max()
print(native.capability())
"""


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not sys.platform.startswith("linux"), reason="needs qemu-x86_64 (qemu-user)")
@pytest.mark.parametrize("cpu,expected", [("Haswell", "avx2"), ("Nehalem", "default")])
def test_runs_on_an_older_cpu(cpu, expected):
    """The native kernels on an emulated AVX2-only (Haswell) and AVX-less (Nehalem) CPU: exact, no SIGILL."""
    if "avx512" not in COPIES and "avx2" not in COPIES:
        pytest.skip("no x86 kernel copies in this build")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", _EMULATED], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, f"under qemu -cpu {cpu}: rc {out.returncode}\n{out.stderr[-2000:]}"
    assert out.stdout.strip().splitlines()[-1] == expected


CROSS_GXX = shutil.which("aarch64-linux-gnu-g++")
_CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu")


@pytest.mark.slow
@pytest.mark.skipif(CROSS_GXX is None, reason="needs aarch64-linux-gnu-g++ (Debian's g++-aarch64-linux-gnu)")
def test_sources_compile_for_aarch64(tmp_path):
    """The baseline kernel copy and the bindings build for aarch64 with no x86 flags: the kernels through
    ATen's NEON Vectorized (an aarch64 object with NEON FMAs), the bindings without x86 intrinsics."""
    import sysconfig

    import pybind11
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                       f"-I{pybind11.get_include()}", f"-I{_CSRC}"]
    obj = tmp_path / "kernels.o"
    kernels = subprocess.run([CROSS_GXX, "-std=c++17", "-O2", "-w", "-c", "-o", str(obj),
                              "-DCPU_CAPABILITY=wspo_default", '-DWSPO_CAPABILITY_NAME="default"',
                              "-DWSPO_TABLE=table_default", *includes, os.path.join(_CSRC, "kernels.cpp")],
                             capture_output=True, text=True)
    assert kernels.returncode == 0, kernels.stderr[-3000:]
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    bindings = subprocess.run([CROSS_GXX, "-std=c++17", "-w", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
                               *includes, os.path.join(_CSRC, "wspo_cpu.cpp")], capture_output=True, text=True)
    assert bindings.returncode == 0, bindings.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3 * 4096 + 5, 128 * 4096 + 1], ids=["blocks", "past-kMaxBlocks"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy-grad", "inplace"])
def test_one_exp_path_block_edges(capability, vocab, inplace, dtype):
    """Gradients keep exp(z - m_b) per block and rescale it: blocks that are all -inf, a label past the
    first block, a later block raising the max, and rows too long for the per-block maxima."""
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(2, 3, vocab, generator=g) * 4).to(dtype)
    x[0, 0, :4096] = -float("inf")           # a whole block without mass
    x[0, 1, -7] = 40.0                        # the max arrives in the last block
    x[1, 2, 4096 + 3] = 30.0
    labels = torch.tensor([[4100, vocab - 7, 11], [1, -100, 4096 + 3]])
    frozen = [torch.randn(2, 3, vocab, generator=g).to(dtype) for _ in range(3)]
    policy = x.clone().requires_grad_()
    loss = wk.wspo_loss(policy * 1 if inplace else policy, labels, ref=frozen[0], weak_aligned=frozen[1],
                        weak_base=frozen[2], shift=False, inplace_grad=inplace, backend="native")
    loss.backward()
    p64 = x.double().requires_grad_()
    ref = reference_wspo_loss(p64, labels, ref=frozen[0].double(), weak_aligned=frozen[1].double(),
                              weak_base=frozen[2].double(), shift=False)
    ref.backward()
    lowp = None
    if dtype != torch.float32:
        pl = x.clone().requires_grad_()
        reference_wspo_loss(pl, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], shift=False,
                            dtype=dtype).backward()
        lowp = pl.grad
    check_loss(loss, ref, dtype)
    check_grad(policy.grad, p64.grad, dtype, lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["aligned", "odd-vocab", "aligned-slice"])
def test_streamed_gradients_every_capability(capability, dtype, layout):
    """Gradients of at least stream_min_bytes() go out with non-temporal stores (AVX-512, AVX2) where a row
    starts on a vector boundary: V = 32768 (every row does); V = 32769 (one row in 8-32 does, the others
    take ordinary stores); a 32007-wide slice of a 32016-wide buffer (a tail in every row; in place, rows of
    that stride).  Every kernel that writes a gradient, also in place; the copy that never streams runs the
    same shapes."""
    threshold = EXT.stream_min_bytes() or 16 << 20
    assert (EXT.stream_min_bytes() > 0) == (capability in ("avx2", "avx512"))
    g = torch.Generator().manual_seed(11)
    vocab, width = {"aligned": (32768, 32768), "odd-vocab": (32769, 32769), "aligned-slice": (32007, 32016)}[layout]
    per_seq = -(-threshold // (2 * vocab * dtype.itemsize)) + 1
    shape = (2, per_seq)
    assert shape[0] * shape[1] * vocab * dtype.itemsize >= threshold
    bufs = [torch.randn(*shape, width, generator=g).mul_(3).to(dtype) for _ in range(4)]
    x = [b[..., :vocab] for b in bufs]
    labels = make_labels(shape, vocab, generator=g, ignore_rows=(0,))
    labels[1, -1] = vocab - 1                                  # a label in the last step
    lp = [reference_token_logprobs(z, labels) for z in x[1:]]  # frozen models precomputed (wspo_rows)
    p64 = x[0].double().requires_grad_()
    up = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ref = reference_wspo_loss(p64, labels, ref=x[1].double(), weak_aligned=x[2].double(),
                              weak_base=x[3].double(), reduction="none", shift=False)
    (ref_grad,) = torch.autograd.grad(ref, p64, up)
    lowp = None
    if dtype != torch.float32:
        pl = x[0].clone().requires_grad_()
        low = reference_wspo_loss(pl, labels, ref=x[1], weak_aligned=x[2], weak_base=x[3], reduction="none",
                                  shift=False, dtype=dtype)
        (lowp,) = torch.autograd.grad(low, pl, up.to(dtype))
    for frozen, what in ((x[1:], "four logits"), (lp, "precomputed")):
        for inplace in (False, True):   # in place: over a view of a buffer as wide as the inputs'
            base = bufs[0].clone().requires_grad_()
            arg = (base * 1 if inplace else base)[..., :vocab]
            loss = wk.wspo_loss(arg, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                reduction="none", shift=False, inplace_grad=inplace, backend="native")
            (grad,) = torch.autograd.grad(loss, base, up.float())
            check_loss(loss, ref, dtype, f"{what} loss, inplace={inplace}")
            check_grad(grad[..., :vocab], ref_grad, dtype, lowp, f"{what} grad, inplace={inplace}")
            assert not grad[..., vocab:].any()
    # logprobs backward (the two-exp gradient sweep)
    z = x[0].clone().requires_grad_()
    w = torch.rand(shape, generator=g)
    (grad,) = torch.autograd.grad((wk.token_logprobs(z, labels, backend="native") * w).sum(), z)
    z64 = x[0].double().requires_grad_()
    (want,) = torch.autograd.grad((reference_token_logprobs(z64, labels) * w.double()).sum(), z64)
    lowp = None
    if dtype != torch.float32:
        zl = x[0].clone().requires_grad_()
        (lowp,) = torch.autograd.grad((reference_token_logprobs(zl, labels, dtype=dtype) * w.to(dtype)).sum(), zl)
    check_grad(grad, want, dtype, lowp, "logprobs grad")


def test_vector_exp_accuracy(capability):
    """The kernels' own vector exp on its domain x <= 0: within 20 ulp (the bound of ATen's exp_u20,
    ~1.2e-6 relative) wherever exp(x) is a normal float, 0 below log(FLT_MIN) and exactly 0 at -inf."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.cat([torch.linspace(-104.0, 0.0, 1_000_003), -torch.logspace(-30, 1, 1001),
                   torch.tensor([-0.0, -87.3365, -87.33654, -87.34, -float("inf")])])
    got = x.clone()
    EXT.vec_exp_(got)
    want = x.double().exp()
    normal = want >= tiny
    rel = ((got.double() - want).abs() / want)[normal]
    worst = int(rel.argmax())
    assert rel[worst] <= 20 * 2.0 ** -24, f"exp({x[normal][worst]:.9g}) = {got[normal][worst]:.9g}, rel {rel[worst]:.3g}"
    assert (got[~normal].double() - want[~normal]).abs().max() <= tiny
    assert got[-1] == 0 and (got >= 0).all()


def _grad_of_one_step(p, labels, frozen):
    wk.wspo_loss(p, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], shift=False,
                 backend="native").backward()
    grad, p.grad = p.grad, None
    return grad


def test_gradient_buffers_are_reused_only_once_freed():
    """The CPU gradient-buffer cache hands a freed gradient's block to the next step, never one still held."""
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(4, 7, 3001, generator=g) for _ in range(4)]
    labels = make_labels((4, 7), 3001, generator=g)
    p = x[0].clone().requires_grad_()
    wk.empty_cache()
    first = _grad_of_one_step(p, labels, x[1:])
    want, where = first.clone(), first.data_ptr()
    assert wk.cached_bytes() == 0                     # held by `first`
    second = _grad_of_one_step(p, labels, x[1:])
    assert second.data_ptr() != where and torch.equal(first, want) and torch.equal(second, want)
    del first
    assert wk.cached_bytes() >= want.numel() * 4      # freed: kept
    del second                                        # also freed: the cache keeps one block
    assert wk.cached_bytes() >= want.numel() * 4
    third = _grad_of_one_step(p, labels, x[1:])
    assert wk.cached_bytes() == 0 and torch.equal(third, want)
    del third
    wk.empty_cache()
    assert wk.cached_bytes() == 0


def test_gradient_buffer_cache_can_be_turned_off():
    g = torch.Generator().manual_seed(6)
    x = [torch.randn(3, 500, generator=g) for _ in range(4)]
    labels = make_labels((3,), 500, generator=g)
    p = x[0].clone().requires_grad_()
    EXT.set_cache_enabled(False)
    try:
        _grad_of_one_step(p, labels, x[1:])
        assert wk.cached_bytes() == 0
    finally:
        EXT.set_cache_enabled(True)


def test_large_fresh_buffers_are_prefaulted_and_usable():
    """Blocks >= 64 MiB are faulted in up front (MADV_POPULATE_WRITE where the kernel has it)."""
    wk.empty_cache()
    like = torch.empty(17 * 2 ** 20, dtype=torch.float32)  # 68 MiB, never touched
    buf = EXT.cached_empty_like(like)
    assert buf.shape == like.shape and buf.is_contiguous() and buf.data_ptr() % 64 == 0
    buf.fill_(2.0)
    assert float(buf.sum(dtype=torch.float64)) == 2.0 * like.numel()
    del buf
    wk.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_a_counted_row_every_capability(capability, dtype):
    """Every kernel copy keeps NaN: copies whose block max drops it (AVX2, AVX-512) carry it through the exp."""
    vocab = 2 * 4096 + 77
    x = torch.randn(5, vocab).to(dtype)
    labels = torch.tensor([7, 4000, 8200, 4100, 11])
    x[0, 5000] = float("nan")
    x[1, 4000] = float("nan")                             # the label
    x[2, 4096:8192] = float("nan")
    x[3, :4096] = -float("inf")                           # -inf but for one NaN: the block max is -inf
    x[3, 5] = float("nan")
    logp = wk.token_logprobs(x, labels, backend="native")
    assert logp[:4].isnan().all() and torch.isfinite(logp[4]), logp
    for inplace in (False, True):
        p = x.clone().requires_grad_()
        frozen = [torch.randn(5, vocab).to(dtype) for _ in range(3)]
        loss = wk.wspo_loss(p * 1 if inplace else p, labels, ref=frozen[0], weak_aligned=frozen[1],
                            weak_base=frozen[2], reduction="sum", shift=False, inplace_grad=inplace, backend="native")
        loss.backward()
        assert loss.isnan() and p.grad[:4].isnan().all() and torch.isfinite(p.grad[4]).all(), inplace


def test_a_small_request_does_not_pin_the_cached_block():
    """The cache hands a block out only to requests of at least half its size."""
    wk.empty_cache()
    big = EXT.cached_empty_like(torch.empty(1 << 20))
    del big
    held = wk.cached_bytes()
    assert held >= 4 << 20
    small = EXT.cached_empty_like(torch.empty(1000))
    assert wk.cached_bytes() == held                      # still cached, not handed to the small one
    half = EXT.cached_empty_like(torch.empty(1 << 19))
    assert wk.cached_bytes() == 0                         # half its size: reused
    del small, half
    wk.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weak_vocab", [4096 + 3, 3 * 4096 + 1], ids=["weak-narrower", "weak-wider"])
def test_pipelined_gradient_sweeps_change_nothing(capability, dtype, weak_vocab):
    """Each row's gradient is written during the next row's statistics sweeps (kernels.cpp: PendingGrad):
    bit for bit what the unpipelined order writes, whatever the frozen sweeps' lengths (weak models with a
    narrower or wider vocabulary than the policy's), with ignored rows between counted ones, a block
    without mass, and the last row of each thread's range finished after the loop."""
    g = torch.Generator().manual_seed(weak_vocab)
    vocab = 2 * 4096 + 7
    policy = (torch.randn(3, 5, vocab, generator=g) * 4).to(dtype)
    policy[0, 2, 4096:8192] = -float("inf")
    ref = torch.randn(3, 5, vocab, generator=g).to(dtype)
    weak = [torch.randn(3, 5, weak_vocab, generator=g).to(dtype) for _ in range(2)]
    labels = make_labels((3, 5), 4096, generator=g, ignore_rows=(1,))
    labels[0, 1] = -100
    precomputed = [wk.token_logprobs(z, labels) for z in (ref, *weak)]
    results = {}
    try:
        for pipelined in (True, False):
            EXT.set_pipelined(pipelined)
            for frozen, what in (((ref, *weak), "four logits"), (precomputed, "precomputed")):
                x = policy.clone().requires_grad_()
                out = wk.wspo_loss(x, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                   shift=False, reduction="sum", return_metrics=True, backend="native")
                out.loss.backward()  # "sum": the fused kernel writes the gradient in its forward pass
                results[pipelined, what] = (out.loss.detach(), out.policy_logps, x.grad)
    finally:
        EXT.set_pipelined(True)
    for what in ("four logits", "precomputed"):
        for a, b in zip(results[True, what], results[False, what]):
            assert torch.equal(a, b), f"{what}: pipelined differs by {(a.float() - b.float()).abs().max()}"


def test_kernel_benchmark_script_runs(capsys):
    """benchmarks/native_kernels.py (kernel-only, interleaved) on a tiny shape: every copy, dtype and kernel,
    the unpipelined A/B rows included."""
    import runpy
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "native_kernels.py"))
    script["main"](["--rows", "8", "--vocab", "300", "--rounds", "2", "--ab"])
    out = capsys.readouterr().out
    assert "interleaved, 2 rounds" in out and "% of binding floor" in out
    for cap in COPIES:
        for kernel in ("logprobs", "wspo_four", "wspo_rows", "wspo_four unpipelined", "wspo_rows unpipelined"):
            assert out.count(f"| {cap} (") == 10 and f"| bfloat16 | {kernel} |" in out
