"""The cpu backend's conv backward paths (csrc/cpu/conv.cpp, "Backward") against the
eager reference and the padded ``F.conv1d`` + modules oracle.

Both backwards take Winograd (F(4,3) for z and grad_x, F(3,2) for grad_W; K = 3,
C_in and C_out >= 32, B*T >= 64, 2*dilation < T, tiles of 4 overshooting T by at most
a third, as the forward does) or the im2col path (everything else). The cases below sit on
both sides of each of those thresholds, with dilated taps whose shift is inside T,
odd widths (row tails past the 8-lane loops), B = 1 and T = 1. Tolerances: float64
1e-9, float32 1e-4 relative / 1e-5 absolute, as in test_cpu_backend.py.
"""
import importlib

import pytest
import torch

import cprec_kernels as ck
from helpers import assert_all_close, conv_by_padding, conv_ln_relu_by_modules, grads, noncontiguous

try:
    importlib.import_module("cprec_kernels.cpu")
except ModuleNotFoundError:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

from cprec_kernels import cpu, reference  # noqa: E402  (needs the extension)

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}

# (B, T, C_in, C_out, K, dilation) -> the backward's path.
WINOGRAD = [
    (3, 37, 48, 40, 3, 1),  # partial last tiles
    (2, 45, 40, 36, 3, 3),  # dilation not dividing T; shifts 3 and 6 inside T
    (3, 37, 48, 40, 3, 5),  # 120 tile rows for 111
    (3, 37, 48, 40, 3, 4),  # 144 tile rows for 111: under the padding limit (148)
    (1, 64, 33, 35, 3, 1),  # B*T = 64, the smallest Winograd batch; odd widths
    (2, 40, 32, 32, 3, 2),  # C = 32, the narrowest Winograd width
]
IM2COL = [
    (3, 37, 48, 40, 3, 8),  # 192 tile rows for 111: over the backward's padding limit
    (1, 63, 33, 35, 3, 1),  # B*T = 63
    (2, 40, 31, 40, 3, 1),  # C_in = 31
    (2, 40, 40, 31, 3, 1),  # C_out = 31
    (2, 20, 40, 40, 3, 10),  # 2*dilation = T: the oldest tap only reaches past T
    (2, 20, 40, 40, 3, 7),  # one tile per phase: 56 tile rows for 40; shift 7 inside T
    (3, 37, 48, 40, 4, 3),  # K = 4
    (1, 7, 36, 64, 4, 1),  # B*T < C_out (the forward's im2col path too)
    (2, 9, 5, 3, 2, 50),  # every shifted tap past T
    (2, 1, 5, 3, 3, 1),  # T = 1
    (3, 5, 3, 7, 1, 1),  # K = 1
]
CASES = WINOGRAD + IM2COL


