"""Causal dilated 1D convolution on channels-last activations, plain and fused with
LayerNorm + ReLU (+ residual): the public ops and their registration.

    causal_conv1d(x, W, b, dilation)[b, t] = sum_k W[:, :, k] @ x[b, t - (K-1-k)*dilation] + b
    causal_conv1d_ln_relu(...) = relu(layer_norm(causal_conv1d(x, W, b, dilation))) (+ residual)

x: [B, T, C_in], W: [C_out, C_in, K] (``nn.Conv1d`` layout), output [B, T, C_out].

The definition is ``reference.py``; ``triton.py`` and ``cpu.py`` are the fused backends,
chosen per call through the backend tables below.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._core.backends import BackendTable, eager_call
from .._core.tensors import acc_dtype, empty_to_none, fake_like, grad_if_given, none_to_empty
from .._core.validation import check_tensor

Tensor = torch.Tensor

# Backend -> the module holding both directions of each conv op.
_MODULES = {
    "torch": "cprec_kernels.conv.reference",
    "triton": "cprec_kernels.conv.triton",
    "cpu": "cprec_kernels.conv.cpu",
}
CAUSAL_CONV1D = BackendTable("causal_conv1d", "causal_conv1d_forward", "causal_conv1d_backward", _MODULES)
CAUSAL_CONV1D_LN_RELU = BackendTable(
    "causal_conv1d_ln_relu", "causal_conv1d_ln_relu_forward", "causal_conv1d_ln_relu_backward", _MODULES
)


# --------------------------------------------------------------------------------------
# causal_conv1d
# --------------------------------------------------------------------------------------
@torch.library.custom_op("cprec::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, backend: str) -> Tensor:
    return CAUSAL_CONV1D.call_forward(backend, x, weight, bias, dilation)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, dilation, backend):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


@torch.library.custom_op("cprec::causal_conv1d_backward", mutates_args=())
def _causal_conv1d_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    gx, gw, gb = CAUSAL_CONV1D.call_backward(backend, grad, x, weight, bias, dilation)
    # A kernel may hand back a grad in its own layout (taps-major weight grad); the
    # schema promises the inputs' layout, which the fake kernel states.
    return gx.contiguous(), gw.contiguous(), none_to_empty(gb, x)


@_causal_conv1d_backward_op.register_fake
def _(grad, x, weight, bias, dilation, backend):
    return torch.empty_like(x), torch.empty_like(weight), fake_like(bias, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, dilation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.dilation, ctx.backend = dilation, backend


def _conv_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = _causal_conv1d_backward_op(grad.contiguous(), x, weight, bias, ctx.dilation, ctx.backend)
    return gx, gw, grad_if_given(gb, bias), None, None


_causal_conv1d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def check_conv_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> None:
    """Raise TypeError (dtype) or ValueError (shape, value) unless the conv inputs fit."""
    check_tensor("x", x, shape=(None, None, None))
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x is an empty batch (shape {list(x.shape)}); B and T must be >= 1")
    check_tensor("weight", weight, shape=(None, x.shape[2], None), dtype=x.dtype, device=x.device)
    if weight.shape[2] < 1:
        raise ValueError(f"weight must have kernel size K >= 1, got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), dtype=x.dtype, device=x.device)
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dilation: int = 1, backend: Optional[str] = None
) -> Tensor:
    """Causal dilated convolution, no padded copy of ``x`` in the fused backends.

    x: [B, T, C_in], weight: [C_out, C_in, K], bias: [C_out] -> [B, T, C_out];
    output t sees inputs t, t - dilation, ..., t - (K-1)*dilation (zeros before 0).
    backend: "auto" | "torch" | "triton" | "cpu" | "cuda" (default: $CPREC_BACKEND or auto).
    """
    check_conv_args(x, weight, bias, dilation)
    name = CAUSAL_CONV1D.resolve(backend, x.device, x.dtype)
    return _causal_conv1d_op(x.contiguous(), weight.contiguous(), bias, dilation, name)


# --------------------------------------------------------------------------------------
# causal_conv1d_ln_relu
# --------------------------------------------------------------------------------------
# Backends whose forward returns z (the conv output before LayerNorm) for the backward
# to read instead of recomputing it; the others return None, an empty z in the schema.
SAVES_Z = ("cpu",)


def _conv_ln_relu_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    residual: Optional[Tensor],
    dilation: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out [B, T, C_out], mean [B, T], rstd [B, T], z [B, T, C_out] or empty).

    z is real on the backends in SAVES_Z, in the accumulation dtype like the statistics:
    one more [B, T, C_out] activation kept per layer for the backward (eager autograd
    keeps the same), which then skips recomputing the convolution.
    """
    out, mean, rstd, z = CAUSAL_CONV1D_LN_RELU.call_forward(
        backend, x, weight, bias, ln_weight, ln_bias, residual, dilation, eps
    )
    return out, mean, rstd, none_to_empty(z, x)


