"""The causal dilated convolution, plain and fused with LayerNorm + ReLU (+ residual), on
every backend that runs here (torch, cpu, triton under the interpreter, cuda where
present), on the shared harness: values and every gradient against the reference and
against the padded ``F.conv1d`` (+ ``F.layer_norm``) oracle in float64.

Cases are (B, T, C_in, C_out, K, dilation): odd widths, T = 1, K = 1, shifts past T,
dilated taps whose shift is inside T, and (for the Triton kernels) several token
blocks, weight-grad chunks and output tiles. x is always a strided view; bias and
residual are strided in the odd-numbered cases.
"""
import pytest
import torch

import cprec_kernels as ck
from cprec_kernels import reference
from cprec_kernels.conv import CAUSAL_CONV1D, CAUSAL_CONV1D_LN_RELU, SAVES_Z
from cprec_kernels.testing import conv_by_padding, conv_ln_relu_by_modules
from harness import (
    DEVICE,
    as_leaves,
    assert_all_close,
    backend_dtype_params,
    backend_params,
    check,
    noncontiguous,
    value_and_grads,
)

EPS = 1e-5

CONV_CASES = [
    (2, 7, 5, 3, 3, 1), (1, 1, 4, 4, 3, 2), (3, 5, 3, 6, 2, 8), (2, 9, 7, 7, 1, 1), (3, 7, 5, 6, 3, 2),
    (1, 1, 4, 4, 3, 1), (2, 5, 3, 7, 1, 1), (4, 9, 6, 5, 4, 3), (2, 3, 4, 4, 3, 4), (2, 9, 5, 19, 3, 2),
    (2, 3, 6, 7, 3, 5), (3, 37, 70, 130, 2, 3), (2, 11, 7, 9, 3, 1), (2, 9, 4, 5, 3, 2),
]
# (case, bias, ln affine, residual)
LN_CASES = (
    [((2, T, 5, 7, 3, dil), True, affine, res) for T, dil in [(1, 1), (3, 4), (11, 2)]
     for affine in (True, False) for res in (True, False)]
    + [(case, True, affine, res) for case in CONV_CASES[4:9] for affine, res in [(True, True), (False, False), (True, False)]]
    + [((2, 9, 5, 19, 3, 2), True, True, True), ((1, 1, 8, 16, 3, 1), True, True, True),
       ((2, 3, 6, 5, 3, 4), True, True, True), ((3, 37, 12, 20, 2, 3), False, False, False),
       ((2, 11, 7, 9, 3, 1), True, True, True), ((1, 6, 4, 19, 1, 1), True, True, False)]
)


def _ids(cases):
    return ["-".join(map(str, c if isinstance(c[0], int) else (*c[0], *map(int, c[1:])))) for c in cases]


def test_cases_have_a_dilated_tap_inside_T():
    # A grad_x (or forward) that ignores the dilation agrees with the truth unless some
    # tap with shift (K-1-k)*dilation, dilation > 1, lands inside [1, T).
    assert any(dil > 1 and K > 1 and dil < T for (_, T, _, _, K, dil) in CONV_CASES)
    assert any(dil > 1 and K > 1 and dil < T for ((_, T, _, _, K, dil), *_) in LN_CASES)


def conv_inputs(case, dtype, bias=True, strided=False):
    """x, weight, bias of a case; W scaled like nn.Conv1d's init so outputs are O(1)."""
    B, T, ci, co, K, _ = case
    b = torch.randn(co, dtype=dtype, device=DEVICE) if bias else None
    return {
        "x": noncontiguous(torch.randn(B, T, ci, dtype=dtype, device=DEVICE)),
        "weight": torch.randn(co, ci, K, dtype=dtype, device=DEVICE) * (ci * K) ** -0.5,
        "bias": noncontiguous(b) if strided and b is not None else b,
    }


def ln_inputs(case, dtype, bias=True, affine=True, residual=True, strided=False):
    B, T, _, co, _, _ = case
    inputs = conv_inputs(case, dtype, bias, strided)
    res = torch.randn(B, T, co, dtype=dtype, device=DEVICE) if residual else None
    inputs.update(
        ln_weight=(1 + 0.3 * torch.randn(co, dtype=dtype, device=DEVICE)) if affine else None,
        ln_bias=torch.randn(co, dtype=dtype, device=DEVICE) if affine else None,
        residual=noncontiguous(res) if strided and res is not None else res,
    )
    return inputs


