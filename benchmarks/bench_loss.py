"""Forward+backward time and peak extra memory of the WSPO loss, each case in its own process.

    python benchmarks/bench_loss.py                       # the core cases, fp32
    python benchmarks/bench_loss.py --dtype bf16 --cases logits:4096x32000 --impls official,ours-torch

Peak extra memory is the resident-set high-water mark (VmHWM) above the resident set once the inputs
exist and one warm-up step has run (so lazily imported code is not counted; the warm-up's gradients
are dropped first): the child then resets the mark (``/proc/self/clear_refs``).  Time is the median
of ``--repeat`` runs after the warm-up.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = ["logits:4096x32000", "linear:2048x512x32000"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(case, impl, dtype_name, repeat, seqs):
    """In the child: build inputs, time the implementation, print one JSON line."""
    import torch
    sys.path.insert(0, HERE)
    import impls

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[dtype_name])
    kind, dims = case.split(":")
    sizes = [int(x) for x in dims.split("x")]
    n_tokens = sizes[0]
    B, T = seqs, n_tokens // seqs
    labels = torch.randint(0, sizes[-1], (B, T))
    labels[:, : T // 8] = -100  # prompt tokens
    if kind == "logits":
        V = sizes[1]
        policy = torch.randn(B, T, V, dtype=dtype).requires_grad_()
        frozen = [torch.randn(B, T, V, dtype=dtype) for _ in range(3)]
        step = impls.LOGITS_IMPLS[impl](policy, frozen, labels)
        params = [policy]
    else:
        H, V = sizes[1], sizes[2]
        hidden = [torch.randn(B, T, H, dtype=dtype) for _ in range(4)]
        weights = [(torch.randn(V, H) / H ** 0.5).to(dtype) for _ in range(4)]
        hidden[0].requires_grad_()
        weights[0].requires_grad_()
        step = impls.LINEAR_IMPLS[impl](hidden, weights, labels)
        params = [hidden[0], weights[0]]
    step()  # warm-up
    for p in params:
        p.grad = None
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    times = []
    for i in range(repeat):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kb = _status_kb("VmHWM")
    print(json.dumps({"case": case, "impl": impl, "dtype": dtype_name, "threads": torch.get_num_threads(),
                      "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                      "peak_extra_mb": (peak_kb - base_kb) / 1024}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma list of logits:NxV or linear:NxHxV (N tokens, in --seqs sequences)")
    p.add_argument("--impls", default=None, help="comma list (default: all for the case kind)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seqs", type=int, default=4, help="sequences the N tokens are split into")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_one(args.child[0], args.child[1], args.dtype, args.repeat, args.seqs)
    sys.path.insert(0, HERE)
    import impls
    rows = []
    for case in args.cases.split(","):
        table = impls.LOGITS_IMPLS if case.startswith("logits") else impls.LINEAR_IMPLS
        names = args.impls.split(",") if args.impls else list(table)
        for impl in [n for n in names if n in table]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", case, impl, "--dtype", args.dtype,
                   "--repeat", str(args.repeat), "--seqs", str(args.seqs)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"case": case, "impl": impl, "dtype": args.dtype, "skipped": reason})
                print(f"# {case} {impl}: skipped ({reason})", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def markdown(rows):
    lines = ["| case | dtype | impl | median s (min-max) | vs official | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    official = {(r["case"], r["dtype"]): r for r in rows if r["impl"] == "official" and "median_s" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | |")
            continue
        base = official.get((r["case"], r["dtype"]))
        ratio = f"{base['median_s'] / r['median_s']:.2f}x faster" if base else "-"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['median_s']:.3f} "
                     f"({r['min_s']:.3f}-{r['max_s']:.3f}) | {ratio} | {r['peak_extra_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
