"""Benchmarks of the causal dilated conv ops, forward and forward+backward.

Rows, per op (``causal_conv1d``, ``causal_conv1d_ln_relu`` with a residual) and size:
  eager    F.pad + F.conv1d (+ F.layer_norm + relu + residual add), what users write
  compile  torch.compile of that eager code (CUDA only: on CPU it needs a C++ toolchain
           and minutes of compile time for a number nobody ships)
  torch / cpu / triton   the library op with that backend (triton on CUDA only: the
           interpreter is no real code path; cpu where the extension is built)

Sizes: sequences of T = 256 tokens (fewer for the smallest grid point), B*T tokens,
K = 3, C_in = C_out = d. ``pytest bench/bench_conv.py`` runs one tiny point (CI, on
CPU in seconds); CPREC_BENCH_FULL=1 runs B*T in 256..65,536, d in 64, 256, 512,
dilation 1 and 8. Each row records its sizes and the GEMM-equivalent work
(2 * tokens * K * d^2 per conv, x3 with backward) in ``extra_info``, so TFLOP/s is
gemm_flops / mean time; on CUDA also the peak memory.
"""
import functools

import pytest
import torch
from conftest import DEVICE, record, sizes, sync

import cprec_kernels as ck
from cprec_kernels.conv import CAUSAL_CONV1D, CAUSAL_CONV1D_LN_RELU
from cprec_kernels.testing import conv_by_padding, conv_ln_relu_by_modules

TOKENS = sizes([256], [256, 4096, 32768, 65536])
WIDTHS = sizes([64], [64, 256, 512])
DILATIONS = sizes([1], [1, 8])
KERNEL_SIZE = 3
SEQ_LEN = 256
EPS = 1e-8
# Fixed rounds (pytest-benchmark's calibration runs for tens of seconds on a busy CPU).
ROUNDS = sizes(3, 25)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = ("eager", "compile", "torch", "cpu", "triton")
OPS = {"causal_conv1d": CAUSAL_CONV1D, "causal_conv1d_ln_relu": CAUSAL_CONV1D_LN_RELU}


# --------------------------------------------------------------------------------------
# the eager baselines
# --------------------------------------------------------------------------------------
def eager_conv(x, weight, bias, ln_weight, ln_bias, residual, dilation):
    """[B, T, C] -> [B, T, C]: pad a copy on the left, then cuDNN/oneDNN conv1d."""
    return conv_by_padding(x, weight, bias, dilation)


def eager_conv_ln_relu(x, weight, bias, ln_weight, ln_bias, residual, dilation):
    return conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, dilation, EPS, residual)


EAGER = {"causal_conv1d": eager_conv, "causal_conv1d_ln_relu": eager_conv_ln_relu}


@functools.lru_cache(maxsize=None)
def compiled(op: str):
    return torch.compile(EAGER[op])


def library_op(op: str, backend: str):
    def conv(x, weight, bias, ln_weight, ln_bias, residual, dilation):
        return ck.causal_conv1d(x, weight, bias, dilation=dilation, backend=backend)

    def conv_ln_relu(x, weight, bias, ln_weight, ln_bias, residual, dilation):
        return ck.causal_conv1d_ln_relu(
            x, weight, bias, ln_weight, ln_bias, dilation=dilation, eps=EPS, residual=residual, backend=backend
        )

    return conv if op == "causal_conv1d" else conv_ln_relu


def implementation(op: str, impl: str):
    """The callable of a row, or a reason to skip it on this device."""
    if impl == "eager":
        return EAGER[op]
    if impl == "compile":
        return "torch.compile rows run on CUDA only" if DEVICE.type != "cuda" else compiled(op)
    if impl == "triton" and DEVICE.type != "cuda":
        return "Triton rows run on CUDA only (the interpreter is no real code path)"
    if impl in ("cpu", "triton") and OPS[op].kernels(impl) is None:
        return f"the {impl} backend has no {op} here"
    if impl == "cpu" and DEVICE.type != "cpu":
        return "cpu backend rows run on CPU only"
    return library_op(op, impl)


# --------------------------------------------------------------------------------------
# one benchmark row
# --------------------------------------------------------------------------------------
def make_inputs(tokens: int, d: int, requires_grad: bool):
    T = min(SEQ_LEN, tokens)
    B = tokens // T

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, device=DEVICE) * scale
        return t.to(DTYPE).requires_grad_(requires_grad)

    return {
        "x": rand(B, T, d),
        "weight": rand(d, d, KERNEL_SIZE, scale=(d * KERNEL_SIZE) ** -0.5),
        "bias": rand(d),
        "ln_weight": rand(d),
        "ln_bias": rand(d),
        "residual": rand(B, T, d),
    }


def make_step(fn, inputs, dilation: int, backward: bool):
    """A closure running one forward (no autograd graph) or forward+backward, synced."""
    if not backward:

        def forward():
            with torch.no_grad():
                fn(**inputs, dilation=dilation)
            sync()

        return forward
    leaves = list(inputs.values())
    grad = torch.randn(inputs["residual"].shape, device=DEVICE).to(DTYPE)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(**inputs, dilation=dilation).backward(grad)
        sync()

    return forward_backward


@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", list(OPS))
def test_conv(benchmark, op, passes, impl, tokens, d, dilation):
    fn = implementation(op, impl)
    if isinstance(fn, str):
        pytest.skip(fn)
    backward = passes == "fwd+bwd"
    inputs = make_inputs(tokens, d, requires_grad=backward)
    step = make_step(fn, inputs, dilation, backward)
    step()  # compile / JIT / autotune outside the timing
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"{op} {passes} tokens={tokens} d={d} dilation={dilation}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    x = inputs["x"]
    record(
        benchmark, op=op, passes=passes, backend=impl, dtype=str(DTYPE).replace("torch.", ""),
        tokens=tokens, B=x.shape[0], T=x.shape[1], d=d, K=KERNEL_SIZE, dilation=dilation,
        gemm_flops=2 * tokens * KERNEL_SIZE * d * d * (3 if backward else 1),
    )