def conv_op(dilation):
    def op(x, weight, bias, backend="torch"):
        return ck.causal_conv1d(x, weight, bias, dilation, backend=backend)

    return op


def ln_op(dilation):
    def op(x, weight, bias, ln_weight, ln_bias, residual, backend="torch"):
        return ck.causal_conv1d_ln_relu(x, weight, bias, ln_weight, ln_bias, dilation, EPS, residual, backend=backend)

    return op


# --------------------------------------------------------------------------------------
# values and gradients, every backend
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D))
@pytest.mark.parametrize("i", range(len(CONV_CASES)), ids=_ids(CONV_CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_causal_conv1d(backend, dtype, i, bias):
    case = CONV_CASES[i]
    inputs = conv_inputs(case, dtype, bias, strided=i % 2 == 1)
    oracle = lambda x, weight, bias: conv_by_padding(x, weight, bias, case[5])  # noqa: E731
    check(conv_op(case[5]), inputs, backend, dtype, oracle)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D_LN_RELU))
@pytest.mark.parametrize("i", range(len(LN_CASES)), ids=_ids(LN_CASES))
def test_causal_conv1d_ln_relu(backend, dtype, i):
    case, bias, affine, residual = LN_CASES[i]
    inputs = ln_inputs(case, dtype, bias, affine, residual, strided=i % 2 == 1)

    def oracle(x, weight, bias, ln_weight, ln_bias, residual):
        return conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, case[5], EPS, residual)

    check(ln_op(case[5]), inputs, backend, dtype, oracle)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D))
def test_causal_conv1d_is_causal(backend):
    x = torch.randn(1, 12, 4, dtype=torch.float32, device=DEVICE)
    w = torch.randn(4, 4, 3, dtype=torch.float32, device=DEVICE)
    y = ck.causal_conv1d(x, w, None, 2, backend=backend)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the future only
    y2 = ck.causal_conv1d(x2, w, None, 2, backend=backend)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU))
def test_conv_ln_relu_statistics_match_reference(backend):
    inputs = {k: None if t is None else t.detach().contiguous()
              for k, t in ln_inputs((2, 9, 5, 19, 3, 2), torch.float32).items()}
    args = (*inputs.values(), 2, EPS)
    out, mean, rstd, z = torch.ops.cprec.causal_conv1d_ln_relu.default(*args, backend)
    want = reference.causal_conv1d_ln_relu_forward(*args)
    assert mean.shape == (2, 9) and mean.dtype == rstd.dtype == torch.float32
    assert_all_close([out, mean, rstd], list(want[:3]), torch.float32, "forward", tol=(1e-5, 1e-5))
    # The saved z is the conv output before LayerNorm, or empty where the backward recomputes it.
    if backend in SAVES_Z:
        want_z = reference.causal_conv1d_forward(*args[:3], 2)
        assert_all_close([z], [want_z], torch.float32, "saved z", tol=(1e-5, 1e-5))
    else:
        assert z.numel() == 0


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D, ["torch", "cpu", "triton"]))
def test_gradcheck_float64(backend):
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(2, 4, 3, dtype=dt, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 3, 3, dtype=dt, device=DEVICE, requires_grad=True)
    b, lw, lb = (torch.randn(3, dtype=dt, device=DEVICE, requires_grad=True) for _ in range(3))
    r = torch.randn(2, 4, 3, dtype=dt, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ck.causal_conv1d(*a, dilation=2, backend=backend), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda *a: ck.causal_conv1d_ln_relu(*a[:5], dilation=1, eps=1e-5, residual=a[5], backend=backend),
        (x, w, b, lw, lb, r), fast_mode=backend == "triton",
    )


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D))
def test_opcheck(backend):
    x = torch.randn(2, 5, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, device=DEVICE, requires_grad=True)
    b, lw, lb = (torch.randn(4, device=DEVICE, requires_grad=True) for _ in range(3))
    r = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    ops = torch.ops.cprec
    torch.library.opcheck(ops.causal_conv1d.default, (x, w, b, 2, backend))
    torch.library.opcheck(ops.causal_conv1d_ln_relu.default, (x, w, b, lw, lb, r, 1, 1e-5, backend))
    torch.library.opcheck(ops.causal_conv1d_ln_relu.default, (x, w, None, None, None, None, 3, 1e-8, backend))
    g = torch.randn(2, 5, 4, device=DEVICE)
    torch.library.opcheck(ops.causal_conv1d_backward.default, (g, x.detach(), w.detach(), None, 1, backend))
    # The fused backward with the forward's z (real on the backends that save it, else empty).
    leaves = [t.detach() for t in (x, w, b, lw, lb)]
    _, mean, rstd, z = ops.causal_conv1d_ln_relu.default(*leaves, None, 1, 1e-5, backend)
    torch.library.opcheck(ops.causal_conv1d_ln_relu_backward.default, (g, *leaves, mean, rstd, z, 1, 1e-5, backend))


