"""The ``cpu`` backend of the causal convolution: thin wrappers over ``csrc/cpu/conv.cpp``
with the signatures of ``cprec_kernels.conv.reference``."""
from __future__ import annotations

from .._core.cpu_extension import casts, compute_dtype, grad_as, grads_as, ops
from .._core.tensors import cast_or_none


def causal_conv1d_forward(x, weight, bias, dilation):
    a = compute_dtype(x.dtype)
    return cast_or_none(ops.causal_conv1d_forward(*casts((x, weight, bias), a), int(dilation)), x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias, dilation):
    a = compute_dtype(x.dtype)
    gx, gw, gb = ops.causal_conv1d_backward(*casts((grad_y, x, weight, bias), a), int(dilation))
    return grad_as(gx, x), grad_as(gw, weight), grad_as(gb, bias)


def causal_conv1d_ln_relu_forward(x, weight, bias, ln_weight, ln_bias, residual, dilation, eps):
    """-> (out, mean, rstd, z): z [B, T, C_out] in the compute dtype, the conv output
    the backward reads instead of recomputing it."""
    a = compute_dtype(x.dtype)
    out, mean, rstd, z = ops.causal_conv1d_ln_relu_forward(
        *casts((x, weight, bias, ln_weight, ln_bias, residual), a), int(dilation), float(eps)
    )
    return cast_or_none(out, x.dtype), mean, rstd, z


def causal_conv1d_ln_relu_backward(grad_out, x, weight, bias, ln_weight, ln_bias, mean, rstd, dilation, eps, z=None):
    """z: the forward's z, or None to recompute it from x."""
    a = compute_dtype(x.dtype)
    gx, gw, gb, glw, glb = ops.causal_conv1d_ln_relu_backward(
        *casts((grad_out, x, weight, bias, ln_weight, ln_bias), a), mean, rstd, cast_or_none(z, a), int(dilation),
        float(eps),
    )
    return grads_as((gx, gw, gb, glw, glb), (x, weight, bias, ln_weight, ln_bias))
