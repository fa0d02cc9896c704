"""Backend choice: auto, forced by argument or environment variable, clear errors."""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.dispatch import ENV_VAR, select_backend


def test_auto_picks_a_backend_that_runs():
    module = select_backend("", torch.device("cpu"), torch.float32)
    assert module.unavailable_reason(torch.device("cpu"), torch.float32) is None


def test_float64_always_runs_on_the_portable_backend():
    assert select_backend("", torch.device("cpu"), torch.float64).NAME == "torch"


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_backend("", torch.device("cpu"), torch.float32).NAME == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        wk.token_logprobs(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(wk.token_logprobs(x, y, backend="torch"), torch.log_softmax(x, -1)[range(3), y])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    triton_rows = pytest.importorskip("wspo_kernels.backends.triton_rows")
    monkeypatch.setattr(triton_rows, "_INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu .*TRITON_INTERPRET=1"):
        select_backend("triton", torch.device("cpu"), torch.float32)


def test_triton_refuses_float64():
    triton_rows = pytest.importorskip("wspo_kernels.backends.triton_rows")
    assert "float64" in triton_rows.unavailable_reason(torch.device("cuda"), torch.float64)