# --------------------------------------------------------------------------------------
# half precision (triton; the cpu and torch backends compute it in float32)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D, ["cpu", "triton", "cuda"]))
@pytest.mark.parametrize("dtype, conv_tol, ln_tol", [(torch.bfloat16, 2e-2, 3e-2), (torch.float16, 5e-3, 1e-2)],
                         ids=["bf16", "fp16"])
def test_half_precision_is_near_reference(backend, dtype, conv_tol, ln_tol):
    # Error at most tol * max |reference| per tensor: the dot operands are rounded to
    # the half dtype, so a fixed relative tolerance would be meaningless near zero.
    for op, inputs, tol in ((conv_op(2), conv_inputs((2, 9, 24, 40, 3, 2), dtype), conv_tol),
                            (ln_op(2), ln_inputs((2, 9, 24, 40, 3, 2), dtype), ln_tol)):
        got = value_and_grads(lambda **t: op(**t, backend=backend), as_leaves(inputs))
        assert all(g.dtype == dtype for g in got if g is not None)
        want = value_and_grads(lambda **t: op(**t, backend="torch"), as_leaves(inputs))
        assert_all_close(got, want, dtype, f"{dtype} vs torch", tol=(0.0, tol), scaled=True)


# --------------------------------------------------------------------------------------
# backend-specific paths
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu", "triton", "cuda"]))
def test_backward_is_deterministic(backend):
    inputs = ln_inputs((3, 37, 12, 20, 2, 3), torch.float32, bias=False, affine=False, residual=False)
    first = value_and_grads(ln_op(3), {**as_leaves(inputs), "backend": backend})
    second = value_and_grads(ln_op(3), {**as_leaves(inputs), "backend": backend})
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU))
@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no-grad"])
def test_eager_path_is_the_custom_op(backend, grad_enabled):
    """Eager calls run the op's bodies through an autograd.Function (no custom-op
    dispatch); they must give exactly what the registered op gives, value and grads."""
    inputs = ln_inputs((2, 11, 7, 9, 3, 2), torch.float32, strided=True)
    leaves = as_leaves(inputs)
    upstream = torch.randn(2, 11, 9, device=DEVICE)
    args = (*leaves.values(), 2, EPS, backend)
    with torch.set_grad_enabled(grad_enabled):
        eager = ck.causal_conv1d_ln_relu(*args[:5], 2, EPS, leaves["residual"], backend=backend)
        op = torch.ops.cprec.causal_conv1d_ln_relu(
            *[t.contiguous() if t is not None else None for t in leaves.values()], 2, EPS, backend)[0]
    assert torch.equal(eager, op)
    assert eager.requires_grad == grad_enabled
    if grad_enabled:
        present = [t for t in leaves.values() if t is not None]
        for a, b in zip(torch.autograd.grad((eager * upstream).sum(), present),
                        torch.autograd.grad((op * upstream).sum(), present)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
def test_cpu_scratch_reuse_across_sizes_and_dtypes(backend):
    """The cpu kernels keep per-thread scratch buffers across calls: a call after larger,
    smaller and float64 calls gives bit-for-bit what it gave first."""
    def run(case, dtype, seed, backend=backend):
        torch.manual_seed(seed)
        inputs = as_leaves(ln_inputs(case, dtype))
        out = ck.causal_conv1d_ln_relu(inputs["x"], inputs["weight"], inputs["bias"], inputs["ln_weight"],
                                       inputs["ln_bias"], case[5], EPS, inputs["residual"], backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), list(inputs.values())))

    small, large = (2, 40, 40, 48, 3, 2), (3, 64, 72, 80, 3, 4)  # both Winograd sizes
    first = run(small, torch.float32, 0)
    reference_large = run(large, torch.float64, 1)
    run(large, torch.float32, 1)
    run(small, torch.float64, 0)
    for a, b, c in zip(run(large, torch.float64, 1), reference_large, run(large, torch.float64, 1, "torch")):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)
    for a, b in zip(run(small, torch.float32, 0), first):
        assert torch.equal(a, b)


