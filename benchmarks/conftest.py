"""pytest-benchmark's stored runs, kept per machine class.

pytest-benchmark keys its storage by OS and Python only; a run from another CPU (another ISA, core count
or vendor) would then be compared with this one.  Unless --benchmark-storage is given, runs are stored
under benchmarks/results/baselines/pytest-benchmark/<machine key>/ (``runner.machine_key``), so

    pytest benchmarks/ --benchmark-only --benchmark-autosave                       # record this machine's run
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%

compares only runs of the same class of machine.
"""
import os

import torch

from wspo_kernels.bench.runner import machine_identity, machine_key

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_STORAGE = "file://./.benchmarks"   # pytest-benchmark's own default


def pytest_configure(config):
    if getattr(config.option, "benchmark_storage", None) == DEFAULT_STORAGE:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        key = machine_key(machine_identity(device))
        config.option.benchmark_storage = "file://" + os.path.join(HERE, "results", "baselines", "pytest-benchmark", key)
