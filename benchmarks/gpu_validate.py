"""One-command GPU validation: what the CPU tests cannot reach, then the performance table.

    python benchmarks/gpu_validate.py                 # on a GPU: checks + performance (about 5 minutes)
    python benchmarks/gpu_validate.py --no-perf       # checks only
    TRITON_INTERPRET=1 python benchmarks/gpu_validate.py --device cpu --smoke   # the script itself, on a CPU

Checks (every GPU backend: triton, native CUDA, torch; bf16, fp16, fp32; float64 references on the device):
- row kernels at V in {32000, 32001, 128256, 152064} and a 151665-wide slice of a 152064-wide buffer: the
  four-logits one-pass loss, the policy-only kernel (frozen logps precomputed), token_logprobs forward and
  backward, weak_log_ratio, inplace_grad on transposed and vocab-sliced views;
- N * V > 2^31 (int64 row offsets); the linear form over many blocks (N > 4096, H = 4096) and with
  V * H > 2^31; capture of forward + backward in a CUDA graph (the device-side label checks included).
Tolerances are DESIGN.md's: fp32 loss 1e-5 relative, gradients 1e-5 * max|grad|; bf16 / fp16 loss 1e-3,
gradients within 2x PyTorch's own low-precision path.  Every check runs; each failure prints its numbers.
Then ``wspo-kernels bench`` on the issue's shapes with every importable peer (CCE, Liger,
torch.nn.functional.linear_cross_entropy; QuACK is not wired in), and ``benchmarks/padding_free.py`` in bf16
(padded vs packed training step, precompute against a plain forward).  Results:
``benchmarks/results/gpu_<gpu>_validate.{json,md}``, ``gpu_<gpu>.{json,md,png}`` and ``gpu_<gpu>_padding_free.md``.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import time
import traceback

import torch

import wspo_kernels as wk
from wspo_kernels import ops
from wspo_kernels.dispatch import available_backends
from wspo_kernels.reference import reference_token_logprobs, reference_wspo_loss

FP32_RTOL, LOWP_LOSS_RTOL, LOWP_GRAD_FACTOR = 1e-5, 1e-3, 2.0
FULL = dict(vocabs=(32000, 32001, 128256, 152064, (151665, 152064)), batch=2, seq=65, big_rows=(18000, 128256),
            linear_blocks=(4608, 4096, 32000), linear_big=(16, 16384, 152064))
SMOKE = dict(vocabs=(1000, 1001, (999, 1001)), batch=2, seq=9, big_rows=None, linear_blocks=(150, 64, 500),
             linear_big=None)
LINEAR_IMPLS = {"triton": ("chunked", "fused")}   # per backend: the default driver, and opt-in kernels
PERF_CASES = ["logits:8192x32000:bf16", "logits:8192x128256:bf16", "logits:8192x152064:bf16",
              "logits:8192x128256:fp32", "logits:16384x152064:bf16", "logps:8192x128256:bf16",
              "linear:8192x4096x128256:bf16", "linear:8192x3584x152064:bf16"]


class Report:
    def __init__(self):
        self.rows = []

    def check(self, name, fn):
        t0 = time.perf_counter()
        try:
            problems = fn() or []
        except Exception as e:  # keep going: report it with its traceback
            problems = [f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"]
        ok = not problems
        self.rows.append(dict(check=name, ok=ok, seconds=round(time.perf_counter() - t0, 3), problems=problems))
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({self.rows[-1]['seconds']} s)", flush=True)
        for p in problems:
            print("     " + p.replace("\n", "\n     "), flush=True)


def _compare(what, got, want, dtype, lowp=None, loss=False):
    """None when within tolerance, else a line with the worst element."""
    got, want = got.double(), want.double()
    if torch.isnan(got).any():
        return f"{what}: NaN"
    scale = want.abs().max().item() if want.numel() else 0.0
    if dtype == torch.float32:
        atol = FP32_RTOL * max(scale, 1e-12)
    elif loss:
        atol = LOWP_LOSS_RTOL * max(scale, 1e-12)
    else:
        atol = max(LOWP_GRAD_FACTOR * (lowp.double() - want).abs().max().item(), FP32_RTOL * max(scale, 1e-12))
    err = (got - want).abs()
    worst = err.max().item() if err.numel() else 0.0
    if worst <= atol:
        return None
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return f"{what}: max |diff| {worst:.3e} > {atol:.3e} at {idx}: got {got[idx].item()!r}, want {want[idx].item()!r}"


def _inputs(V, dtype, device, batch, seq, n_models=4, seed=0):
    """(logits, labels, vocab); the logits are a vocabulary slice of a padded buffer when V is a tuple."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = V[1] if isinstance(V, tuple) else V
    vocab = V[0] if isinstance(V, tuple) else V
    bufs = [(torch.randn(batch, seq, width, generator=g) * 3).to(dtype).to(device) for _ in range(n_models)]
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 4] = -100
    labels[-1] = -100 if batch > 1 else labels[-1]   # one fully ignored row
    return [b[..., :vocab] for b in bufs], labels.to(device), vocab


