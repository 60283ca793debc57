"""The float32 ``tl.dot`` precision of the triton kernels follows eager torch's flags:
convolutions cuDNN's ``allow_tf32``, matmul-shaped ops the float32 matmul precision."""

import pytest
import torch

pytest.importorskip("triton")

from cprec_kernels._triton_common import fp32_precision, mma_mode  # noqa: E402


@pytest.fixture
def flags():
    """Restores both torch flags whatever the test sets."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.mark.parametrize("allow", [True, False])
def test_conv_follows_cudnn_allow_tf32_only(flags, allow):
    torch.backends.cudnn.allow_tf32 = allow
    for matmul in ("highest", "high"):
        torch.set_float32_matmul_precision(matmul)
        assert fp32_precision("conv") == ("tf32" if allow else "ieee")


@pytest.mark.parametrize("precision, want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_matmul_follows_float32_matmul_precision_only(flags, precision, want):
    for allow in (True, False):
        torch.backends.cudnn.allow_tf32 = allow
        torch.set_float32_matmul_precision(precision)
        assert fp32_precision("matmul") == want


def test_matmul_follows_cuda_matmul_allow_tf32(flags):
    torch.backends.cuda.matmul.allow_tf32 = True
    assert fp32_precision("matmul") == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert fp32_precision("matmul") == "ieee"


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        fp32_precision("linear")


def test_interpreter_inputs_stay_exact_whatever_the_flags(flags):
    """CPU tensors run under the interpreter: float32 is IEEE even with TF32 allowed."""
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    for kind in ("conv", "matmul"):
        assert mma_mode(torch.ones(1), kind) == "ieee"
        assert mma_mode(torch.ones(1, dtype=torch.float64), kind) == "f64"
        assert mma_mode(torch.ones(1, dtype=torch.bfloat16), kind) == "upcast"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_cuda_float32_takes_the_kinds_flag(flags):
    x = torch.ones(1, device="cuda")
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")
    assert (mma_mode(x, "conv"), mma_mode(x, "matmul")) == ("tf32", "ieee")
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("high")
    assert (mma_mode(x, "conv"), mma_mode(x, "matmul")) == ("ieee", "tf32")
