"""benchmarks/gpu_validate.py, the first-GPU validation, run on small shapes on the CPU so that it works when a
GPU finally runs it: every check passes here, and a broken comparison or a crash is reported, not raised."""
import importlib.util
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _module():
    spec = importlib.util.spec_from_file_location("gpu_validate", os.path.join(HERE, "..", "benchmarks",
                                                                               "gpu_validate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_passes_and_writes_its_report(tmp_path):
    gv = _module()
    assert gv.main(["--device", "cpu", "--smoke", "--no-perf", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "gpu_cpu_smoke_validate.md").read_text()
    assert "checks passed" in report and "| NO |" not in report
    cpu = torch.device("cpu")
    assert gv._big_rows_check("torch", cpu, (300, 1001)) == []   # the N*V > 2^31 logic on a small shape


def test_failures_are_reported_with_their_numbers():
    gv = _module()
    w = torch.randn(5)
    assert "max |diff| 1.000e-03" in gv._compare("x", w + 1e-3, w, torch.float32)
    report = gv.Report()
    report.check("crash", lambda: 1 / 0)
    report.check("fine", lambda: [])
    assert [r["ok"] for r in report.rows] == [False, True] and "ZeroDivisionError" in report.rows[0]["problems"][0]
