"""GPU microbenchmarks: the one-pass logits kernel against copy bandwidth, the linear kernels against
Cut Cross-Entropy composed per model.  Times are CUDA-event medians; memory is
``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/bench_gpu.py --out benchmarks/results      # writes gpu_<device>.json / .md
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import wspo_kernels as wk

HERE = os.path.dirname(os.path.abspath(__file__))
LOGITS_SHAPES = [(8192, 32000), (8192, 128256)]
LINEAR_SHAPE = (8192, 4096, 128256)      # N, H, V (the reference shape)
GAMMA = 0.1


def _time(fn, repeat=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth(n_bytes=2 ** 31):
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), repeat=20)
    return 2 * n_bytes / t / 1e9   # read + write


def logits_cases(backends, dtype):
    rows = []
    for n, V in LOGITS_SHAPES:
        labels = torch.randint(0, V, (1, n), device="cuda")
        policy = torch.randn(1, n, V, device="cuda", dtype=dtype, requires_grad=True)
        frozen = [torch.randn(1, n, V, device="cuda", dtype=dtype) for _ in range(3)]
        moved = 5 * n * V * policy.element_size()   # four reads, one gradient write: the floor

        for backend in backends:
            for inplace in (False, True):
                def step():
                    policy.grad = None
                    loss = wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                        gamma=GAMMA, backend=backend, inplace_grad=inplace)
                    loss.backward()
                t = _time(step)
                rows.append(dict(kind="logits", n=n, V=V, impl=f"ours-{backend}" + ("-inplace" if inplace else ""),
                                 seconds=t, gbps=moved / t / 1e9, peak_mb=_peak_mb(step)))

        def official():
            policy.grad = None
            lab = labels[:, 1:]
            lp = [torch.gather(z[:, :-1].float().log_softmax(-1), 2, lab.unsqueeze(-1)).squeeze(-1)
                  for z in (policy, *frozen)]
            d = GAMMA * (lp[0] - lp[1].detach()) - (lp[2] - lp[3]).detach()
            (d * d).mean().backward()
        t = _time(official, repeat=3)
        rows.append(dict(kind="logits", n=n, V=V, impl="official", seconds=t, gbps=moved / t / 1e9,
                         peak_mb=_peak_mb(official)))
        del policy, frozen
        torch.cuda.empty_cache()
    return rows


def linear_cases(dtype):
    n, H, V = LINEAR_SHAPE
    labels = torch.randint(0, V, (1, n), device="cuda")
    hidden = [torch.randn(1, n, H, device="cuda", dtype=dtype) for _ in range(4)]
    weights = [(torch.randn(V, H, device="cuda") / H ** 0.5).to(dtype) for _ in range(4)]
    hidden[0].requires_grad_()
    weights[0].requires_grad_()
    rows = []

    def ours(linear):
        def step():
            hidden[0].grad = weights[0].grad = None
            os.environ["WSPO_KERNELS_LINEAR"] = linear
            wk.linear_wspo_loss(hidden[0], weights[0], labels, gamma=GAMMA, backend="triton",
                                ref=(hidden[1], weights[1]), weak_aligned=(hidden[2], weights[2]),
                                weak_base=(hidden[3], weights[3])).backward()
        return step

    cases = {"ours-triton-fused": ours("fused"), "ours-triton-chunked": ours("chunked")}
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            hidden[0].grad = weights[0].grad = None
            lp = []
            for i, (h, w) in enumerate(zip(hidden, weights)):
                with torch.set_grad_enabled(i == 0):
                    lp.append(-linear_cross_entropy(h, w, labels, reduction="none", shift=1))
            d = GAMMA * (lp[0] - lp[1]) - (lp[2] - lp[3])
            (d * d).mean().backward()
        cases["cce-composed"] = cce
    except ImportError as exc:
        rows.append(dict(kind="linear", impl="cce-composed", skipped=f"cut_cross_entropy not installed ({exc})"))
    flops = (6 + 3 * 2) * n * H * V   # policy: logits, dH, dW; frozen: one GEMM each
    for name, fn in cases.items():
        t = _time(fn, repeat=5)
        rows.append(dict(kind="linear", n=n, H=H, V=V, impl=name, seconds=t, tflops=flops / t / 1e12,
                         peak_mb=_peak_mb(fn)))
    return rows


def markdown(info, rows):
    out = [f"GPU: {info['gpu']}; torch {info['torch']}, triton {info['triton']}; copy bandwidth "
           f"{info['copy_gbps']:.0f} GB/s (read+write)", "",
           "| kind | shape | impl | ms | achieved | % of copy bw | peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['kind']} | | {r['impl']} | skipped: {r['skipped']} | | | |")
            continue
        shape = f"{r['n']}x{r['V']}" if r["kind"] == "logits" else f"{r['n']}x{r['H']}x{r['V']}"
        rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['tflops']:.1f} TFLOP/s"
        pct = f"{100 * r['gbps'] / info['copy_gbps']:.0f}%" if "gbps" in r else "-"
        out.append(f"| {r['kind']} | {shape} | {r['impl']} | {1e3 * r['seconds']:.2f} | {rate} | {pct} | "
                   f"{r['peak_mb']:.0f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    import triton
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit.strip(), copy_gbps=copy_bandwidth())
    backends = []
    for b in ("triton", "native"):
        try:
            wk.select_backend(b, torch.device("cuda"), dtype)
            backends.append(b)
        except RuntimeError as exc:
            print(f"# backend {b} skipped: {exc}", file=sys.stderr)
    rows = logits_cases(backends, dtype) + linear_cases(dtype)
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_" + info["gpu"].replace(" ", "_").lower()
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    table = markdown(info, rows)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