def _policy_leaf(view, vocab):
    """A leaf with ``view``'s layout (a slice of a padded buffer stays one) and the view the loss reads."""
    leaf = view.detach().clone() if view.is_contiguous() else None
    if leaf is None:  # clone() of a slice would be dense: copy the padded buffer, then slice it again
        leaf = torch.empty(*view.shape[:-1], view.stride(-2), dtype=view.dtype, device=view.device)
        leaf[..., :vocab] = view
    leaf.requires_grad_()
    return leaf, leaf[..., :vocab]


def _row_checks(backend, dtype, V, device, batch, seq):
    problems = []
    logits, labels, vocab = _inputs(V, dtype, device, batch, seq)
    cpu = [z.detach() for z in logits]
    leaf, x = _policy_leaf(logits[0], vocab)
    loss = wk.wspo_loss(x, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3], backend=backend)
    x64 = cpu[0].double().requires_grad_()
    want = reference_wspo_loss(x64, labels, ref=cpu[1], weak_aligned=cpu[2], weak_base=cpu[3])
    low_x = cpu[0].clone().requires_grad_()
    low = reference_wspo_loss(low_x, labels, ref=cpu[1], weak_aligned=cpu[2], weak_base=cpu[3], dtype=dtype)
    (grad,) = torch.autograd.grad(loss, x)
    (want_grad,) = torch.autograd.grad(want, x64)
    (low_grad,) = torch.autograd.grad(low, low_x)
    problems += [_compare("four-logits loss", loss.detach(), want, dtype, loss=True),
                 _compare("four-logits grad", grad, want_grad, dtype, low_grad)]
    frozen = [reference_token_logprobs(z, labels, shift=True).float() for z in cpu[1:]]
    leaf, x = _policy_leaf(logits[0], vocab)
    loss = wk.wspo_loss(x, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    problems += [_compare("precomputed loss", loss.detach(), want, dtype, loss=True),
                 _compare("precomputed grad", grad, want_grad, dtype, low_grad)]
    leaf, x = _policy_leaf(logits[0], vocab)
    lp = wk.token_logprobs(x, labels, shift=True, backend=backend)
    x64 = cpu[0].double().requires_grad_()
    want_lp = reference_token_logprobs(x64, labels, shift=True)
    up = torch.linspace(-1, 1, lp.numel(), device=device, dtype=torch.float64).reshape(lp.shape)
    (grad,) = torch.autograd.grad(lp, x, up.to(lp.dtype))
    (want_grad,) = torch.autograd.grad(want_lp, x64, up)
    low_x = cpu[0].clone().requires_grad_()
    (low_grad,) = torch.autograd.grad(reference_token_logprobs(low_x, labels, shift=True, dtype=dtype), low_x,
                                      up.to(dtype))
    problems += [_compare("token_logprobs", lp, want_lp, dtype, loss=True),
                 _compare("token_logprobs grad", grad, want_grad, dtype, low_grad)]
    delta = wk.weak_log_ratio(logits[2], logits[3], labels, shift=True, backend=backend)
    want_delta = reference_token_logprobs(cpu[2], labels, shift=True) - reference_token_logprobs(cpu[3], labels,
                                                                                                  shift=True)
    problems.append(_compare("weak_log_ratio", delta, want_delta, dtype, loss=True))
    # inplace_grad on views: transposed leading dims, and the (possibly sliced) vocabulary as it lies.
    for view in ("transposed", "as-is"):
        regular = logits[0].detach().clone().requires_grad_()
        want_loss = wk.wspo_loss(regular, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                                 backend=backend)
        (want_g,) = torch.autograd.grad(want_loss, regular)
        leaf, sliced = _policy_leaf(logits[0], vocab)
        if view == "transposed":
            leaf = logits[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
            sliced = leaf
        policy = sliced * 1 if view == "transposed" else (leaf * 1)[..., :vocab]   # a non-leaf, same layout
        got_loss = wk.wspo_loss(policy, labels, ref=logits[1], weak_aligned=logits[2], weak_base=logits[3],
                                inplace_grad=True, backend=backend)
        (got_g,) = torch.autograd.grad(got_loss, leaf)
        got_g = got_g[..., :vocab]
        problems += [_compare(f"inplace {view} loss", got_loss.detach(), want_loss.detach(), torch.float32, loss=True),
                     _compare(f"inplace {view} grad", got_g, want_g, dtype, want_g)]
    return [p for p in problems if p]


def _big_rows_check(backend, device, shape):
    """N * V > 2^31 elements: the last rows of a huge tensor equal the same rows on their own."""
    n, V = shape
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(n, V, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, V, (n,), generator=g).to(device)
    tail = slice(n - 4, n)
    full = wk.token_logprobs(logits, labels, backend=backend)[tail]
    alone = wk.token_logprobs(logits[tail].clone(), labels[tail], backend=backend)
    problem = _compare("N*V > 2^31 token_logprobs (last rows)", full, alone, torch.float32, loss=True)
    frozen = torch.zeros(n, device=device)
    x = logits.requires_grad_()
    one_token_each = torch.arange(n + 1, device=device)  # every row its own sequence: rows are independent
    loss = wk.wspo_loss(x, labels, ref=frozen, weak_aligned=frozen, weak_base=frozen, shift=False, backend=backend,
                        reduction="sum", cu_seqlens=one_token_each)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits[tail].detach().clone().requires_grad_()
    loss_t = wk.wspo_loss(y, labels[tail], ref=frozen[tail], weak_aligned=frozen[tail], weak_base=frozen[tail],
                          shift=False, backend=backend, reduction="sum", cu_seqlens=one_token_each[:5])
    (grad_t,) = torch.autograd.grad(loss_t, y)
    return [p for p in (problem, _compare("N*V > 2^31 grad (last rows)", grad[tail], grad_t, torch.float32,
                                          grad_t)) if p]


@contextlib.contextmanager
def _linear_env(linear):
    """WSPO_KERNELS_LINEAR for one check: the default chunked driver, or Triton's logits-free kernels."""
    before = os.environ.get(ops.LINEAR_ENV_VAR)
    os.environ[ops.LINEAR_ENV_VAR] = linear
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ops.LINEAR_ENV_VAR)
        else:
            os.environ[ops.LINEAR_ENV_VAR] = before


def _linear_check(backend, dtype, device, N, H, V, seed=2, linear="chunked"):
    with _linear_env(linear):
        return _linear_check_in(backend, dtype, device, N, H, V, seed)


def _linear_check_in(backend, dtype, device, N, H, V, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g)).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[: N // 8] = -100
    frozen = [-torch.rand(N - 1, generator=g).to(device) * 5 for _ in range(3)]
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss = wk.linear_wspo_loss(*leaves, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                               backend=backend)
    grads = torch.autograd.grad(loss, leaves)

    def reference(h, w, dt):
        return reference_wspo_loss((h.to(dt) @ w.to(dt).T)[None], labels[None], ref=frozen[0][None],
                                   weak_aligned=frozen[1][None], weak_base=frozen[2][None], dtype=dt)
    r64 = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    want = reference(*r64, torch.float64)
    want_grads = torch.autograd.grad(want, r64)
    low = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    low_grads = torch.autograd.grad(reference(*low, dtype), low) if dtype != torch.float32 else (None, None)
    problems = [_compare(f"linear loss N={N} H={H} V={V}", loss.detach(), want, dtype, loss=True)]
    problems += [_compare(f"linear {name}", got, w, dtype, lw)
                 for name, got, w, lw in zip(("d hidden", "d weight"), grads, want_grads, low_grads)]
    return [p for p in problems if p]


def _graph_check(backend, device):
    """Forward + backward captured in a CUDA graph, then replayed on new inputs copied into the captured
    tensors, equals eager on those inputs (labels checked on the device, no host synchronisation)."""
    logits, labels, _ = _inputs(32001, torch.bfloat16, device, 2, 33)
    new_logits, new_labels, _ = _inputs(32001, torch.bfloat16, device, 2, 33, seed=5)
    x = logits[0].detach().clone().requires_grad_()
    frozen = [z.clone() for z in logits[1:]]

    def step():
        x.grad = None
        loss = wk.wspo_loss(x, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], backend=backend)
        loss.backward()
        return loss
    with torch.no_grad():  # eager on the new inputs, then back to the first ones for the capture
        x.copy_(new_logits[0])
        for f, z in zip(frozen, new_logits[1:]):
            f.copy_(z)
        labels_first = labels.clone()
        labels.copy_(new_labels)
    want = step().detach().clone()
    want_grad = x.grad.clone()
    with torch.no_grad():
        x.copy_(logits[0])
        for f, z in zip(frozen, logits[1:]):
            f.copy_(z)
        labels.copy_(labels_first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = wk.wspo_loss(x, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2], backend=backend)
        loss.backward()
    with torch.no_grad():  # the new inputs, into the captured tensors
        x.copy_(new_logits[0])
        for f, z in zip(frozen, new_logits[1:]):
            f.copy_(z)
        labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    return [p for p in (_compare("graph loss", loss.detach(), want, torch.float32, loss=True),
                        _compare("graph grad", x.grad, want_grad, torch.float32, want_grad)) if p]


