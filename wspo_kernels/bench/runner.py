"""``wspo-kernels bench``: every implementation on every case, each case in its own process.

    wspo-kernels bench --quick                    # a laptop-sized CPU sweep (a few minutes on 2 cores)
    wspo-kernels bench --device cuda              # the full sweep on a GPU
    wspo-kernels bench --cases logits:4096x32000:fp32 --impls official,ours-native

Per case and implementation: median / min / max time of forward+backward (forward only for the
``logps`` kind: one frozen model's per-token logps), the speed-up over the official formulation and
over the best peer, the peak extra memory (CPU: VmHWM above the resident set after the inputs and one
warm-up step, in a fresh process; GPU: max_memory_allocated above the same point), and the fraction
of the physical limit reached: bytes / measured copy bandwidth for logits (the WSPO floor is four
reads and one gradient write), the time of the bare GEMMs the algorithm needs for the linear form
(policy: logits, dH and dW, each frozen model: logits; each timed once, over the counted rows, into a
preallocated output), for the native CPU kernels the fraction of the exp floor (the exps
their algorithm needs over the measured rate of the vector exp they use), and for logits the elements
read per second (G elem/s).  Writes JSON (with machine info), a Markdown table and PNG plots.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from .._memory import peak_extra_mib, start_window
from . import impls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 512        # tokens per sequence; N tokens make N / SEQ_LEN sequences
PRESETS = {
    "quick": ["logits:1024x32000:fp32", "logits:2048x32000:fp32", "logits:1024x32000:bf16",
              "linear:1024x512x32000:fp32", "linear:2048x512x32000:fp32", "logps:2048x32000:fp32"],
    "full-cpu": [f"logits:{n}x{v}:{d}" for d in ("fp32", "bf16") for v in (32000, 152064) for n in (1024, 4096)]
    + [f"linear:{n}x{h}x{v}:fp32" for h in (512, 4096) for v in (32000, 128256) for n in (1024, 4096)]
    + ["logps:4096x32000:fp32", "logps:4096x152064:bf16"],
    "full-gpu": [f"logits:{n}x{v}:{d}" for d in ("bf16", "fp32") for v in (32000, 128256, 152064)
                 for n in (1024, 4096, 16384)]
    + [f"linear:{n}x{h}x{v}:{d}" for d in ("bf16", "fp32") for h in (512, 4096) for v in (32000, 128256, 152064)
       for n in (1024, 4096, 16384)] + ["linear:8192x4096x128256:bf16"]
    + [f"logps:{n}x{v}:bf16" for v in (32000, 152064) for n in (4096, 16384)],
}


def parse_case(spec):
    kind, dims, dtype = spec.split(":")
    sizes = [int(s) for s in dims.split("x")]
    if kind == "linear":
        return dict(kind=kind, n=sizes[0], h=sizes[1], v=sizes[2], dtype=dtype)
    return dict(kind=kind, n=sizes[0], v=sizes[1], dtype=dtype)


def case_name(c):
    dims = f"{c['n']}x{c['h']}x{c['v']}" if c["kind"] == "linear" else f"{c['n']}x{c['v']}"
    return f"{c['kind']}:{dims}:{c['dtype']}"


def input_bytes(c, impl="official"):
    """Rough resident size of a case's inputs plus an implementation's temporaries (fp32 logits for peers)."""
    elem = DTYPES[c["dtype"]].itemsize
    temps = (1 * elem if impl.startswith("ours-") else 3 * 4) * c["n"] * c["v"]
    if c["kind"] == "linear":
        return 4 * c["v"] * c["h"] * elem + 4 * c["n"] * c["h"] * elem + temps
    return 4 * c["n"] * c["v"] * elem + temps


def make_inputs(c, device):
    torch.manual_seed(0)
    dtype = DTYPES[c["dtype"]]
    B = max(1, c["n"] // SEQ_LEN)
    T = c["n"] // B
    labels = torch.randint(0, c["v"], (B, T), device=device)
    labels[:, : T // 8] = impls.IGNORE  # prompt tokens
    x = dict(labels=labels)
    if c["kind"] == "linear":
        x["hidden"] = [torch.randn(B, T, c["h"], device=device, dtype=dtype) for _ in range(4)]
        x["weights"] = [(torch.randn(c["v"], c["h"], device=device) / c["h"] ** 0.5).to(dtype) for _ in range(4)]
        x["hidden"][0].requires_grad_()
        x["weights"][0].requires_grad_()
        x["params"] = [x["hidden"][0], x["weights"][0]]
    else:
        x["policy"] = torch.randn(B, T, c["v"], device=device, dtype=dtype).requires_grad_()
        x["frozen"] = [torch.randn(B, T, c["v"], device=device, dtype=dtype) for _ in range(3)]
        x["params"] = [x["policy"]]
    return x


# ---------------------------------------------------------------------------------------------- one case
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(c, impl, device, repeat):
    """In a fresh process: build inputs, one warm-up step, then time ``repeat`` steps and the peak."""
    device = torch.device(device)
    x = make_inputs(c, device)
    step = impls.IMPLS[c["kind"]][impl](x)

    def one():
        for p in x["params"]:
            p.grad = None
        t0 = time.perf_counter()
        step()
        _sync(device)
        return time.perf_counter() - t0

    one()
    for p in x["params"]:
        p.grad = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = start_window()
    times = [one() for _ in range(repeat)]
    peak = ((torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda"
            else peak_extra_mib(base))
    return dict(case=case_name(c), impl=impl, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                peak_extra_mib=peak)


# ---------------------------------------------------------------------------------------------- machine
def _time_best(fn, device, repeat=5):
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def machine_info(device):
    """Versions, hardware, and the physical rates measured now: copy bandwidth and the native exp rate
    (the bare GEMMs of the linear cases are measured by ``run``)."""
    device = torch.device(device)
    info = dict(device=device.type, torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:  # the ISA every CPU table names: torch's kernels and the native kernel copy that ran
        from ..backends import native
        info["isa"] = f"torch {torch.backends.cpu.get_cpu_capability()}, native {native.capability() or 'unavailable'}"
        module = native._module("cpu")
        if not isinstance(module, str):  # the exp floor: G exp/s of that copy's vector exp, every thread
            info["isa"] += f" (exp: {module.exp_variant()})"
            module.exp_rate(2000)
            info["exp_gps"] = max(module.exp_rate(20000) for _ in range(3))
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    info["commit"] = commit.stdout.strip() or None
    n_bytes = (2 ** 30 if device.type == "cuda" else 2 ** 28)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    info["copy_gbps"] = 2 * n_bytes / _time_best(lambda: dst.copy_(src), device) / 1e9   # read + write
    info["gemm_s"] = {}   # the bare GEMMs of each linear case, filled by run()
    return info


GEMMS = ("logits", "dh", "dw")


def gemm_seconds(c, device):
    """The bare GEMMs of a linear case over its counted rows M, in the case's dtype, seconds each:
    logits [M, H] @ [H, V], dH [M, V] @ [V, H], dW [V, M] @ [M, H].  Each writes into an output allocated
    once (a fresh M x V result would add its page faults on the CPU to the floor)."""
    dt = DTYPES[c["dtype"]]
    m, h, v = counted_rows(c), c["h"], c["v"]
    hidden, weight = torch.randn(m, h, device=device, dtype=dt), torch.randn(v, h, device=device, dtype=dt)
    g = torch.randn(m, v, device=device, dtype=dt)
    z, dh, dw = torch.empty_like(g), torch.empty_like(hidden), torch.empty_like(weight)
    gemm = dict(logits=lambda: torch.mm(hidden, weight.t(), out=z), dh=lambda: torch.mm(g, weight, out=dh),
                dw=lambda: torch.mm(g.t(), hidden, out=dw))
    seconds = {k: _time_best(gemm[k], device, repeat=3) for k in GEMMS}
    del gemm, hidden, weight, g, z, dh, dw
    if device.type == "cuda":   # give the children, which measure the implementations, the memory back
        torch.cuda.empty_cache()
    return seconds


def gemm_summary(info):
    """'case: logits / dH / dW GFLOP/s' of every linear case measured."""
    parts = []
    for name, secs in info.get("gemm_s", {}).items():
        c = parse_case(name)
        flops = 2 * counted_rows(c) * c["h"] * c["v"]
        parts.append(f"{name} " + " / ".join(f"{flops / secs[k] / 1e9:.0f}" for k in GEMMS))
    return "bare GEMMs (logits / dH / dW GFLOP/s): " + (", ".join(parts) or "none")


def exp_floor_seconds(c, impl, info):
    """The native kernels' exp floor: the exps their algorithm needs over the measured exp rate, or None.

    Per counted position: one exp per model read for the statistics, and none more for the policy's
    gradient (its exps are kept and rescaled): four logits 4, precomputed frozen logps 1, logps 1.
    """
    if not impl.startswith("ours-native") or c["kind"] == "linear" or not info.get("exp_gps"):
        return None
    per_position = 1 if c["kind"] == "logps" or impl.endswith("-precomputed") else 4
    return per_position * counted_rows(c) * c["v"] / (info["exp_gps"] * 1e9)


def counted_rows(c):
    """Rows with a label: make_inputs makes the first T // 8 labels a prompt; shifted, row t scores label
    t + 1 (label 0 is never a target), so T - max(1, T // 8) rows per sequence."""
    B = max(1, c["n"] // SEQ_LEN)
    T = c["n"] // B
    return B * (T - max(1, T // 8))


def floor_seconds(c, impl, info):
    """The physical limit of the problem this implementation solves."""
    precomputed = impl.endswith("-precomputed")
    if c["kind"] == "linear":   # the GEMMs of the counted rows (an ignored row needs none)
        secs = info["gemm_s"][case_name(c)]
        return (1 if precomputed else 4) * secs["logits"] + secs["dh"] + secs["dw"]
    elem = DTYPES[c["dtype"]].itemsize
    passes = 1 if c["kind"] == "logps" else (2 if precomputed else 5)   # reads + the gradient write
    return passes * c["n"] * c["v"] * elem / (info["copy_gbps"] * 1e9)


# ---------------------------------------------------------------------------------------------- sweep
def run(cases, impl_names, device, repeat, log=print):
    device = torch.device(device)
    mem_limit = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    info = machine_info(device)
    for c in cases:
        if c["kind"] == "linear" and input_bytes(c) <= 0.6 * mem_limit:
            info["gemm_s"][case_name(c)] = gemm_seconds(c, device)
    log(f"# {info.get('gpu') or info['cpu']}: copy {info['copy_gbps']:.1f} GB/s; {gemm_summary(info)}")
    rows = []
    for c in cases:
        for impl in impl_names or list(impls.IMPLS[c["kind"]]):
            if impl not in impls.IMPLS[c["kind"]]:
                continue
            reason = impls.available(impl, device, DTYPES[c["dtype"]])
            if reason is None and input_bytes(c, impl) > 0.6 * mem_limit:
                reason = "does not fit in memory"
            if reason is None:
                cmd = [sys.executable, "-m", "wspo_kernels.bench.runner", "--child", json.dumps(c), impl,
                       "--device", str(device), "--repeat", str(repeat)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode == 0:
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    row["limit_fraction"] = floor_seconds(c, impl, info) / row["median_s"]
                    exp_floor = exp_floor_seconds(c, impl, info)
                    if exp_floor is not None:
                        row["exp_floor_fraction"] = exp_floor / row["median_s"]
                    if c["kind"] != "linear":  # logits elements read per second (four models, or one)
                        row["gelem_per_s"] = (1 if c["kind"] == "logps" else 4) * c["n"] * c["v"] / row["median_s"] / 1e9
                    rows.append(row)
                    log(f"{row['case']:<28} {impl:<26} {row['median_s']:.4f} s  {row['peak_extra_mib']:.0f} MiB")
                    continue
                reason = (out.stderr.strip().splitlines() or ["failed"])[-1][:200]
            log(f"{case_name(c):<28} {impl:<26} skipped: {reason}")
            if not impl.startswith("ours-") or reason == "does not fit in memory":
                rows.append(dict(case=case_name(c), impl=impl, skipped=reason))  # a missing peer is reported
    add_ratios(rows)
    return info, rows


def add_ratios(rows):
    """Speed-up of each row over the official formulation and over the fastest peer, same case, same run."""
    by_case = {}
    for r in rows:
        if "median_s" in r:
            by_case.setdefault(r["case"], []).append(r)
    for case_rows in by_case.values():
        official = next((r["median_s"] for r in case_rows if r["impl"] == "official"), None)
        peers = [r["median_s"] for r in case_rows if r["impl"] in impls.PEERS]
        for r in case_rows:
            r["vs_official"] = official / r["median_s"] if official else None
            r["vs_best_peer"] = min(peers) / r["median_s"] if peers else None


def markdown(info, rows):
    where = info.get("gpu") or f"{info['cpu']} ({info['threads']} threads; ISA: {info.get('isa', 'not recorded')})"
    exp_rate = f"; native exp {info['exp_gps']:.2f} G/s" if info.get("exp_gps") else ""
    head = [f"{where}; torch {info['torch']}, triton {info['triton']}, commit {info['commit']}; copy bandwidth "
            f"{info['copy_gbps']:.1f} GB/s{exp_rate}; {gemm_summary(info)}", "",
            "| case | impl | median s (min-max) | vs official | vs best peer | peak extra MiB | % of limit "
            "| % of exp floor | G elem/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        if "skipped" in r:
            head.append(f"| {r['case']} | {r['impl']} | skipped: {r['skipped']} | | | | | | |")
        else:
            head.append(f"| {r['case']} | {r['impl']} | {r['median_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | "
                        f"{fmt(r['vs_official'])} | {fmt(r['vs_best_peer'])} | {r['peak_extra_mib']:.0f} | "
                        f"{100 * r['limit_fraction']:.0f}% | "
                        + (f"{100 * r['exp_floor_fraction']:.0f}% | " if "exp_floor_fraction" in r else "- | ")
                        + (f"{r['gelem_per_s']:.2f} |" if "gelem_per_s" in r else "- |"))
    return "\n".join(head)


def plot(rows, path_prefix):
    """Time and peak memory vs N, per implementation, one panel per (kind, vocab/hidden, dtype)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = {}
    for r in rows:
        if "median_s" not in r:
            continue
        kind, dims, dtype = r["case"].split(":")
        n, rest = dims.split("x", 1)
        groups.setdefault(f"{kind} {rest} {dtype}", {}).setdefault(r["impl"], []).append(
            (int(n), r["median_s"], r["peak_extra_mib"]))
    paths = []
    for metric, idx, label in (("time", 1, "forward+backward s (forward for logps)"), ("memory", 2, "peak extra MiB")):
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (title, lines) in zip(axes[0], sorted(groups.items())):
            for impl, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], marker="o",
                        linestyle="-" if impl.startswith("ours") else "--", label=impl)
            ax.set_title(title)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{path_prefix}_{metric}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="wspo-kernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the laptop-sized CPU preset")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--cases", default=None, help="comma list of kind:NxV:dtype / linear:NxHxV:dtype")
    p.add_argument("--impls", default=None, help="comma list of implementations (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--name", default=None, help="file name stem (default: bench_<device>_<preset>)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child[0]), args.child[1], args.device, args.repeat)))
        return 0
    preset = "quick" if args.quick else args.preset or ("full-gpu" if args.device.startswith("cuda") else "full-cpu")
    specs = args.cases.split(",") if args.cases else PRESETS[preset]
    info, rows = run([parse_case(s) for s in specs], args.impls.split(",") if args.impls else None, args.device,
                     args.repeat)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"bench_{torch.device(args.device).type}_{preset if not args.cases else 'custom'}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    table = markdown(info, rows)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    plots = plot(rows, stem)
    print("\n" + table)
    print(f"\nwrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
