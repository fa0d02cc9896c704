"""``wspo-kernels bench``: every implementation on every case, timed interleaved, memory in fresh processes.

    wspo-kernels bench --quick                    # a laptop-sized CPU sweep (a few minutes on 2 cores)
    wspo-kernels bench --device cuda              # the full sweep on a GPU
    wspo-kernels bench --cases logits:4096x32000:fp32 --impls official,ours-native
    wspo-kernels bench --timing separate ...      # the old way: each implementation timed in its own process

Timing (``--timing interleaved``, the default): one fresh process per case builds the inputs once and
every implementation's step on them, warms each up, then runs ``--repeat`` rounds; a round times every
implementation once (round-robin, the order rotated from round to round) and measures the floors once
(copy bandwidth, the native exp rate, the bare GEMMs).  Every ratio and every fraction of a floor is
computed per round and reported as the median over rounds with its interquartile range: a machine that
slows down for a while slows every implementation of that round alike, so the ratios hold while the
seconds drift.  ``--timing separate`` times each implementation in its own process, minutes apart, and
divides medians (ratios then carry the drift between those processes).

Per case and implementation: median / min / max time of forward+backward (forward only for the
``logps`` kind: one frozen model's per-token logps), the speed-up over the official formulation and
over the best peer, the peak extra memory (always in a fresh process per implementation -- CPU: VmHWM
above the resident set after the inputs and one warm-up step; GPU: max_memory_allocated above the same
point), and the fraction of the physical limit reached: bytes / measured copy bandwidth for logits (the WSPO floor is four
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
    """In a fresh process: build inputs, one warm-up step, then time ``repeat`` steps, each with its own
    peak-memory window (``peak_extra_mib`` is the largest, ``peak_spread_mib`` how much the steps differ)."""
    device = torch.device(device)
    x = make_inputs(c, device)
    step = impls.IMPLS[c["kind"]][impl](x)
    _timed(step, x, device)
    times, peaks = [], []
    for _ in range(repeat):
        for p in x["params"]:
            p.grad = None
        if device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = start_window()
        times.append(_timed(step, x, device))
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda"
                     else peak_extra_mib(base))
    return dict(case=case_name(c), impl=impl, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                peak_extra_mib=max(peaks), peak_spread_mib=max(peaks) - min(peaks))


def run_interleaved(c, impl_names, device, rounds):
    """In a fresh process: the inputs once, every implementation's step on them and one warm-up each, then
    ``rounds`` rounds that time each implementation once and the floors once.  The order is rotated every
    round (A B C, B C A, ...), so no implementation always runs right after the same one.  In-place
    variants overwrite the shared policy logits with their gradient: the work does not depend on the values.
    Returns {case, times: {impl: [s per round]}, floors: [per round], failed: {impl: reason}}."""
    device = torch.device(device)
    x = make_inputs(c, device)
    steps, failed = {}, {}
    for impl in impl_names:
        try:
            steps[impl] = impls.IMPLS[c["kind"]][impl](x)
            _timed(steps[impl], x, device)
        except Exception as exc:  # noqa: BLE001 -- one implementation failing is a skipped row, not a lost case
            failed[impl] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            steps.pop(impl, None)
    floors = _Floors(c, device)
    names = list(steps)
    times = {impl: [] for impl in names}
    per_round = []
    for r in range(rounds):
        for impl in names[r % len(names):] + names[:r % len(names)] if names else []:
            times[impl].append(_timed(steps[impl], x, device))
        per_round.append(floors.measure())
    return dict(case=case_name(c), times=times, floors=per_round, failed=failed)


def _timed(step, x, device):
    for p in x["params"]:
        p.grad = None
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _copy_buffers(device):
    """Source and destination of the copy-bandwidth probe: 1 GiB on a GPU, 256 MiB on a CPU."""
    src = torch.empty(2 ** 30 if device.type == "cuda" else 2 ** 28, dtype=torch.uint8, device=device).fill_(1)
    return src, torch.empty_like(src)


def _copy_gbps(src, dst, device, repeat=5):
    """Copy bandwidth, GB/s counting the bytes read and the bytes written, best of ``repeat``."""
    return 2 * src.numel() / _time_best(lambda: dst.copy_(src), device, repeat) / 1e9


class _Floors:
    """The physical rates a case is measured against, measured once per round beside the implementations:
    copy bandwidth (GB/s, read + write), the native exp rate (G exp/s; CPU, where the kernels are built)
    and, for a linear case, its bare GEMMs (s each, into a preallocated output)."""

    def __init__(self, c, device):
        self.c, self.device = c, device
        self.src, self.dst = _copy_buffers(device)
        self.exp = None
        if device.type == "cpu":
            from ..backends import native
            module = native._module("cpu")
            self.exp = None if isinstance(module, str) else module
        self.gemms = _gemm_steps(c, device) if c["kind"] == "linear" else None

    def measure(self):
        out = dict(copy_gbps=_copy_gbps(self.src, self.dst, self.device, repeat=2))
        if self.exp is not None:
            out["exp_gps"] = self.exp.exp_rate(20000)
        if self.gemms is not None:
            out["gemm_s"] = {case_name(self.c): {k: _time_best(f, self.device, 1) for k, f in self.gemms.items()}}
        return out


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


def machine_identity(device):
    """What ``machine_key`` needs, measured nothing: the CPU's model name, the thread count, and the GPU's
    name or the CPU instruction set the kernels run with."""
    device = torch.device(device)
    info = dict(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        from ..backends import native
        info["cpu_isa"] = (native.capability() or torch.backends.cpu.get_cpu_capability()).lower()
    return info


def machine_info(device):
    """Versions, hardware, and the physical rates measured now: copy bandwidth and the native exp rate
    (the bare GEMMs of the linear cases are measured by ``run``)."""
    device = torch.device(device)
    info = dict(device=device.type, torch=torch.__version__, python=platform.python_version(), cores=os.cpu_count(),
                **machine_identity(device))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cpu":  # the ISA every CPU table names: torch's kernels and the native kernel copy that ran
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
    info["copy_gbps"] = _copy_gbps(*_copy_buffers(device), device)
    info["gemm_s"] = {}   # the bare GEMMs of each linear case, filled by run()
    return info


def machine_key(info):
    """The class of machine a run's numbers belong to (regression baselines are kept per class): the GPU's
    name, or the CPU instruction set the kernels ran with, the CPU's model name and the thread count --
    ``cpu-avx512-amd-epyc-2t``, ``gpu-nvidia-h100-80gb-hbm3``."""
    def slug(text):
        return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())
    if info.get("gpu"):
        return "gpu-" + slug(info["gpu"])
    isa = info.get("cpu_isa") or info.get("isa", "unknown").split("native ")[-1].split(" ")[0]
    return f"cpu-{slug(isa)}-{slug(info.get('cpu', 'unknown'))}-{info.get('threads', 0)}t"


GEMMS = ("logits", "dh", "dw")


def _gemm_steps(c, device):
    """The bare GEMMs of a linear case over its counted rows M, in the case's dtype: logits [M, H] @ [H, V],
    dH [M, V] @ [V, H], dW [V, M] @ [M, H].  Each writes into an output allocated once (a fresh M x V result
    would add its page faults on the CPU to the floor); the logits GEMM writes into the M x V operand of the
    other two (values do not change a GEMM's time), so the floor costs one M x V buffer."""
    dt = DTYPES[c["dtype"]]
    m, h, v = counted_rows(c), c["h"], c["v"]
    hidden, weight = torch.randn(m, h, device=device, dtype=dt), torch.randn(v, h, device=device, dtype=dt)
    g = torch.randn(m, v, device=device, dtype=dt)
    dh, dw = torch.empty_like(hidden), torch.empty_like(weight)
    return dict(logits=lambda: torch.mm(hidden, weight.t(), out=g), dh=lambda: torch.mm(g, weight, out=dh),
                dw=lambda: torch.mm(g.t(), hidden, out=dw))


def gemm_seconds(c, device):
    """The bare GEMMs of a linear case (``_gemm_steps``), best of three, seconds each."""
    gemm = _gemm_steps(c, device)
    seconds = {k: _time_best(gemm[k], device, repeat=3) for k in GEMMS}
    del gemm
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
def _child(args, device, repeat):
    """Run this module in a fresh process; its last stdout line (JSON), or the reason it failed."""
    cmd = [sys.executable, "-m", "wspo_kernels.bench.runner", *args, "--device", str(device), "--repeat", str(repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1]), None
    return None, (out.stderr.strip().splitlines() or [f"failed (exit {out.returncode})"])[-1][:200]


MEMORY_STEPS = 2   # steps of an interleaved case's memory process (each its own peak window)


def run(cases, impl_names, device, repeat, log=print, timing="interleaved"):
    device = torch.device(device)
    mem_limit = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    info = machine_info(device)
    info["timing"], info["repeat"] = timing, repeat
    for c in cases:  # interleaved runs measure their GEMMs every round instead
        if timing == "separate" and c["kind"] == "linear" and input_bytes(c) <= 0.6 * mem_limit:
            info["gemm_s"][case_name(c)] = gemm_seconds(c, device)
    log(f"# {info.get('gpu') or info['cpu']}: copy {info['copy_gbps']:.1f} GB/s; {gemm_summary(info)}; "
        f"timing {timing}, {repeat} {'rounds' if timing == 'interleaved' else 'steps'}")
    rows = []

    def skip(c, impl, reason):
        log(f"{case_name(c):<28} {impl:<26} skipped: {reason}")
        if not impl.startswith("ours-") or reason == "does not fit in memory":
            rows.append(dict(case=case_name(c), impl=impl, skipped=reason))  # a missing peer is reported

    for c in cases:
        runnable = []
        for impl in impl_names or list(impls.IMPLS[c["kind"]]):
            if impl not in impls.IMPLS[c["kind"]]:
                continue
            reason = impls.available(impl, device, DTYPES[c["dtype"]])
            if reason is None and input_bytes(c, impl) > 0.6 * mem_limit:
                reason = "does not fit in memory"
            if reason is None:
                runnable.append(impl)
            else:
                skip(c, impl, reason)
        if timing == "separate":
            case_rows = []
            for impl in runnable:
                row, reason = _child(["--child", json.dumps(c), impl], device, repeat)
                if row is None:
                    skip(c, impl, reason)
                    continue
                row["limit_fraction"] = floor_seconds(c, impl, info) / row["median_s"]
                exp_floor = exp_floor_seconds(c, impl, info)
                if exp_floor is not None:
                    row["exp_floor_fraction"] = exp_floor / row["median_s"]
                case_rows.append(row)
            add_ratios(case_rows)
        else:
            measured, reason = (_child(["--child-interleaved", json.dumps(c), ",".join(runnable)], device, repeat)
                                if runnable else (None, None))
            if measured is None:
                for impl in runnable:
                    skip(c, impl, reason)
                continue
            for impl, why in measured["failed"].items():
                skip(c, impl, why)
            peaks = {}
            for impl in measured["times"]:  # memory: a fresh process per implementation, two steps
                row, _ = _child(["--child", json.dumps(c), impl], device, MEMORY_STEPS)
                peaks[impl] = (None, None) if row is None else (row["peak_extra_mib"], row["peak_spread_mib"])
            case_rows = interleaved_rows(c, measured, peaks)
            if c["kind"] == "linear" and measured["floors"]:
                info["gemm_s"][case_name(c)] = {k: statistics.median(f["gemm_s"][case_name(c)][k]
                                                                     for f in measured["floors"]) for k in GEMMS}
        for row in case_rows:
            if c["kind"] != "linear":  # logits elements read per second (four models, or one)
                row["gelem_per_s"] = (1 if c["kind"] == "logps" else 4) * c["n"] * c["v"] / row["median_s"] / 1e9
            peak = "-" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f}"
            log(f"{row['case']:<28} {row['impl']:<26} {row['median_s']:.4f} s  {peak} MiB")
        rows.extend(case_rows)
    return info, rows


