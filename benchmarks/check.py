"""Performance regression check against this machine class's own baseline.

    python benchmarks/check.py                    # a fresh `wspo-kernels bench --quick` (interleaved) vs the baseline
    python benchmarks/check.py --record           # the same run, written as this machine class's baseline
    python benchmarks/check.py --fresh run.json   # compare a run made earlier (interleaved)

Baselines live in ``benchmarks/results/baselines/<machine key>.json`` (``runner.machine_key``: the GPU's
name, or the CPU instruction set the kernels ran with + the CPU model + threads): numbers measured on one
class of machine are never held against another.  On a machine with no baseline the check says so and
exits with EXIT_NO_BASELINE (3): not a pass, not a regression; ``--record`` makes one.

What is compared, for every (case, ours-* implementation) in both runs: the fraction of each floor it
reaches (exp floor, memory floor or bare GEMMs) and its speed-up over the best peer, each the median of
per-round values from an interleaved run, never seconds (a machine's speed drifts; ratios measured in the
same rounds do not) and never the ratio to the official formulation (its time is mostly page faults).  A
value fails when it drops below the baseline by more than its margin, and the margin comes from the spread
the two runs measured: SPREAD_FACTOR x (relative interquartile range of the baseline + of the fresh run),
at least MIN_MARGIN; one wider than NOISY_MARGIN is reported as too noisy to judge (``??``), not as a
pass.  Peak memory (a fresh process per implementation) fails when it grows by more than
SPREAD_FACTOR x (the step-to-step spread of both runs), at least max(MIN_MEMORY_MIB, MIN_MEMORY_SHARE of
the baseline).  Exit status 1 on a regression.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from wspo_kernels.bench.runner import machine_key

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINES = os.path.join(HERE, "results", "baselines")
EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_NO_BASELINE = 0, 1, 2, 3
SPREAD_FACTOR = 2.0
MIN_MARGIN = 0.05
NOISY_MARGIN = 0.5   # a margin wider than this judges nothing: reported as too noisy, not as a pass
MIN_MEMORY_MIB, MIN_MEMORY_SHARE = 4.0, 0.02
METRICS = (("exp_floor_fraction", "% of exp floor"), ("limit_fraction", "% of floor"),
           ("vs_best_peer", "x best peer"))


def _relative_spread(row, metric):
    q1, q3 = row.get("iqr", {}).get(metric, (row[metric], row[metric]))
    return (q3 - q1) / row[metric] if row[metric] else 0.0


def compare(baseline, fresh):
    """(failures, report lines) of ``fresh`` against ``baseline`` (both bench JSON dicts)."""
    old = {(r["case"], r["impl"]): r for r in baseline["rows"] if "median_s" in r}
    failures, noisy, lines = [], [], []
    for r in fresh["rows"]:
        key = (r["case"], r["impl"])
        if not r["impl"].startswith("ours-") or "median_s" not in r or key not in old:
            continue
        before = old[key]
        for metric, label in METRICS:
            if before.get(metric) is None or r.get(metric) is None:
                continue
            margin = max(MIN_MARGIN, SPREAD_FACTOR * (_relative_spread(before, metric) + _relative_spread(r, metric)))
            ok = r[metric] >= before[metric] * (1 - margin)
            status = "ok  " if ok and margin <= NOISY_MARGIN else "FAIL" if not ok else "??  "
            lines.append(f"{status} {r['case']:<28} {r['impl']:<26} {label:<15} "
                         f"{before[metric]:.3f} -> {r[metric]:.3f} (margin {margin:.0%})")
            if not ok:
                failures.append((*key, metric))
            elif margin > NOISY_MARGIN:
                noisy.append((*key, metric))
        if before.get("peak_extra_mib") is not None and r.get("peak_extra_mib") is not None:
            spread = (before.get("peak_spread_mib") or 0.0) + (r.get("peak_spread_mib") or 0.0)
            margin = max(MIN_MEMORY_MIB, MIN_MEMORY_SHARE * before["peak_extra_mib"], SPREAD_FACTOR * spread)
            ok = r["peak_extra_mib"] <= before["peak_extra_mib"] + margin
            lines.append(f"{'ok  ' if ok else 'FAIL'} {r['case']:<28} {r['impl']:<26} {'peak MiB':<15} "
                         f"{before['peak_extra_mib']:.0f} -> {r['peak_extra_mib']:.0f} (margin {margin:.0f} MiB)")
            if not ok:
                failures.append((*key, "peak_extra_mib"))
    return failures, noisy, lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", default=None, help="a bench JSON to compare (default: run the quick preset now)")
    p.add_argument("--record", action="store_true", help="write the run as this machine class's baseline")
    p.add_argument("--baselines", default=BASELINES, help="the baselines' directory")
    p.add_argument("--machine-key", default=None, help="compare against this class instead of the run's own")
    p.add_argument("--bench-args", default="--quick", help="arguments of the fresh `wspo-kernels bench` run")
    args = p.parse_args(argv)
    fresh_path = args.fresh
    if fresh_path is None:
        out = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "wspo_kernels", "bench", *args.bench_args.split(), "--out", out,
                        "--name", "fresh"], check=True)
        fresh_path = os.path.join(out, "fresh.json")
    with open(fresh_path) as f:
        fresh = json.load(f)
    if fresh["info"].get("timing") != "interleaved":
        print(f"{fresh_path} was not timed interleaved (wspo-kernels bench --timing interleaved): its ratios carry "
              "the drift between processes and have no spread to derive margins from", file=sys.stderr)
        return EXIT_USAGE
    key = args.machine_key or machine_key(fresh["info"])
    path = os.path.join(args.baselines, f"{key}.json")
    if args.record:
        os.makedirs(args.baselines, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(fresh, f, indent=1)
        os.replace(tmp, path)
        print(f"recorded the baseline of machine class {key}: {path}")
        return EXIT_OK
    if not os.path.exists(path):
        print(f"no baseline for machine class {key} (looked for {path}): nothing to compare against. "
              f"Record one on this machine with: python benchmarks/check.py --record")
        return EXIT_NO_BASELINE
    with open(path) as f:
        baseline = json.load(f)
    failures, noisy, lines = compare(baseline, fresh)
    print(f"machine class {key}; baseline {path} (commit {baseline['info'].get('commit')}), "
          f"fresh run commit {fresh['info'].get('commit')}")
    print("\n".join(lines))
    if not lines:
        print("nothing to compare: no common (case, implementation) rows")
        return EXIT_REGRESSION
    print(f"{len(failures)} regression(s)")
    if noisy:
        print(f"{len(noisy)} comparison(s) marked ?? were too noisy to judge (margin above {NOISY_MARGIN:.0%}): "
              "rerun with more rounds, e.g. --bench-args '--quick --repeat 9'")
    return EXIT_REGRESSION if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
