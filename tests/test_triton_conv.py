"""Triton causal dilated convolution, plain and fused with LayerNorm + ReLU (+ residual).

Every case is checked two ways, values and all gradients: against the eager reference
(``backend="torch"``) and against an independent formulation in float64
(``F.conv1d`` on a left-padded input, ``F.layer_norm``, ``relu``). On a machine
without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), so the shapes are tiny; they are chosen to cross block edges (odd
widths, several token blocks, several weight-grad chunks and output tiles).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import cprec_kernels as ck  # noqa: E402
from cprec_kernels import reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-8


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 cases are checked against float64 at 1e-4: on CUDA keep cuDNN's TF32 (on by
    default, which both eager F.conv1d and the triton conv follow) off while they run."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _tensor(*shape, dtype, noncontig=False):
    """A random tensor that requires grad; ``noncontig`` takes every other column of a
    wider one (last-dim stride 2, storage offset 1)."""
    if not noncontig:
        return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()
    wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype, device=DEVICE).requires_grad_()
    out = wide[..., 1::2]
    assert not out.is_contiguous()
    return out


def _inputs(B, T, Ci, Co, K, dtype=torch.float32, bias=True, ln=True, residual=True, noncontig=False):
    """dict of the op's tensor inputs (None where absent); W scaled like nn.Conv1d's init."""
    x = _tensor(B, T, Ci, dtype=dtype, noncontig=noncontig)
    w = (torch.randn(Co, Ci, K, dtype=dtype, device=DEVICE) * (Ci * K) ** -0.5).requires_grad_()
    return {
        "x": x,
        "weight": w,
        "bias": _tensor(Co, dtype=dtype, noncontig=noncontig) if bias else None,
        "ln_weight": (1 + 0.3 * torch.randn(Co, dtype=dtype, device=DEVICE)).requires_grad_() if ln else None,
        "ln_bias": _tensor(Co, dtype=dtype) if ln else None,
        "residual": _tensor(B, T, Co, dtype=dtype, noncontig=noncontig) if residual else None,
    }


def _present(inputs):
    return [t for t in inputs.values() if t is not None]


def _value_and_grads(fn, inputs, seed=1):
    """-> [out, grad of every present input] for a fixed random output grad (drawn in
    float32 whatever the dtype, so runs in different dtypes get the same grad)."""
    out = fn(**inputs)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    grad = torch.randn(out.shape, device=DEVICE, generator=gen).to(out.dtype)
    return [out, *torch.autograd.grad(out, _present(inputs), grad)]


def _padded_conv(x, weight, bias, dilation):
    """The textbook causal conv: pad (K-1)*dilation zeros on the left, F.conv1d, back to [B, T, C]."""
    pad = (weight.shape[2] - 1) * dilation
    return F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation).transpose(1, 2)


def _independent_ln_relu(x, weight, bias, ln_weight, ln_bias, residual, dilation):
    z = _padded_conv(x, weight, bias, dilation)
    out = torch.relu(F.layer_norm(z, (weight.shape[0],), ln_weight, ln_bias, EPS))
    return out if residual is None else out + residual


def _in_float64(inputs):
    """Detached float64 leaf copies of ``inputs`` (None stays None)."""
    return {k: None if t is None else t.detach().double().requires_grad_() for k, t in inputs.items()}


def _assert_all_close(got, want, rtol, atol, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"{what}[{i}]"
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def _assert_near(got, want, tol, what):
    """Half-precision check: max |got - want| within ``tol`` of max |want|, per tensor."""
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g.float() - w.float()).abs().max().item()
        scale = w.float().abs().max().item()
        assert err <= tol * max(scale, 1e-3), f"{what}[{i}]: error {err} vs scale {scale}"


# (B, T, C_in, C_out, K, dilation, options): tiny, odd, and crossing block edges.
LN_CASES = {
    "odd-d-all-inputs": (2, 9, 5, 19, 3, 2, {}),
    "T=1": (1, 1, 8, 16, 3, 1, {}),
    "T-below-receptive-field-dilation-above-T": (2, 3, 6, 5, 3, 4, {}),
    "no-bias-no-ln-affine-no-residual-multi-chunk": (3, 37, 12, 20, 2, 3, dict(bias=False, ln=False, residual=False)),
    "noncontiguous": (2, 11, 7, 9, 3, 1, dict(noncontig=True)),
    "K=1-no-residual": (1, 6, 4, 19, 1, 1, dict(residual=False)),
}

CONV_CASES = {
    "odd-d": (2, 9, 5, 19, 3, 2, {}),
    "T=1-no-bias": (1, 1, 3, 4, 3, 1, dict(bias=False)),
    "dilation-above-T": (2, 3, 6, 7, 3, 5, {}),
    "several-tiles-and-chunks": (3, 37, 70, 130, 2, 3, {}),
    "noncontiguous": (2, 11, 7, 9, 3, 1, dict(noncontig=True)),
}


def _ln_fn(dilation, backend):
    def fn(**t):
        return ck.causal_conv1d_ln_relu(
            t["x"], t["weight"], t["bias"], t["ln_weight"], t["ln_bias"],
            dilation=dilation, eps=EPS, residual=t["residual"], backend=backend,
        )

    return fn


def _conv_fn(dilation, backend):
    def fn(**t):
        return ck.causal_conv1d(t["x"], t["weight"], t["bias"], dilation=dilation, backend=backend)

    return fn


def _conv_inputs(B, T, Ci, Co, K, **options):
    t = _inputs(B, T, Ci, Co, K, ln=False, residual=False, **options)
    return {k: t[k] for k in ("x", "weight", "bias")}


# --------------------------------------------------------------------------------------
# fused conv + LayerNorm + ReLU (+ residual)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(LN_CASES), ids=list(LN_CASES))
def test_conv_ln_relu_float32_matches_reference_and_padded_conv(case):
    B, T, Ci, Co, K, dil, options = LN_CASES[case]
    inputs = _inputs(B, T, Ci, Co, K, **options)
    got = _value_and_grads(_ln_fn(dil, "triton"), inputs)
    want = _value_and_grads(_ln_fn(dil, "torch"), inputs)
    _assert_all_close(got, want, 1e-4, 1e-4, "vs torch backend")
    exact = _value_and_grads(lambda **t: _independent_ln_relu(**t, dilation=dil), _in_float64(inputs))
    _assert_all_close([g.double() for g in got], exact, 1e-4, 1e-4, "vs F.conv1d + F.layer_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["odd-d-all-inputs", "no-bias-no-ln-affine-no-residual-multi-chunk"])
def test_conv_ln_relu_rows_split_over_column_tiles(monkeypatch, case, dtype):
    """Rows wider than the row tile take the two-pass LayerNorm: 16-wide tiles here, so
    Co = 19 and 20 span two tiles, the last one partly padded."""
    from cprec_kernels.triton import conv

    monkeypatch.setattr(conv, "ROW_TILE", 16)
    monkeypatch.setattr(conv, "SPLIT_TILE", 16)
    B, T, Ci, Co, K, dil, options = LN_CASES[case]
    inputs = _inputs(B, T, Ci, Co, K, dtype=dtype, **options)
    got = _value_and_grads(_ln_fn(dil, "triton"), inputs)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    exact = _value_and_grads(lambda **t: _independent_ln_relu(**t, dilation=dil), _in_float64(inputs))
    _assert_all_close([g.double() for g in got], exact, tol, tol, "split rows vs F.conv1d + F.layer_norm")
    args = [None if t is None else t.detach() for t in inputs.values()]
    _, mean, rstd = torch.ops.cprec.causal_conv1d_ln_relu.default(*args, dil, EPS, "triton")
    _, ref_mean, ref_rstd = reference.causal_conv1d_ln_relu_forward(*args, dil, EPS)
    _assert_all_close([mean, rstd], [ref_mean, ref_rstd], tol, tol, "split rows statistics")


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_conv_ln_relu_rows_split_half_precision(monkeypatch, dtype, tol):
    from cprec_kernels.triton import conv

    monkeypatch.setattr(conv, "ROW_TILE", 16)
    monkeypatch.setattr(conv, "SPLIT_TILE", 16)
    inputs = _inputs(2, 9, 24, 40, 3, dtype=dtype)
    got = _value_and_grads(_ln_fn(2, "triton"), inputs)
    _assert_near(got, _value_and_grads(_ln_fn(2, "torch"), inputs), tol, f"{dtype} split rows vs torch backend")


def test_conv_ln_relu_statistics_match_reference():
    inputs = {k: None if t is None else t.detach() for k, t in _inputs(2, 9, 5, 19, 3).items()}
    args = (*inputs.values(), 2, EPS)
    op = torch.ops.cprec.causal_conv1d_ln_relu.default
    out, mean, rstd = op(*args, "triton")
    ref_out, ref_mean, ref_rstd = reference.causal_conv1d_ln_relu_forward(*args)
    assert mean.shape == (2, 9) and mean.dtype == rstd.dtype == torch.float32
    _assert_all_close([out, mean, rstd], [ref_out, ref_mean, ref_rstd], 1e-5, 1e-5, "forward")


def test_conv_ln_relu_float64_is_exact_and_passes_gradcheck():
    inputs = _inputs(2, 7, 5, 9, 3, dtype=torch.float64)
    got = _value_and_grads(_ln_fn(2, "triton"), inputs)
    want = _value_and_grads(_ln_fn(2, "torch"), inputs)
    _assert_all_close(got, want, 1e-10, 1e-10, "float64 vs torch backend")
    _, mean, _ = torch.ops.cprec.causal_conv1d_ln_relu.default(
        *[None if t is None else t.detach() for t in inputs.values()], 2, EPS, "triton"
    )
    assert mean.dtype == torch.float64
    small = _inputs(1, 4, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: _ln_fn(2, "triton")(**dict(zip(small, t))), tuple(small.values()),
                                    fast_mode=True)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_conv_ln_relu_half_precision(dtype, tol):
    inputs = _inputs(2, 9, 24, 40, 3, dtype=dtype)
    got = _value_and_grads(_ln_fn(2, "triton"), inputs)
    assert all(g.dtype == dtype for g in got)
    want = _value_and_grads(_ln_fn(2, "torch"), inputs)
    _assert_near(got, want, tol, f"{dtype} vs torch backend")


def test_conv_ln_relu_backward_is_deterministic():
    inputs = _inputs(3, 37, 12, 20, 2)
    first = _value_and_grads(_ln_fn(3, "triton"), inputs)
    second = _value_and_grads(_ln_fn(3, "triton"), inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_conv_ln_relu_rejects_rows_wider_than_one_program():
    from cprec_kernels.triton.conv import MAX_FUSED_WIDTH

    x = torch.randn(1, 2, 3, device=DEVICE)
    w = torch.randn(MAX_FUSED_WIDTH + 1, 3, 1, device=DEVICE)
    with pytest.raises(ValueError, match="C_out <= "):
        ck.causal_conv1d_ln_relu(x, w, None, None, None, backend="triton")


def test_conv_ln_relu_opcheck():
    inputs = [None if t is None else t.detach() for t in _inputs(1, 5, 3, 4, 3).values()]
    torch.library.opcheck(torch.ops.cprec.causal_conv1d_ln_relu.default, (*inputs, 2, EPS, "triton"))


# --------------------------------------------------------------------------------------
# plain causal conv
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_float32_matches_reference_and_padded_conv(case):
    B, T, Ci, Co, K, dil, options = CONV_CASES[case]
    inputs = _conv_inputs(B, T, Ci, Co, K, **options)
    got = _value_and_grads(_conv_fn(dil, "triton"), inputs)
    want = _value_and_grads(_conv_fn(dil, "torch"), inputs)
    _assert_all_close(got, want, 1e-4, 1e-4, "vs torch backend")
    exact = _value_and_grads(lambda **t: _padded_conv(**t, dilation=dil), _in_float64(inputs))
    _assert_all_close([g.double() for g in got], exact, 1e-4, 1e-4, "vs F.conv1d")


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float64, 1e-12)],
                         ids=["bf16", "fp16", "fp64"])
def test_conv_other_dtypes(dtype, tol):
    inputs = _conv_inputs(2, 9, 24, 40, 3, dtype=dtype)
    got = _value_and_grads(_conv_fn(2, "triton"), inputs)
    assert all(g.dtype == dtype for g in got)
    _assert_near(got, _value_and_grads(_conv_fn(2, "torch"), inputs), tol, f"{dtype} vs torch backend")


def test_conv_opcheck():
    inputs = [t.detach() for t in _conv_inputs(1, 5, 3, 4, 3).values()]
    torch.library.opcheck(torch.ops.cprec.causal_conv1d.default, (*inputs, 2, "triton"))
