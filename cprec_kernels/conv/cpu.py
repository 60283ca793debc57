"""The ``cpu`` backend of the causal convolution: thin wrappers over ``csrc/cpu/conv.cpp``
with the signatures of ``cprec_kernels.conv.reference``."""
from __future__ import annotations

from .._core.cpu_extension import compute_dtype, grad_as, ops
from .._core.tensors import cast_or_none


def causal_conv1d_forward(x, weight, bias, dilation):
    a = compute_dtype(x.dtype)
    return ops.causal_conv1d_forward(x.to(a), weight.to(a), cast_or_none(bias, a), int(dilation)).to(x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias, dilation):
    a = compute_dtype(x.dtype)
    gx, gw, gb = ops.causal_conv1d_backward(grad_y.to(a), x.to(a), weight.to(a), cast_or_none(bias, a), int(dilation))
    return gx.to(x.dtype), gw.to(weight.dtype), grad_as(gb, bias)


def causal_conv1d_ln_relu_forward(x, weight, bias, ln_weight, ln_bias, residual, dilation, eps):
    """-> (out, mean, rstd, z): z [B, T, C_out] in the compute dtype, the conv output
    the backward reads instead of recomputing it."""
    a = compute_dtype(x.dtype)
    out, mean, rstd, z = ops.causal_conv1d_ln_relu_forward(
        x.to(a), weight.to(a), cast_or_none(bias, a), cast_or_none(ln_weight, a), cast_or_none(ln_bias, a),
        cast_or_none(residual, a), int(dilation), float(eps),
    )
    return out.to(x.dtype), mean, rstd, z


def causal_conv1d_ln_relu_backward(grad_out, x, weight, bias, ln_weight, ln_bias, mean, rstd, dilation, eps, z=None):
    """z: the forward's z, or None to recompute it from x."""
    a = compute_dtype(x.dtype)
    gx, gw, gb, glw, glb = ops.causal_conv1d_ln_relu_backward(
        grad_out.to(a), x.to(a), weight.to(a), cast_or_none(bias, a), cast_or_none(ln_weight, a),
        cast_or_none(ln_bias, a), mean, rstd, cast_or_none(z, a), int(dilation), float(eps),
    )
    return gx.to(x.dtype), gw.to(weight.dtype), grad_as(gb, bias), grad_as(glw, ln_weight), grad_as(glb, ln_bias)
