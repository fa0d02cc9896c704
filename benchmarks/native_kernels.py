"""Kernel-only timings of the native CPU kernels, every kernel copy this CPU runs, on prepared tensors.

    python benchmarks/native_kernels.py                # [4096, 32000], a quarter of the rows ignored
    python benchmarks/native_kernels.py --rows 1024 --vocab 152064

No autograd, no label checks, no allocation in the timed call (the gradient buffer is reused): what the
row kernels themselves cost, next to the exp rate of the copy's vector exp (the floor the kernels are
measured against in the benchmark tables).  Median of --repeat calls after one warm-up.
"""
import argparse
import statistics
import time

import torch

from wspo_kernels.backends import native


def _median_s(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=11)
    args = p.parse_args(argv)
    ext = native._module("cpu")
    if isinstance(ext, str):
        raise SystemExit(f"native CPU kernels unavailable: {ext}")
    g = torch.Generator().manual_seed(0)
    n, v = args.rows, args.vocab
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    weight, k = torch.rand(n, generator=g), torch.randn(n, generator=g)
    chosen = ext.capability()
    print(f"[{n}, {v}], {int((labels != -100).sum())} rows counted, {torch.get_num_threads()} threads")
    print("| copy | dtype | exp G/s | logprobs s | wspo_four s | wspo_rows s |")
    print("|---|---|---|---|---|---|")
    try:
        for cap in ext.available_capabilities():
            ext.use_capability(cap)
            rate = ext.exp_rate(20000)
            for dtype in (torch.float32, torch.bfloat16):
                x = [(torch.randn(n, v, generator=g) * 3).to(dtype) for _ in range(4)]
                grad = torch.empty(n, v, dtype=dtype)
                t_lp = _median_s(lambda: ext.logprobs(x[0], labels, -100), args.repeat)
                t_four = _median_s(lambda: ext.wspo_four(x[0], x[1], x[2], x[3], labels, weight, 0.5, -100, grad),
                                   args.repeat)
                t_rows = _median_s(lambda: ext.wspo_rows(x[0], labels, k, weight, 0.5, -100, grad), args.repeat)
                print(f"| {cap} ({ext.exp_variant()}) | {str(dtype)[6:]} | {rate:.2f} | {t_lp:.4f} | {t_four:.4f} "
                      f"| {t_rows:.4f} |", flush=True)
    finally:
        ext.use_capability(chosen)


if __name__ == "__main__":
    main()