@pytest.fixture(autouse=True)
def _ieee_float32_on_cuda():
    """float32 cases are checked at float32 tolerances: on CUDA keep cuDNN's TF32 (on by
    default, and followed by eager F.conv1d and the triton conv alike) off while they run."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _split_triton_rows(monkeypatch):
    """Rows wider than the Triton row tile take the two-pass LayerNorm; 16-wide tiles make
    C_out = 19, 20 and 40 span several tiles, the last one partly padded."""
    from cprec_kernels.conv import triton as conv_triton

    monkeypatch.setattr(conv_triton, "ROW_TILE", 16)
    monkeypatch.setattr(conv_triton, "SPLIT_TILE", 16)


SPLIT_CASES = [((2, 9, 5, 19, 3, 2), True, True, True), ((3, 37, 12, 20, 2, 3), False, False, False)]


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D_LN_RELU, ["triton"]))
@pytest.mark.parametrize("i", range(len(SPLIT_CASES)), ids=_ids(SPLIT_CASES))
def test_triton_rows_split_over_column_tiles(monkeypatch, backend, dtype, i):
    _split_triton_rows(monkeypatch)
    case, bias, affine, residual = SPLIT_CASES[i]
    inputs = ln_inputs(case, dtype, bias, affine, residual, strided=True)

    def oracle(x, weight, bias, ln_weight, ln_bias, residual):
        return conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, case[5], EPS, residual)

    check(ln_op(case[5]), inputs, backend, dtype, oracle)
    args = (*(None if t is None else t.detach().contiguous() for t in inputs.values()), case[5], EPS)
    _, mean, rstd, _ = torch.ops.cprec.causal_conv1d_ln_relu.default(*args, backend)
    _, ref_mean, ref_rstd, _ = reference.causal_conv1d_ln_relu_forward(*args)
    assert_all_close([mean, rstd], [ref_mean, ref_rstd], dtype, "split rows statistics")


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["triton"]))
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_triton_rows_split_half_precision(monkeypatch, backend, dtype, tol):
    _split_triton_rows(monkeypatch)
    inputs = ln_inputs((2, 9, 24, 40, 3, 2), dtype)
    got = value_and_grads(lambda **t: ln_op(2)(**t, backend=backend), as_leaves(inputs))
    want = value_and_grads(lambda **t: ln_op(2)(**t, backend="torch"), as_leaves(inputs))
    assert_all_close(got, want, dtype, f"{dtype} split rows vs torch", tol=(0.0, tol), scaled=True)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["triton"]))
def test_triton_rows_wider_than_the_old_cap(backend):
    # The fused kernels once refused C_out > 1024 (whole rows per program); at their real
    # tile sizes such a row takes the two-pass split over 128-wide tiles, the last one
    # holding a single column.
    case = (1, 3, 3, 1025, 2, 1)
    inputs = ln_inputs(case, torch.float64, True, True, True, strided=True)

    def oracle(x, weight, bias, ln_weight, ln_bias, residual):
        return conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, case[5], EPS, residual)

    check(ln_op(case[5]), inputs, backend, torch.float64, oracle)


# The cpu fused forward has three paths: Winograd F(4,3) (K = 3, C_in and C_out >= 32,
# B*T >= 64, 2*dilation < T, tiles of 4 overshooting T by at most a third), one GEMM +
# shifted-row epilogue, or, when B*T < C_out, an im2col GEMM against the weight's own
# layout (the last three cases). These cases are wide enough to take them: sequence
# starts in every tile phase and partial last tiles (T = 37, 45, 31 with dilations 1, 5,
# 3, 2), odd widths (row tails past the 8-lane loops), dilation not dividing T,
# 2*dilation >= T, dilation >= T, K = 4.
FUSED_CASES = [(3, 37, 48, 40, 3, 1), (3, 37, 48, 40, 3, 5), (2, 45, 40, 36, 3, 3), (3, 31, 33, 40, 3, 2),
               (2, 64, 33, 35, 3, 7), (4, 33, 32, 32, 3, 2), (2, 20, 40, 40, 3, 10), (2, 5, 40, 40, 3, 9),
               (3, 37, 48, 40, 4, 3), (2, 40, 36, 44, 2, 50), (1, 13, 33, 40, 3, 2), (1, 7, 36, 64, 4, 1),
               (3, 9, 40, 41, 3, 4), (3, 37, 48, 40, 3, 8),
               # float32 with C_out % 16 == 0 takes the panel GEMM (csrc/cpu/panel_gemm.h) for
               # the forward's products; C_in = 36 and 52 leave 4 rows of the 8 x 8 packing
               # transposes to its scalar tail, and tile counts not divisible by 6 use its
               # partial row tiles.
               (3, 29, 36, 48, 3, 2), (2, 35, 52, 32, 3, 1)]


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
@pytest.mark.parametrize("case", FUSED_CASES, ids=_ids(FUSED_CASES))
@pytest.mark.parametrize("full", [True, False], ids=["bias-affine-residual", "bare"])
def test_cpu_fused_forward_paths(backend, dtype, case, full):
    torch.manual_seed(sum(case))
    inputs = ln_inputs(case, dtype, bias=full, affine=full, residual=full, strided=True)

    def oracle(x, weight, bias, ln_weight, ln_bias, residual):
        return conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, case[5], EPS, residual)

    check(ln_op(case[5]), inputs, backend, dtype, oracle)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
def test_cpu_fused_forward_is_thread_count_invariant(backend):
    # dilation 3 at T = 41: the Winograd path (17% tile padding), whose transformed weights
    # once came from an MKL GEMM with an inner size of 3 that rounded differently on 2 threads.
    from cprec_kernels.conv import cpu

    x, w, b = torch.randn(5, 41, 64), torch.randn(64, 64, 3) / 14, torch.randn(64)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(cpu.causal_conv1d_ln_relu_forward(x, w, b, None, None, x, 3, 1e-5))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
@pytest.mark.parametrize("case", [FUSED_CASES[i] for i in (0, 6, 8, 11)], ids=_ids([FUSED_CASES[i] for i in (0, 6, 8, 11)]))
def test_cpu_fused_backward_with_and_without_saved_z(backend, case):
    # Autograd always hands the cpu backward its forward's z; a direct call without it
    # recomputes z (Winograd pass A, or the im2col GEMM). Both against the reference, in
    # float64, with strided inputs (Winograd and im2col backwards: cases 0, 6 / 8, 11).
    torch.manual_seed(sum(case))
    inputs = {k: None if t is None else noncontiguous(t.detach().to(torch.float64))
              for k, t in ln_inputs(case, torch.float64, residual=False).items()}
    args = (*inputs.values(), case[5], EPS)
    _, mean, rstd, z = torch.ops.cprec.causal_conv1d_ln_relu.default(*args, backend)
    grad = noncontiguous(torch.randn(case[0], case[1], case[3], dtype=torch.float64))
    backward = torch.ops.cprec.causal_conv1d_ln_relu_backward.default
    bwd_args = (grad, *list(inputs.values())[:5])
    want = reference.causal_conv1d_ln_relu_backward(*bwd_args, mean, rstd, case[5], EPS)
    for saved in (noncontiguous(z), z.new_empty(0)):
        got = backward(*bwd_args, mean, rstd, saved, case[5], EPS, backend)
        assert_all_close(list(got), list(want), torch.float64, f"backward, z of {saved.numel()} entries")


# --------------------------------------------------------------------------------------
# cpu backward paths (csrc/cpu/conv.cpp, "Backward")
# --------------------------------------------------------------------------------------
# Both backwards take Winograd (F(4,3) for z and grad_x, F(3,2) for grad_W; K = 3, C_in
# and C_out >= 32, B*T >= 64, 2*dilation < T, tiles of 4 overshooting T by at most a
# third, as the forward does) or the im2col path (everything else). The cases sit on both
# sides of each threshold, with dilated taps whose shift is inside T, odd widths (row
# tails past the 8-lane loops), B = 1 and T = 1.
BWD_WINOGRAD = [
    (3, 37, 48, 40, 3, 1),  # partial last tiles
    (2, 45, 40, 36, 3, 3),  # dilation not dividing T; shifts 3 and 6 inside T
    (3, 37, 48, 40, 3, 5),  # 120 tile rows for 111
    (3, 37, 48, 40, 3, 4),  # 144 tile rows for 111: under the padding limit (148)
    (1, 64, 33, 35, 3, 1),  # B*T = 64, the smallest Winograd batch; odd widths
    (2, 40, 32, 32, 3, 2),  # C = 32, the narrowest Winograd width
    (2, 50, 40, 36, 3, 8),  # phases of 7 and 6: 4 and 3 grad_W tiles (no tile wholly past T)
    # float32 with C_in % 16 == 0: grad_x and grad_W by the panel GEMM (grad_W's rows:
    # C_out = 36 is six whole row tiles, 44 ends in a partial one)
    (2, 41, 48, 36, 3, 2),
    (3, 29, 32, 44, 3, 1),
]
BWD_IM2COL = [
    (3, 37, 48, 40, 3, 8),  # 156 tile rows for 111: over the backward's padding limit (148)
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
BWD_CASES = BWD_WINOGRAD + BWD_IM2COL
# An independent formulation sums in another order: float32 against it gets 1e-3 / 1e-4.
_F32_VS_MODULES = (1e-3, 1e-4)


def _bwd_tensors(case, dtype, seed):
    """x, w, b, LN weight and bias, residual and an upstream gradient, drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    B, T, ci, co, K, _ = case

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).mul_(scale).to(dtype)

    return dict(x=rand(B, T, ci), w=rand(co, ci, K, scale=(ci * K) ** -0.5), b=rand(co), lw=rand(co), lb=rand(co),
                res=rand(B, T, co), grad=rand(B, T, co))