def _conv_ln_relu_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    z: Tensor,
    dilation: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Only a backend in SAVES_Z takes z (as its last argument); an empty z is never
    # passed, so those backends recompute it exactly when the forward kept none.
    saved_z = () if empty_to_none(z) is None else (z,)
    if saved_z and backend not in SAVES_Z:
        raise ValueError(f"the {backend} backend recomputes z and takes none; pass an empty z")
    grads = CAUSAL_CONV1D_LN_RELU.call_backward(
        backend, grad, x, weight, bias, ln_weight, ln_bias, mean, rstd, dilation, eps, *saved_z
    )
    return tuple(none_to_empty(g, x).contiguous() for g in grads)


_conv_ln_relu_op = torch.library.custom_op("cprec::causal_conv1d_ln_relu", mutates_args=())(_conv_ln_relu_forward)
_conv_ln_relu_backward_op = torch.library.custom_op("cprec::causal_conv1d_ln_relu_backward", mutates_args=())(
    _conv_ln_relu_backward
)


@_conv_ln_relu_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, residual, dilation, eps, backend):
    B, T, c_out = x.shape[0], x.shape[1], weight.shape[0]
    stats = x.new_empty(B, T, dtype=acc_dtype(x.dtype))
    z = x.new_empty(B, T, c_out, dtype=acc_dtype(x.dtype)) if backend in SAVES_Z else x.new_empty(0)
    return x.new_empty(B, T, c_out), stats, torch.empty_like(stats), z


@_conv_ln_relu_backward_op.register_fake
def _(grad, x, weight, bias, ln_weight, ln_bias, mean, rstd, z, dilation, eps, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        fake_like(bias, x),
        fake_like(ln_weight, x),
        fake_like(ln_bias, x),
    )


def _ln_setup(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, residual, dilation, eps, backend = inputs
    _, mean, rstd, z = output
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias, mean, rstd, z)
    ctx.has_residual = residual is not None
    ctx.dilation, ctx.eps, ctx.backend = dilation, eps, backend


def _ln_grads(ctx, grad, backward):
    """The input grads from ``backward`` (the op, or its body on the eager path)."""
    x, weight, bias, ln_weight, ln_bias, mean, rstd, z = ctx.saved_tensors
    grad = grad.contiguous()
    gx, gw, gb, glw, glb = backward(
        grad, x, weight, bias, ln_weight, ln_bias, mean, rstd, z, ctx.dilation, ctx.eps, ctx.backend
    )
    g_res = grad if ctx.has_residual else None
    p = grad_if_given
    return gx, gw, p(gb, bias), p(glw, ln_weight), p(glb, ln_bias), g_res, None, None, None


def _ln_backward(ctx, grad, _grad_mean, _grad_rstd, _grad_z):
    return _ln_grads(ctx, grad, _conv_ln_relu_backward_op)


_conv_ln_relu_op.register_autograd(_ln_backward, setup_context=_ln_setup)


class _ConvLnReluFunction(torch.autograd.Function):
    """The same op for eager calls: the forward and backward bodies of the custom ops,
    without their Python dispatch (fill_defaults, redispatch, the autograd wrapper),
    which cost ~0.3 ms a layer, forward + backward: more than the eager reference's
    whole conv layer at small sizes. Compiled code goes through the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, residual, dilation, eps, backend):
        inputs = (x, weight, bias, ln_weight, ln_bias, residual, dilation, eps, backend)
        output = _conv_ln_relu_forward(*inputs)
        _ln_setup(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad):
        return _ln_grads(ctx, grad, _conv_ln_relu_backward)


def causal_conv1d_ln_relu(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    dilation: int = 1,
    eps: float = 1e-8,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """relu(layer_norm(causal_conv1d(x, weight, bias, dilation))) + residual, fused.

    x: [B, T, C_in], weight: [C_out, C_in, K], bias, ln_weight, ln_bias: [C_out] or
    None, residual: [B, T, C_out] or None (added after the ReLU) -> [B, T, C_out].
    LayerNorm runs over C_out with ``eps``; this is NextItNet's conv layer.
    Memory: under autograd the cpu backend keeps the conv output z ([B, T, C_out], as
    the eager reference's autograd does) so its backward need not recompute the conv.
    """
    check_conv_args(x, weight, bias, dilation)
    c_out = weight.shape[0]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            check_tensor(name, t, shape=(c_out,), dtype=x.dtype, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=(x.shape[0], x.shape[1], c_out), dtype=x.dtype, device=x.device)
        residual = residual.contiguous()
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    name = CAUSAL_CONV1D_LN_RELU.resolve(backend, x.device, x.dtype)
    args = (x.contiguous(), weight.contiguous(), bias, ln_weight, ln_bias, residual, dilation, float(eps), name)
    if not eager_call(*args[:6]):
        return _conv_ln_relu_op(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
        return _ConvLnReluFunction.apply(*args)
    return _conv_ln_relu_forward(*args)[0]
