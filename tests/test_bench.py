"""The benchmark harness (wspo_kernels.bench.runner) and the regression check (benchmarks/check.py).

Nothing here times anything for a verdict: these tests check how rounds are run and ratios derived,
and how a run is held against a machine class's baseline, on tiny shapes or made-up runs.
"""
import copy
import importlib.util
import json
import os

import pytest
import torch

from wspo_kernels.bench import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_check", os.path.join(ROOT, "benchmarks", "check.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_interleaved_rounds_time_every_implementation_once_in_rotated_order(monkeypatch):
    order = []
    real = runner._timed

    def spy(step, x, device):
        order.append(step)
        return real(step, x, device)
    monkeypatch.setattr(runner, "_timed", spy)
    c = runner.parse_case("logits:64x300:fp32")
    names = ["official", "ours-torch", "ours-torch-precomputed"]
    out = runner.run_interleaved(c, names, "cpu", rounds=3)
    assert out["failed"] == {} and len(out["floors"]) == 3
    assert all(len(out["times"][n]) == 3 for n in names)
    steps = order[:3]  # the warm-ups, in the given order, then rounds A B C, B C A, C A B
    assert order[3:] == steps + steps[1:] + steps[:1] + steps[2:] + steps[:2]
    assert all(f["copy_gbps"] > 0 for f in out["floors"])


def test_interleaved_ratios_are_medians_of_per_round_ratios():
    c = runner.parse_case("logits:1024x1000:fp32")
    # a machine that slows down 3x in round 2 slows every implementation of that round alike
    measured = dict(times={"official": [1.0, 3.0, 1.0], "trl": [0.5, 1.5, 0.5], "ours-native": [0.1, 0.3, 0.1]},
                    floors=[dict(copy_gbps=10.0, exp_gps=2.0)] * 3)
    rows = {r["impl"]: r for r in runner.interleaved_rows(c, measured, {k: (5.0, 1.0) for k in measured["times"]})}
    assert rows["ours-native"]["vs_official"] == pytest.approx(10.0)
    assert rows["ours-native"]["iqr"]["vs_official"] == pytest.approx([10.0, 10.0])  # no spread at all
    assert rows["ours-native"]["vs_best_peer"] == pytest.approx(5.0)
    assert rows["official"]["vs_official"] == pytest.approx(1.0)
    floor = runner.exp_floor_seconds(c, "ours-native", measured["floors"][0])
    assert rows["ours-native"]["exp_floor_fraction"] == pytest.approx(floor / 0.1)
    assert rows["trl"]["exp_floor_fraction"] is None
    lo, hi = rows["ours-native"]["iqr"]["limit_fraction"]
    assert lo <= rows["ours-native"]["limit_fraction"] <= hi


def test_tables_lead_with_the_floors_and_the_best_peer():
    c = runner.parse_case("logits:1024x1000:fp32")
    measured = dict(times={"official": [1.0, 1.2], "ours-native": [0.1, 0.1]},
                    floors=[dict(copy_gbps=10.0, exp_gps=2.0)] * 2)
    rows = runner.interleaved_rows(c, measured, {"official": (5.0, 0.0), "ours-native": (None, None)})
    info = dict(cpu="Test CPU", threads=2, isa="torch AVX2, native avx2", torch="x", triton=None, commit="abc",
                copy_gbps=10.0, exp_gps=2.0, gemm_s={}, timing="interleaved", repeat=2)
    table = runner.markdown(info, rows).splitlines()
    assert table[2].startswith("| case | impl | % of exp floor | % of memory floor | x bare GEMMs | vs best peer |")
    assert "interquartile range" in table[0]
    native = next(line for line in table if "ours-native" in line)
    assert "11.00x (10.50x-11.50x)" in native and "| - |" in native  # vs official with its IQR; no memory


@pytest.mark.parametrize("info,key", [
    (dict(cpu="AMD EPYC 9R14 96-Core Processor", cpu_isa="avx512", threads=2), "cpu-avx512-amd-epyc-9r14-96-core-processor-2t"),
    (dict(cpu="Intel(R) Xeon(R) CPU @ 2.20GHz", isa="torch AVX2, native avx2 (exp: x)", threads=4),
     "cpu-avx2-intel-r-xeon-r-cpu-2-20ghz-4t"),
    (dict(gpu="NVIDIA H100 80GB HBM3", cpu="x", threads=16), "gpu-nvidia-h100-80gb-hbm3"),
])
def test_machine_key(info, key):
    assert runner.machine_key(info) == key


