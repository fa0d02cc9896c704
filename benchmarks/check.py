"""Regression check: a fresh quick run against the committed one, by speed-up ratios (not seconds).

    python benchmarks/check.py                   # runs `wspo-kernels bench --quick` into a temp dir
    python benchmarks/check.py --fresh run.json  # or compares an existing run

For every (case, ours-* implementation) present in both, the speed-up over the official formulation
measured in the same run must not drop by more than --margin (default 30%: shared 2-core machines
are noisy).  Peak extra memory must not grow by more than --memory-margin MiB.  Exit status 1 on a
regression.  Not part of the test suite.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "results", "bench_cpu_quick.json")


def compare(baseline, fresh, margin, memory_margin):
    old = {(r["case"], r["impl"]): r for r in baseline["rows"] if "median_s" in r}
    failures, lines = [], []
    for r in fresh["rows"]:
        key = (r["case"], r["impl"])
        if not r["impl"].startswith("ours-") or "median_s" not in r or key not in old or not r.get("vs_official"):
            continue
        before, now = old[key]["vs_official"], r["vs_official"]
        mem_before, mem_now = old[key]["peak_extra_mib"], r["peak_extra_mib"]
        ok = now >= before * (1 - margin) and mem_now <= mem_before + memory_margin
        lines.append(f"{'ok  ' if ok else 'FAIL'} {r['case']:<28} {r['impl']:<26} speed-up {before:.2f}x -> {now:.2f}x, "
                     f"memory {mem_before:.0f} -> {mem_now:.0f} MiB")
        if not ok:
            failures.append(key)
    return failures, lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--fresh", default=None, help="a bench JSON to compare (default: run the quick preset now)")
    p.add_argument("--margin", type=float, default=0.30)
    p.add_argument("--memory-margin", type=float, default=32.0)
    args = p.parse_args(argv)
    with open(args.baseline) as f:
        baseline = json.load(f)
    fresh_path = args.fresh
    if fresh_path is None:
        out = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "wspo_kernels", "bench", "--quick", "--out", out, "--name", "fresh"],
                       check=True)
        fresh_path = os.path.join(out, "fresh.json")
    with open(fresh_path) as f:
        fresh = json.load(f)
    failures, lines = compare(baseline, fresh, args.margin, args.memory_margin)
    print("\n".join(lines))
    if not lines:
        print("nothing to compare: no common (case, implementation) rows")
        return 1
    print(f"{len(failures)} regression(s) beyond {args.margin:.0%} speed-up / {args.memory_margin:.0f} MiB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
