"""Kernel-only timings of the native CPU kernels against their floors, every kernel copy this CPU runs.

    python benchmarks/native_kernels.py                # [4096, 32000], a quarter of the rows ignored
    python benchmarks/native_kernels.py --rows 1024 --vocab 152064 --copies avx512,avx2

No autograd, no label checks, no allocation in the timed call (the gradient buffer is reused): what the
row kernels themselves cost.  Interleaved: every round times each (copy, dtype, kernel) once, in an
order rotated from round to round, and measures the floors once, so a machine that slows down for a
while moves the kernels and their floors together.  Each kernel is reported as the median over rounds
of its per-round fraction of

- the exp floor: the exps it needs (one per element of every counted row it reads: 4 for wspo_four,
  1 for wspo_rows and logprobs) over the rate of the copy's own vector exp, on every thread;
- the memory floor: the bytes it must move (the counted rows of every model it reads, the whole gradient
  it writes) over the copy bandwidth (read + write bytes per second);
- the binding floor, max(exp floor, memory floor): the best this CPU allows,

with the interquartile range over the rounds.
"""
import argparse
import statistics
import time

import torch

from wspo_kernels.backends import native
from wspo_kernels.bench.runner import machine_identity, quartiles

KERNELS = ("logprobs", "wspo_four", "wspo_rows")
READS = {"logprobs": 1, "wspo_four": 4, "wspo_rows": 1}   # models whose counted rows are read
EXPS = {"logprobs": 1, "wspo_four": 4, "wspo_rows": 1}    # exps per counted element
WRITES = {"logprobs": False, "wspo_four": True, "wspo_rows": True}   # a gradient of every row


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _copy_gbps(src, dst):
    dst.copy_(src)
    return 2 * src.numel() / min(_seconds(lambda: dst.copy_(src)) for _ in range(2)) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--copies", default=None, help="comma list of kernel copies (default: every one this CPU runs)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ab", action="store_true",
                   help="also time wspo_four / wspo_rows with the pipelined gradient sweep off, in the same rounds")
    args = p.parse_args(argv)
    ext = native._module("cpu")
    if isinstance(ext, str):
        raise SystemExit(f"native CPU kernels unavailable: {ext}")
    g = torch.Generator().manual_seed(0)
    n, v = args.rows, args.vocab
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    counted = int((labels != -100).sum())
    weight, k = torch.rand(n, generator=g), torch.randn(n, generator=g)
    chosen = ext.capability()
    copies = args.copies.split(",") if args.copies else list(ext.available_capabilities())
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    x = {d: [(torch.randn(n, v, generator=g) * 3).to(d) for _ in range(4)] for d in dtypes}
    grad = {d: torch.empty(n, v, dtype=d) for d in dtypes}
    calls = {
        "logprobs": lambda d: ext.logprobs(x[d][0], labels, -100),
        "wspo_four": lambda d: ext.wspo_four(x[d][0], x[d][1], x[d][2], x[d][3], labels, weight, 0.5, -100, grad[d]),
        "wspo_rows": lambda d: ext.wspo_rows(x[d][0], labels, k, weight, 0.5, -100, grad[d]),
    }
    kernels = list(KERNELS)
    if args.ab:  # the same kernels with each row's gradient sweep run after its statistics, not during the next
        for kern in ("wspo_four", "wspo_rows"):
            name = f"{kern} unpipelined"
            kernels.append(name)
            READS[name], EXPS[name], WRITES[name] = READS[kern], EXPS[kern], WRITES[kern]
            calls[name] = (lambda call: lambda d: (ext.set_pipelined(False), call(d), ext.set_pipelined(True)))(
                calls[kern])
    src = torch.empty(2 ** 28, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    jobs = [(cap, d, kern) for cap in copies for d in dtypes for kern in kernels]
    times = {job: [] for job in jobs}
    exp_gps = {cap: [] for cap in copies}
    copy_gbps = []
    try:
        for cap in copies:  # warm-up: each copy's code paged in, each gradient buffer touched
            ext.use_capability(cap)
            for d in dtypes:
                for kern in kernels:
                    calls[kern](d)
        for r in range(args.rounds):
            copy_gbps.append(_copy_gbps(src, dst))
            for cap in copies[r % len(copies):] + copies[:r % len(copies)]:
                ext.use_capability(cap)
                exp_gps[cap].append(ext.exp_rate(20000))
                order = [job for job in jobs if job[0] == cap]
                for job in order[r % len(order):] + order[:r % len(order)]:
                    times[job].append(_seconds(lambda: calls[job[2]](job[1])))
    finally:
        ext.use_capability(chosen)

    ident = machine_identity("cpu")
    print(f"{ident['cpu']}, {ident['threads']} threads, torch {torch.__version__}; [{n}, {v}], {counted} rows counted; "
          f"interleaved, {args.rounds} rounds: median of per-round values (interquartile range); copy bandwidth "
          f"{statistics.median(copy_gbps):.1f} GB/s")
    print()
    print("| copy (ISA) | dtype | kernel | % of binding floor | % of exp floor | % of memory floor | median s | exp G/s |")
    print("|---|---|---|---|---|---|---|---|")
    for cap, d, kern in jobs:
        ts = times[(cap, d, kern)]
        elem = torch.tensor([], dtype=d).element_size()
        moved = (READS[kern] * counted + (n if WRITES[kern] else 0)) * v * elem
        exp_f = [EXPS[kern] * counted * v / (exp_gps[cap][r] * 1e9) / ts[r] for r in range(len(ts))]
        mem_f = [moved / (copy_gbps[r] * 1e9) / ts[r] for r in range(len(ts))]
        bind_f = [max(a, b) for a, b in zip(exp_f, mem_f)]
        cells = []
        for values in (bind_f, exp_f, mem_f):
            med, q1, q3 = quartiles(values)
            cells.append(f"{100 * med:.0f}% ({100 * q1:.0f}-{100 * q3:.0f})")
        ext.use_capability(cap)
        variant = ext.exp_variant()
        print(f"| {cap} ({variant}) | {str(d)[6:]} | {kern} | {' | '.join(cells)} | {statistics.median(ts):.4f} | "
              f"{statistics.median(exp_gps[cap]):.2f} |")
    ext.use_capability(chosen)


if __name__ == "__main__":
    main()
