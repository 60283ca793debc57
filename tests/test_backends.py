"""Backend choice: argument, environment variable, auto fallback, explicit failures, and
what a backend whose module or extension is missing says."""
import importlib
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import cprec_kernels as ck
from cprec_kernels._core import backends
from cprec_kernels._core.backends import BackendTable
from cprec_kernels.conv import CAUSAL_CONV1D
from cprec_kernels.embedding import BLOCKWISE_EMBEDDING
from harness import module_loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _conv_inputs():
    return torch.randn(1, 4, 3), torch.randn(3, 3, 2)


def _forget(monkeypatch, *modules):
    """Make the next import of ``modules`` run again, and forget every loaded backend."""
    for name in modules:
        monkeypatch.delitem(sys.modules, name, raising=False)
        parent, _, attr = name.rpartition(".")
        monkeypatch.delattr(sys.modules[parent], attr, raising=False)  # `from . import x` would find it
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.delenv("CPREC_BACKEND", raising=False)


def test_every_table_names_both_directions_of_every_backend():
    from cprec_kernels.adaptive_softmax import ADAPTIVE_LOG_PROB, ADAPTIVE_SOFTMAX_LOSS, ADAPTIVE_TOPK
    from cprec_kernels.conv import CAUSAL_CONV1D_LN_RELU

    for table in (CAUSAL_CONV1D, CAUSAL_CONV1D_LN_RELU, BLOCKWISE_EMBEDDING, ADAPTIVE_SOFTMAX_LOSS,
                  ADAPTIVE_LOG_PROB, ADAPTIVE_TOPK):
        assert table.kernels("torch") is not None
        for name, path in table.modules.items():
            if module_loads(path):  # a backend whose module loads has both directions
                kernels = table.kernels(name)
                assert kernels is not None and callable(kernels.forward) and callable(kernels.backward), name


def test_auto_on_cpu_runs_and_matches_torch(monkeypatch):
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    x, w = _conv_inputs()
    torch.testing.assert_close(ck.causal_conv1d(x, w), ck.causal_conv1d(x, w, backend="torch"))
    assert CAUSAL_CONV1D.resolve("auto", CPU) in ("cpu", "torch")


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
    weights, projections = [torch.randn(7, 8), torch.randn(5, 2)], [None, torch.randn(8, 2)]
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA tensors"):
        ck.blockwise_embedding(torch.tensor([0, 3, 9, 11]), weights, projections, [7, 12], backend="cuda")


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


def _fake_table(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "fake_cpu_backend", module)
    monkeypatch.setattr(backends, "_loaded", {})
    return BackendTable("fake", "fake_forward", "fake_backward",
                        {"torch": "cprec_kernels.conv.reference", "cpu": "fake_cpu_backend"})


def test_a_backend_without_its_backward_is_not_available(monkeypatch):
    table = _fake_table(monkeypatch, types.SimpleNamespace(fake_forward=lambda *a: None))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available for fake.*no implementation"):
        table.resolve("cpu", CPU)
    assert table.resolve("auto", CPU) == "torch"


def test_missing_module_is_reported(monkeypatch):
    table = BackendTable("fake", "causal_conv1d_forward", "causal_conv1d_backward",
                         {"torch": "cprec_kernels.conv.reference", "cpu": "cprec_kernels._no_such_module"})
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available.*no implementation.*_no_such_module"):
        table.resolve("cpu", CPU)
    assert table.resolve("auto", CPU) == "torch"


def test_auto_skips_what_a_table_declares_slower(monkeypatch):
    fake = types.SimpleNamespace(fake_forward=lambda *a: None, fake_backward=lambda *a: None)
    monkeypatch.setitem(sys.modules, "fake_cpu_backend", fake)
    modules = {"torch": "cprec_kernels.conv.reference", "cpu": "fake_cpu_backend"}
    slow = BackendTable("slow", "fake_forward", "fake_backward", modules, auto_skip=("cpu",))
    fast = BackendTable("fast", "fake_forward", "fake_backward", modules)
    assert slow.resolve("auto", CPU) == "torch"
    assert fast.resolve("auto", CPU) == "cpu"
    assert slow.resolve("cpu", CPU) == "cpu"  # asked for by name: it runs


def test_a_dtype_the_backend_does_not_run_is_refused_by_name_and_skipped_by_auto(monkeypatch):
    fake = types.SimpleNamespace(fake_forward=lambda *a: None, fake_backward=lambda *a: None,
                                 DTYPES=(torch.float32,))
    table = _fake_table(monkeypatch, fake)
    assert table.resolve("cpu", CPU, torch.float32) == "cpu"
    with pytest.raises(RuntimeError, match="runs \\['torch.float32'\\], not torch.float64"):
        table.resolve("cpu", CPU, torch.float64)
    assert table.resolve("auto", CPU, torch.float64) == "torch"