def gpu_name(device):
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="small shapes: the script's own check, on any device")
    p.add_argument("--no-perf", action="store_true", help="skip the performance table")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = SMOKE if args.smoke else FULL
    report = Report()
    backends = available_backends(device)
    print(f"wspo-kernels {wk.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f"; torch {torch.__version__}; backends {backends}", flush=True)
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if backend == "triton" and device.type == "cpu" and dtype != torch.float32:
                continue  # the interpreter mishandles bf16
            for V in shapes["vocabs"]:
                report.check(f"rows {backend} {str(dtype)[6:]} V={V}",
                             lambda: _row_checks(backend, dtype, V, device, shapes["batch"], shapes["seq"]))
            for linear in LINEAR_IMPLS.get(backend, ("chunked",)):
                report.check(f"linear blocks {backend}/{linear} {str(dtype)[6:]} N,H,V={shapes['linear_blocks']}",
                             lambda: _linear_check(backend, dtype, device, *shapes["linear_blocks"], linear=linear))
        if device.type == "cuda":
            report.check(f"CUDA graph {backend}", lambda: _graph_check(backend, device))
            torch.cuda.empty_cache()
    # Last: the > 2^31 checks are the likeliest to fault, and a fault leaves the CUDA context unusable.
    for backend in backends:
        if shapes["big_rows"]:
            report.check(f"N*V > 2^31 {backend}", lambda: _big_rows_check(backend, device, shapes["big_rows"]))
        for linear in LINEAR_IMPLS.get(backend, ("chunked",)) if shapes["linear_big"] else ():
            report.check(f"V*H > 2^31 linear {backend}/{linear}",
                         lambda: _linear_check(backend, torch.bfloat16, device, *shapes["linear_big"], linear=linear))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r for r in report.rows if not r["ok"]]
    name = f"gpu_{gpu_name(device)}"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, name + ("_smoke" if args.smoke else "") + "_validate")
    meta = dict(device=str(device), torch=torch.__version__, version=wk.__version__, backends=backends,
                date=time.strftime("%Y-%m-%d"), smoke=args.smoke)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, checks=report.rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"GPU validation ({meta}): {len(report.rows) - len(failed)} of {len(report.rows)} checks passed\n\n"
                "| check | ok | s | problems |\n|---|---|---|---|\n")
        for r in report.rows:
            f.write(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | "
                    f"{'; '.join(p.splitlines()[0] for p in r['problems'])} |\n")
    print(f"\n{len(report.rows) - len(failed)} of {len(report.rows)} checks passed; wrote {stem}.json, {stem}.md")
    if not args.no_perf and device.type == "cuda":
        from wspo_kernels.bench.runner import main as bench
        bench(["--device", str(device), "--repeat", "5", "--cases", ",".join(PERF_CASES), "--out", args.out,
               "--name", name])
        # Padded vs padding-free training step and the precompute pass against a plain forward, bf16.
        import importlib.util
        spec = importlib.util.spec_from_file_location("padding_free", os.path.join(os.path.dirname(__file__),
                                                                                   "padding_free.py"))
        padding_free = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(padding_free)
        padding_free.main(["--device", str(device), "--rows", "256", "--cutoff", "4096", "--steps", "6",
                           "--out", os.path.join(args.out, name + "_padding_free.md")])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
