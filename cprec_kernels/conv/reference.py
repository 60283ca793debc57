"""Eager PyTorch reference of the causal dilated convolution, plain and fused with
LayerNorm + ReLU: the definition, forward and backward (``B`` batch, ``T`` time,
``C`` channels, ``K`` kernel width).

This module is the op's ``torch`` backend; the other backends implement the same
functions with the same signatures and are tested against these. Half and bfloat16
inputs are computed in float32 and cast back, so the reference is the accuracy
ceiling the fused kernels are held to.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._core.tensors import acc_dtype, cast_or_none

Tensor = torch.Tensor


def _shifts(kernel_size: int, dilation: int) -> List[int]:
    # Tap k of the kernel reads x[t - (K-1-k)*dilation]: the last tap is "now".
    return [(kernel_size - 1 - k) * dilation for k in range(kernel_size)]


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """Causal conv as K shifted GEMMs in the dtype of ``x``.  x: [B, T, Ci] -> [B, T, Co]."""
    B, T, _ = x.shape
    y = x.new_zeros(B, T, weight.shape[0])
    for k, s in enumerate(_shifts(weight.shape[2], dilation)):
        if s < T:
            y[:, s:] += x[:, : T - s] @ weight[:, :, k].t()
    if bias is not None:
        y += bias
    return y


def _conv_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, need_bias: bool, dilation: int
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Grads of ``_conv``: the input grad is the anti-causal shifted GEMM."""
    T = x.shape[1]
    grad_x = torch.zeros_like(x)
    grad_w = torch.zeros_like(weight)
    for k, s in enumerate(_shifts(weight.shape[2], dilation)):
        if s < T:
            g = grad_y[:, s:]
            grad_x[:, : T - s] += g @ weight[:, :, k]
            grad_w[:, :, k] = g.reshape(-1, g.shape[-1]).t() @ x[:, : T - s].reshape(-1, x.shape[-1])
    grad_b = grad_y.sum(dim=(0, 1)) if need_bias else None
    return grad_x, grad_w, grad_b


def causal_conv1d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """y[b, t] = sum_k W[:, :, k] @ x[b, t - (K-1-k)*dilation] + bias (zero before t = 0).

    x: [B, T, Ci], weight: [Co, Ci, K], bias: [Co] or None -> y: [B, T, Co].
    """
    a = acc_dtype(x.dtype)
    return _conv(x.to(a), weight.to(a), cast_or_none(bias, a), dilation).to(x.dtype)


def causal_conv1d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """-> (grad_x [B, T, Ci], grad_weight [Co, Ci, K], grad_bias [Co] or None)."""
    a = acc_dtype(x.dtype)
    gx, gw, gb = _conv_backward(grad_y.to(a), x.to(a), weight.to(a), bias is not None, dilation)
    return gx.to(x.dtype), gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype)


def _ln_stats(z: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    mean = z.mean(dim=-1)
    var = (z - mean.unsqueeze(-1)).pow(2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def causal_conv1d_ln_relu_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    residual: Optional[Tensor],
    dilation: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """out = relu(layer_norm(causal_conv1d(x))) (+ residual).

    -> (out [B, T, Co], mean [B, T], rstd [B, T], None); the statistics are in the
    accumulation dtype and are what the backward needs besides the inputs. The last
    entry is the saved z of the op schema: the reference recomputes z instead.
    """
    a = acc_dtype(x.dtype)
    z = _conv(x.to(a), weight.to(a), cast_or_none(bias, a), dilation)
    mean, rstd = _ln_stats(z, eps)
    h = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if ln_weight is not None:
        h = h * ln_weight.to(a)
    if ln_bias is not None:
        h = h + ln_bias.to(a)
    out = torch.relu(h)
    if residual is not None:
        out = out + residual.to(a)
    return out.to(x.dtype), mean, rstd, None


def causal_conv1d_ln_relu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    dilation: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """-> (grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias).

    The residual's grad is ``grad_out`` itself and is not returned. The conv output
    is recomputed from ``x``; only ``mean`` and ``rstd`` come from the forward.
    """
    a = acc_dtype(x.dtype)
    z = _conv(x.to(a), weight.to(a), cast_or_none(bias, a), dilation)
    zhat = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    h = zhat if ln_weight is None else zhat * ln_weight.to(a)
    if ln_bias is not None:
        h = h + ln_bias.to(a)
    g = grad_out.to(a) * (h > 0)
    grad_lnw = (g * zhat).sum(dim=(0, 1)).to(ln_weight.dtype) if ln_weight is not None else None
    grad_lnb = g.sum(dim=(0, 1)).to(ln_bias.dtype) if ln_bias is not None else None
    if ln_weight is not None:
        g = g * ln_weight.to(a)
    # LayerNorm backward: project out the mean and the zhat direction.
    g_z = rstd.unsqueeze(-1) * (
        g - g.mean(dim=-1, keepdim=True) - zhat * (g * zhat).mean(dim=-1, keepdim=True)
    )
    gx, gw, gb = _conv_backward(g_z, x.to(a), weight.to(a), bias is not None, dilation)
    return (
        gx.to(x.dtype),
        gw.to(weight.dtype),
        None if gb is None else gb.to(bias.dtype),
        grad_lnw,
        grad_lnb,
    )