def _inputs(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, T, ci, co, K, _ = case

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).mul_(scale).to(dtype)

    return dict(x=rand(B, T, ci), w=rand(co, ci, K, scale=(ci * K) ** -0.5), b=rand(co), lw=rand(co), lb=rand(co),
                res=rand(B, T, co), grad=rand(B, T, co))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_backward_matches_reference_and_modules(dtype, case, affine):
    """Values and every gradient through the public op: cpu vs the eager reference, and
    cpu vs padded F.conv1d + F.layer_norm + relu (an independent formulation)."""
    dil = case[-1]
    t = _inputs(case, dtype, seed=sum(case) + affine)
    lw, lb = (t["lw"], t["lb"]) if affine else (None, None)
    results = []
    for backend in ("cpu", "torch", "modules"):
        leaves = [noncontiguous(v).requires_grad_() if v is not None else None
                  for v in (t["x"], t["w"], t["b"], lw, lb, t["res"])]
        x, w, b, lwl, lbl, res = leaves
        if backend == "modules":
            out = conv_ln_relu_by_modules(x, w, b, lwl, lbl, dil, 1e-5, residual=res)
        else:
            out = ck.causal_conv1d_ln_relu(x, w, b, lwl, lbl, dil, 1e-5, residual=res, backend=backend)
        results.append([out.detach(), *grads((out * t["grad"]).sum(), leaves)])
    cpu_res, torch_res, modules_res = results
    assert_all_close(cpu_res, torch_res, **TOL[dtype])
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)  # modules: another sum order
    assert_all_close(cpu_res, modules_res, **tol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_backward_kernel_noncontiguous(case, with_bias):
    """The C++ backward called directly with strided x, weight, grad and LN params
    (the public op makes them contiguous first), in float64, against the reference."""
    dil = case[-1]
    t = _inputs(case, torch.float64, seed=3 * sum(case) + with_bias)
    b = t["b"] if with_bias else None
    _, mean, rstd = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], b, t["lw"], t["lb"], None, dil, 1e-5)
    nc = [noncontiguous(v) if v is not None else None for v in (t["grad"], t["x"], t["w"], b, t["lw"], t["lb"])]
    got = cpu.causal_conv1d_ln_relu_backward(*nc, mean, rstd, dil, 1e-5)
    want = reference.causal_conv1d_ln_relu_backward(t["grad"], t["x"], t["w"], b, t["lw"], t["lb"], mean, rstd,
                                                    dil, 1e-5)
    assert_all_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_plain_backward_matches_reference_and_padding(dtype, case):
    dil = case[-1]
    t = _inputs(case, dtype, seed=5 * sum(case))
    results = []
    for backend in ("cpu", "torch", "padding"):
        leaves = [noncontiguous(v).requires_grad_() for v in (t["x"], t["w"], t["b"])]
        if backend == "padding":
            out = conv_by_padding(*leaves, dil)
        else:
            out = ck.causal_conv1d(*leaves, dilation=dil, backend=backend)
        results.append([out.detach(), *grads((out * t["res"]).sum(), leaves)])
    assert_all_close(results[0], results[1], **TOL[dtype])
    assert_all_close(results[0], results[2], **(TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)))


@pytest.mark.parametrize("dil", [1, 2, 4])
def test_fused_backward_nextitnet_width_float32(dil):
    """NextItNet's size (d = 256) in float32, against the float64 definition: at this
    width the float32 direct sum of the eager reference itself misses 1e-5 absolute on
    grad_W (sums of 200 rows, entries up to ~100), so the bound is relative to it:
    Winograd's rounding (measured in conv.cpp) stays within 4x its rms error and 10x
    its max error, on every gradient."""
    case = (4, 50, 256, 256, 3, dil)
    t = _inputs(case, torch.float64, seed=dil)
    _, mean, rstd = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], t["b"], t["lw"], t["lb"], None, dil, 1e-5)
    args = [t["grad"], t["x"], t["w"], t["b"], t["lw"], t["lb"], mean, rstd]
    exact = reference.causal_conv1d_ln_relu_backward(*args, dil, 1e-5)
    f32 = [a.float() for a in args]
    got = cpu.causal_conv1d_ln_relu_backward(*f32, dil, 1e-5)
    eager = reference.causal_conv1d_ln_relu_backward(*f32, dil, 1e-5)
    for name, g, e, want in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), got, eager, exact):
        err, floor = (g.double() - want).abs(), (e.double() - want).abs()
        assert err.pow(2).mean().sqrt() <= 4 * floor.pow(2).mean().sqrt(), name
        assert err.max() <= 10 * floor.max(), name


def test_fused_backward_thread_counts_agree():
    """The per-thread partial sums (Winograd grad_W, bias and LN grads) give the same
    gradients, up to rounding, on 1 and 2 threads."""
    case = (3, 41, 64, 64, 3, 3)
    t = _inputs(case, torch.float64, seed=7)
    _, mean, rstd = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], t["b"], t["lw"], t["lb"], None, 3, 1e-5)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(cpu.causal_conv1d_ln_relu_backward(t["grad"], t["x"], t["w"], t["b"], t["lw"], t["lb"],
                                                           mean, rstd, 3, 1e-5))
    finally:
        torch.set_num_threads(threads)
    assert_all_close(runs[0], runs[1], **TOL[torch.float64])
