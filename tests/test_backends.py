"""Backend choice: argument, environment variable, auto fallback, explicit failures."""
import pytest
import torch

import cprec_kernels as ck
from cprec_kernels import backends


def _conv_inputs():
    return torch.randn(1, 4, 3), torch.randn(3, 3, 2)


def test_auto_on_cpu_runs_and_matches_torch(monkeypatch):
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    x, w = _conv_inputs()
    torch.testing.assert_close(ck.causal_conv1d(x, w), ck.causal_conv1d(x, w, backend="torch"))
    assert backends.resolve("auto", "causal_conv1d_forward", torch.device("cpu")) in ("cpu", "torch")


def test_unknown_backend_name_raises(monkeypatch):
    x, w = _conv_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.causal_conv1d(x, w, backend="fast")
    monkeypatch.setenv("CPREC_BACKEND", "nope")
    with pytest.raises(ValueError, match="CPREC_BACKEND"):
        ck.causal_conv1d(x, w)


def test_explicit_backend_for_wrong_device_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = _conv_inputs()
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*CUDA"):
        ck.causal_conv1d(x, w, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ck.causal_conv1d(x, w, backend="cuda")


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = _conv_inputs()
    monkeypatch.setenv("CPREC_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda'"):
        ck.causal_conv1d(x, w)
    monkeypatch.setenv("CPREC_BACKEND", "torch")
    assert ck.causal_conv1d(x, w).shape == (1, 4, 3)
    # the argument wins over the environment
    monkeypatch.setenv("CPREC_BACKEND", "cuda")
    assert ck.causal_conv1d(x, w, backend="torch").shape == (1, 4, 3)


def test_missing_implementation_is_reported(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpu", ("cprec_kernels._no_such_module",))
    monkeypatch.setattr(backends, "_loaded", {})
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available.*no implementation"):
        backends.resolve("cpu", "causal_conv1d_forward", torch.device("cpu"))
    assert backends.resolve("auto", "causal_conv1d_forward", torch.device("cpu")) == "torch"


def test_auto_leaves_float64_to_the_reference():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert backends.resolve("auto", "causal_conv1d_forward", cuda, torch.float64) not in ("triton", "cuda")
    assert backends.resolve("auto", "causal_conv1d_forward", cuda, torch.float32) == "triton"


def test_auto_skips_what_a_backend_declares_slower(monkeypatch):
    import types

    fake = types.SimpleNamespace(AUTO_SKIP=frozenset({"causal_conv1d_forward"}), causal_conv1d_forward=lambda *a: None,
                                 blockwise_embedding_forward=lambda *a: None)
    monkeypatch.setitem(backends._MODULES, "cpu", ("fake_cpu_backend",))
    monkeypatch.setattr(backends, "_loaded", {"fake_cpu_backend": fake})
    cpu = torch.device("cpu")
    assert backends.resolve("auto", "causal_conv1d_forward", cpu) == "torch"
    assert backends.resolve("auto", "blockwise_embedding_forward", cpu) == "cpu"
    assert backends.resolve("cpu", "causal_conv1d_forward", cpu) == "cpu"  # asked for by name: it runs