def quartiles(values):
    """(median, first quartile, third quartile) of per-round values."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


RATIOS = ("vs_official", "vs_best_peer", "limit_fraction", "exp_floor_fraction")


def interleaved_rows(c, measured, peaks):
    """Rows of one interleaved case: every ratio and floor fraction per round, then its median and
    interquartile range over the rounds (``iqr``: {metric: [q1, q3]})."""
    times, floors = measured["times"], measured["floors"]
    official = times.get("official")
    peers = [t for impl, t in times.items() if impl in impls.PEERS]
    rows = []
    for impl, ts in times.items():
        rounds = range(len(ts))
        per_round = {
            "vs_official": [official[r] / ts[r] for r in rounds] if official else None,
            "vs_best_peer": [min(p[r] for p in peers) / ts[r] for r in rounds] if peers else None,
            "limit_fraction": [floor_seconds(c, impl, floors[r]) / ts[r] for r in rounds],
            "exp_floor_fraction": ([exp_floor_seconds(c, impl, floors[r]) / ts[r] for r in rounds]
                                   if exp_floor_seconds(c, impl, floors[0]) is not None else None),
        }
        row = dict(case=case_name(c), impl=impl, median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts),
                   peak_extra_mib=peaks[impl][0], peak_spread_mib=peaks[impl][1], timing="interleaved",
                   rounds=len(ts), iqr={})
        for metric in RATIOS:
            values = per_round[metric]
            if values is None:
                row[metric] = None
                continue
            row[metric], q1, q3 = quartiles(values)
            row["iqr"][metric] = [q1, q3]
        rows.append(row)
    return rows


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


def _metric(r, key, fmt):
    """A ratio or fraction with its interquartile range over the rounds, where measured interleaved."""
    value = r.get(key)
    if value is None:
        return "-"
    iqr = r.get("iqr", {}).get(key)
    return fmt(value) + (f" ({fmt(iqr[0])}-{fmt(iqr[1])})" if iqr else "")


def _pct(v):
    return f"{100 * v:.0f}%"


def _times(v):
    return f"{v:.2f}x"


def markdown(info, rows):
    """The results table.  It leads with the floors (what the hardware allows) and the best peer; the
    official formulation's time comes last: it is mostly first-touch page faults on fresh full-size
    tensors, which swing with the machine's state, so a ratio to it says little about our code."""
    where = info.get("gpu") or f"{info['cpu']} ({info['threads']} threads; ISA: {info.get('isa', 'not recorded')})"
    exp_rate = f"; native exp {info['exp_gps']:.2f} G/s" if info.get("exp_gps") else ""
    timing = info.get("timing", "separate")
    how = (f"interleaved, {info.get('repeat')} rounds: each ratio and % is the median of its per-round values "
           "(interquartile range in parentheses)" if timing == "interleaved" else
           "separate processes: ratios of medians measured minutes apart")
    head = [f"{where}; torch {info['torch']}, triton {info['triton']}, commit {info['commit']}; copy bandwidth "
            f"{info['copy_gbps']:.1f} GB/s{exp_rate}; {gemm_summary(info)}; timing: {how}", "",
            "| case | impl | % of exp floor | % of memory floor | x bare GEMMs | vs best peer | vs official "
            "| median s (min-max) | peak extra MiB | G elem/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            head.append(f"| {r['case']} | {r['impl']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        linear = r["case"].startswith("linear:")
        gemms = "-"
        if linear and r.get("limit_fraction"):  # the time in units of the bare GEMMs: 1.00x is the floor
            iqr = r.get("iqr", {}).get("limit_fraction")
            gemms = _times(1 / r["limit_fraction"]) + (f" ({_times(1 / iqr[1])}-{_times(1 / iqr[0])})" if iqr else "")
        peak = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
        head.append(f"| {r['case']} | {r['impl']} | {_metric(r, 'exp_floor_fraction', _pct)} | "
                    f"{'-' if linear else _metric(r, 'limit_fraction', _pct)} | {gemms} | "
                    f"{_metric(r, 'vs_best_peer', _times)} | {_metric(r, 'vs_official', _times)} | "
                    f"{r['median_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | {peak} | "
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
            (int(n), r["median_s"], float("nan") if r["peak_extra_mib"] is None else r["peak_extra_mib"]))
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
    p.add_argument("--timing", choices=("interleaved", "separate"), default="interleaved",
                   help="interleaved: every implementation of a case in one process, round-robin (default); "
                        "separate: each in its own process")
    p.add_argument("--repeat", type=int, default=5, help="rounds (interleaved) or timed steps (separate)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--name", default=None, help="file name stem (default: bench_<device>_<preset>)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-interleaved", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child[0]), args.child[1], args.device, args.repeat)))
        return 0
    if args.child_interleaved:
        case, names = args.child_interleaved
        print(json.dumps(run_interleaved(json.loads(case), names.split(","), args.device, args.repeat)))
        return 0
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    preset = "quick" if args.quick else args.preset or ("full-gpu" if args.device.startswith("cuda") else "full-cpu")
    specs = args.cases.split(",") if args.cases else PRESETS[preset]
    info, rows = run([parse_case(s) for s in specs], args.impls.split(",") if args.impls else None, args.device,
                     args.repeat, timing=args.timing)
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
