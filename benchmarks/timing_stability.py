"""How much a reported ratio moves from one `wspo-kernels bench` invocation to the next, per timing mode.

    python benchmarks/timing_stability.py                       # 3 invocations per mode, the case below
    python benchmarks/timing_stability.py --runs 3 --case logits:4096x32000:fp32 --out benchmarks/results/timing_stability.md

Runs the same case ``--runs`` times with ``--timing separate`` (each implementation in its own process,
ratios of medians) and ``--runs`` times with ``--timing interleaved`` (one process, round-robin, medians
of per-round ratios), alternating the modes so both see the same machine states, and reports for each
ratio its value in every invocation and its spread across them: (max - min) / median.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from wspo_kernels.bench.runner import machine_identity

METRICS = (("vs_official", "x official"), ("vs_best_peer", "x best peer"), ("exp_floor_fraction", "% of exp floor"),
           ("limit_fraction", "% of memory floor"))


def one_run(case, impls, timing, repeat, out):
    name = f"{timing}"
    subprocess.run([sys.executable, "-m", "wspo_kernels", "bench", "--cases", case, "--impls", impls, "--timing", timing,
                    "--repeat", str(repeat), "--out", out, "--name", name], check=True, capture_output=True)
    with open(os.path.join(out, name + ".json")) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="logits:4096x32000:fp32")
    p.add_argument("--impls", default="official,trl,ours-native,ours-native-precomputed")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    values = {}   # (mode, impl, metric) -> [value per invocation]
    for run in range(args.runs):
        for timing in ("separate", "interleaved"):
            with tempfile.TemporaryDirectory() as tmp:
                result = one_run(args.case, args.impls, timing, args.repeat, tmp)
            for row in result["rows"]:
                for metric, _ in METRICS:
                    if row.get(metric) is not None and row["impl"].startswith("ours-"):
                        values.setdefault((timing, row["impl"], metric), []).append(row[metric])
            print(f"run {run + 1}/{args.runs} {timing}: done", file=sys.stderr, flush=True)
    ident = machine_identity("cpu")
    lines = [f"{ident['cpu']} ({ident.get('cpu_isa')}, {ident['threads']} threads); `python benchmarks/timing_stability.py "
             f"--case {args.case} --runs {args.runs} --repeat {args.repeat}`; spread = (max - min) / median over "
             "the invocations", "",
             "| impl | ratio | separate: per invocation | separate spread | interleaved: per invocation "
             "| interleaved spread |", "|---|---|---|---|---|---|"]
    for impl in args.impls.split(","):
        for metric, label in METRICS:
            cells = []
            for timing in ("separate", "interleaved"):
                v = values.get((timing, impl, metric))
                if not v:
                    cells += ["-", "-"]
                    continue
                fmt = (lambda x: f"{100 * x:.0f}%") if "fraction" in metric else (lambda x: f"{x:.2f}x")
                cells += [", ".join(fmt(x) for x in v), f"{(max(v) - min(v)) / statistics.median(v):.1%}"]
            if cells[0] != "-" or cells[2] != "-":
                lines.append(f"| {impl} | {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