def _out_and_grads(out, upstream, leaves_):
    """[out, then d(sum(out * upstream))/d leaf for each leaf (None where absent or unused)]."""
    present = [t for t in leaves_ if t is not None]
    got = iter(torch.autograd.grad((out * upstream).sum(), present, allow_unused=True))
    return [out.detach()] + [next(got) if t is not None else None for t in leaves_]


def _bwd_tol(dtype, oracle):
    return _F32_VS_MODULES if oracle and dtype == torch.float32 else None


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
@pytest.mark.parametrize("case", BWD_CASES, ids=_ids(BWD_CASES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain-ln"])
def test_cpu_fused_backward_paths(backend, dtype, case, affine):
    """Values and every gradient through the public op: cpu vs the eager reference, and
    cpu vs padded F.conv1d + F.layer_norm + relu (an independent formulation)."""
    dil = case[-1]
    t = _bwd_tensors(case, dtype, seed=sum(case) + affine)
    lw, lb = (t["lw"], t["lb"]) if affine else (None, None)
    results = []
    for which in (backend, "torch", "modules"):
        ls = [noncontiguous(v).requires_grad_() if v is not None else None
              for v in (t["x"], t["w"], t["b"], lw, lb, t["res"])]
        if which == "modules":
            out = conv_ln_relu_by_modules(*ls[:5], dil, EPS, residual=ls[5])
        else:
            out = ck.causal_conv1d_ln_relu(*ls[:5], dil, EPS, residual=ls[5], backend=which)
        results.append(_out_and_grads(out, t["grad"], ls))
    assert_all_close(results[0], results[1], dtype, "cpu vs torch")
    assert_all_close(results[0], results[2], dtype, "cpu vs modules", _bwd_tol(dtype, True))


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
@pytest.mark.parametrize("case", BWD_CASES, ids=_ids(BWD_CASES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_cpu_fused_backward_kernel_noncontiguous(backend, case, with_bias):
    """The C++ backward called directly with strided x, weight, grad and LN params (the
    public op makes them contiguous first), in float64, against the reference."""
    from cprec_kernels.conv import cpu

    dil = case[-1]
    t = _bwd_tensors(case, torch.float64, seed=3 * sum(case) + with_bias)
    b = t["b"] if with_bias else None
    _, mean, rstd, _ = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], b, t["lw"], t["lb"], None, dil, EPS)
    nc = [noncontiguous(v) if v is not None else None for v in (t["grad"], t["x"], t["w"], b, t["lw"], t["lb"])]
    got = cpu.causal_conv1d_ln_relu_backward(*nc, mean, rstd, dil, EPS)
    want = reference.causal_conv1d_ln_relu_backward(t["grad"], t["x"], t["w"], b, t["lw"], t["lb"], mean, rstd,
                                                    dil, EPS)
    assert_all_close(list(got), list(want), torch.float64, "cpu kernel vs reference")


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CAUSAL_CONV1D, ["cpu"]))
@pytest.mark.parametrize("case", BWD_CASES, ids=_ids(BWD_CASES))
def test_cpu_plain_backward_paths(backend, dtype, case):
    dil = case[-1]
    t = _bwd_tensors(case, dtype, seed=5 * sum(case))
    results = []
    for which in (backend, "torch", "padding"):
        ls = [noncontiguous(v).requires_grad_() for v in (t["x"], t["w"], t["b"])]
        if which == "padding":
            out = conv_by_padding(*ls, dil)
        else:
            out = ck.causal_conv1d(*ls, dilation=dil, backend=which)
        results.append(_out_and_grads(out, t["res"], ls))
    assert_all_close(results[0], results[1], dtype, "cpu vs torch")
    assert_all_close(results[0], results[2], dtype, "cpu vs padding", _bwd_tol(dtype, True))


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
@pytest.mark.parametrize("dil", [1, 2, 4])
def test_cpu_fused_backward_nextitnet_width_float32(backend, dil):
    """NextItNet's size (d = 256) in float32, against the float64 definition: at this
    width the float32 direct sum of the eager reference itself misses 1e-5 absolute on
    grad_W (sums of 200 rows, entries up to ~100), so the bound is relative to it:
    Winograd's rounding (measured in conv.cpp) stays within 4x its rms error and 10x
    its max error, on every gradient."""
    from cprec_kernels.conv import cpu

    case = (4, 50, 256, 256, 3, dil)
    t = _bwd_tensors(case, torch.float64, seed=dil)
    _, mean, rstd, _ = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], t["b"], t["lw"], t["lb"], None, dil, EPS)
    args = [t["grad"], t["x"], t["w"], t["b"], t["lw"], t["lb"], mean, rstd]
    exact = reference.causal_conv1d_ln_relu_backward(*args, dil, EPS)
    f32 = [a.float() for a in args]
    got = cpu.causal_conv1d_ln_relu_backward(*f32, dil, EPS)
    eager = reference.causal_conv1d_ln_relu_backward(*f32, dil, EPS)
    for name, g, e, want in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), got, eager, exact):
        err, floor = (g.double() - want).abs(), (e.double() - want).abs()
        assert err.pow(2).mean().sqrt() <= 4 * floor.pow(2).mean().sqrt(), name
        assert err.max() <= 10 * floor.max(), name


@pytest.mark.parametrize("backend", backend_params(CAUSAL_CONV1D_LN_RELU, ["cpu"]))
def test_cpu_fused_backward_thread_counts_agree(backend):
    """The per-thread partial sums (Winograd grad_W, bias and LN grads) give the same
    gradients, up to rounding, on 1 and 2 threads."""
    from cprec_kernels.conv import cpu

    t = _bwd_tensors((3, 41, 64, 64, 3, 3), torch.float64, seed=7)
    _, mean, rstd, _ = reference.causal_conv1d_ln_relu_forward(t["x"], t["w"], t["b"], t["lw"], t["lb"], None, 3, EPS)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(list(cpu.causal_conv1d_ln_relu_backward(t["grad"], t["x"], t["w"], t["b"], t["lw"], t["lb"],
                                                                mean, rstd, 3, EPS)))
    finally:
        torch.set_num_threads(threads)
    assert_all_close(runs[0], runs[1], torch.float64, "1 vs 2 threads")