def test_auto_leaves_float64_to_the_reference():
    pytest.importorskip("triton")
    assert CAUSAL_CONV1D.resolve("auto", CUDA, torch.float64) not in ("triton", "cuda")
    assert CAUSAL_CONV1D.resolve("auto", CUDA, torch.float32) == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_keeps_triton_for_the_embedding_on_cuda(monkeypatch):
    # auto prefers Triton on CUDA until a GPU run shows the CUDA kernel faster.
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    chosen = BLOCKWISE_EMBEDDING.resolve(None, CUDA, torch.float32)
    triton_ok = module_loads("cprec_kernels.embedding.triton")
    assert chosen == ("triton" if triton_ok else "cuda" if module_loads("cprec_kernels.embedding.cuda") else "torch")


# --------------------------------------------------------------------------------------
# the C++ (cpu) and CUDA extensions when they are not built
# --------------------------------------------------------------------------------------
def test_explicit_cpu_backend_says_extension_not_built(monkeypatch):
    _forget(monkeypatch, "cprec_kernels._C", "cprec_kernels._core.cpu_extension", "cprec_kernels.conv.cpu")
    monkeypatch.setitem(sys.modules, "cprec_kernels._C", None)  # importing it fails
    x, w = _conv_inputs()
    with pytest.raises(RuntimeError, match="extension is not built"):
        ck.causal_conv1d(x, w, backend="cpu")
    # auto falls back to the reference quietly.
    assert CAUSAL_CONV1D.resolve(None, CPU) == "torch"
    torch.testing.assert_close(ck.causal_conv1d(x, w), ck.causal_conv1d(x, w, backend="torch"))


@pytest.mark.skipif(not module_loads("cprec_kernels.conv.cpu"), reason="the C++ extension is not built")
def test_auto_takes_cpu_and_ops_are_registered(monkeypatch):
    from cprec_kernels.adaptive_softmax import ADAPTIVE_SOFTMAX_LOSS, ADAPTIVE_TOPK

    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    for table in (CAUSAL_CONV1D, BLOCKWISE_EMBEDDING, ADAPTIVE_TOPK):
        assert table.resolve(None, CPU) == "cpu"
        assert hasattr(torch.ops.cprec_cpu, table.forward)
    # The loss's C++ ops carry its softmax statistics, hence their names.
    assert ADAPTIVE_SOFTMAX_LOSS.resolve(None, CPU) == "cpu"
    assert hasattr(torch.ops.cprec_cpu, "adaptive_softmax_loss_stats_forward")


def _forget_cuda_backend(monkeypatch):
    _forget(monkeypatch, "cprec_kernels._C_cuda", "cprec_kernels.embedding.cuda")
    monkeypatch.setitem(sys.modules, "cprec_kernels._C_cuda", None)
    monkeypatch.delenv("CPREC_CUDA_JIT", raising=False)


def test_import_without_cuda_extension_says_not_built(monkeypatch):
    _forget_cuda_backend(monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="CUDA extension .* is not built") as info:
        importlib.import_module("cprec_kernels.embedding.cuda")
    assert "nvcc" in str(info.value)  # says how to get it
    if torch.version.cuda is None:
        assert "CPU-only build" in str(info.value)


def test_explicit_cuda_backend_without_extension_says_why(monkeypatch):
    # The dispatch check for a CUDA device (no tensor is made, so no GPU is needed): the
    # error carries the import error's text; auto falls back quietly.
    _forget_cuda_backend(monkeypatch)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA extension .* is not built"):
        BLOCKWISE_EMBEDDING.resolve("cuda", CUDA, torch.float32)
    assert BLOCKWISE_EMBEDDING.resolve(None, CUDA, torch.float32) in ("triton", "torch")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_compile_check_script():
    """Every csrc/cuda/*.cu compiles for sm_90 with the toolkit's headers only (~30 s)."""
    script = os.path.join(ROOT, "csrc", "cuda", "compile_check.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedding.cu ok" in result.stdout


def test_eager_call_only_for_plain_eager_tensors():
    """The ops' direct (no custom-op dispatch) path is for plain eager tensors only:
    FakeTensors and torch.func-wrapped tensors must reach the registered op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cprec_kernels._core.backends import eager_call

    x = torch.randn(3)
    assert eager_call(x, None, torch.nn.Parameter(torch.randn(2)))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not eager_call(x, fake)
    seen = []

    def f(w):
        seen.append(eager_call(x, w))
        return w.sum()

    torch.func.grad(f)(x)
    assert seen == [False]