def _run(**overrides):
    row = dict(case="logits:1024x32000:fp32", impl="ours-native", median_s=0.04, min_s=0.039, max_s=0.05,
               peak_extra_mib=125.0, peak_spread_mib=1.0, exp_floor_fraction=0.50, limit_fraction=0.60,
               vs_best_peer=10.0, vs_official=11.0,
               iqr=dict(exp_floor_fraction=[0.49, 0.51], limit_fraction=[0.59, 0.61], vs_best_peer=[9.8, 10.2],
                        vs_official=[10.0, 12.0]))
    row.update(overrides)
    info = dict(cpu="Test CPU", cpu_isa="avx512", threads=2, timing="interleaved", commit="abc")
    return dict(info=info, rows=[dict(case=row["case"], impl="official", median_s=0.4, min_s=0.4, max_s=0.4),
                                 row])


def _write(tmp_path, name, run):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def test_check_says_no_baseline_then_records_one_then_passes(tmp_path, capsys):
    baselines = str(tmp_path / "baselines")
    fresh = _write(tmp_path, "fresh.json", _run())
    assert check.main(["--fresh", fresh, "--baselines", baselines]) == check.EXIT_NO_BASELINE
    assert "no baseline for machine class cpu-avx512-test-cpu-2t" in capsys.readouterr().out
    assert check.main(["--fresh", fresh, "--baselines", baselines, "--record"]) == check.EXIT_OK
    assert os.path.exists(os.path.join(baselines, "cpu-avx512-test-cpu-2t.json"))
    assert check.main(["--fresh", fresh, "--baselines", baselines]) == check.EXIT_OK
    # another machine class (a fake key) has no baseline: neither a pass nor a regression
    assert check.main(["--fresh", fresh, "--baselines", baselines, "--machine-key", "cpu-avx2-other-2t"]) == 3


def test_check_margins_come_from_the_measured_spread(tmp_path, capsys):
    baselines = str(tmp_path / "b")
    check.main(["--fresh", _write(tmp_path, "base.json", _run()), "--baselines", baselines, "--record"])
    # within the noise the two runs measured: 2 x (4% + 4%) = 16% for vs best peer
    noisy = _run(vs_best_peer=8.8, iqr=dict(vs_best_peer=[8.6, 9.0]))
    assert check.main(["--fresh", _write(tmp_path, "n.json", noisy), "--baselines", baselines]) == check.EXIT_OK
    # the same drop with tight spreads is a regression
    tight = _run(vs_best_peer=8.8, iqr=dict(vs_best_peer=[8.79, 8.81]))
    capsys.readouterr()
    assert check.main(["--fresh", _write(tmp_path, "t.json", tight), "--baselines", baselines]) == 1
    out = capsys.readouterr().out
    assert "FAIL logits:1024x32000:fp32" in out and "x best peer" in out and "1 regression(s)" in out
    # a run too noisy to judge (its IQR wider than the value's quarter) is neither a pass nor a regression
    wild = _run(vs_best_peer=9.0, iqr=dict(vs_best_peer=[6.0, 12.0]))
    capsys.readouterr()
    assert check.main(["--fresh", _write(tmp_path, "w.json", wild), "--baselines", baselines]) == check.EXIT_OK
    out = capsys.readouterr().out
    assert "??   logits:1024x32000:fp32" in out and "1 comparison(s) marked ?? were too noisy" in out
    # memory: 125 MiB -> 140 MiB is beyond max(4 MiB, 2%, 2 x (1 + 1) MiB)
    grown = _run(peak_extra_mib=140.0)
    assert check.main(["--fresh", _write(tmp_path, "m.json", grown), "--baselines", baselines]) == 1


def test_check_refuses_a_run_timed_in_separate_processes(tmp_path):
    run = _run()
    run["info"]["timing"] = "separate"
    assert check.main(["--fresh", _write(tmp_path, "s.json", run), "--baselines", str(tmp_path)]) == check.EXIT_USAGE
