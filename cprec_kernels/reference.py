"""Eager PyTorch references: the definition of every op, forward and backward.

This module is also the ``torch`` backend. Other backends implement the same
functions with the same signatures and are tested against these. Half and bfloat16
inputs are computed in float32 and cast back, so the reference is the accuracy
ceiling the fused kernels are held to.

Notation: ``B`` batch, ``T`` time, ``C`` channels, ``K`` kernel width, ``N`` rows
(tokens), ``d`` model width, ``V`` vocabulary, ``cutoffs = [c1, ..., V]``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# --------------------------------------------------------------------------------------
# causal dilated convolution
# --------------------------------------------------------------------------------------
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
    return _conv(x.to(a), weight.to(a), _up(bias, a), dilation).to(x.dtype)


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

    -> (out [B, T, Co], mean [B, T], rstd [B, T]); the statistics are in the
    accumulation dtype and are what the backward needs besides the inputs.
    """
    a = acc_dtype(x.dtype)
    z = _conv(x.to(a), weight.to(a), _up(bias, a), dilation)
    mean, rstd = _ln_stats(z, eps)
    h = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if ln_weight is not None:
        h = h * ln_weight.to(a)
    if ln_bias is not None:
        h = h + ln_bias.to(a)
    out = torch.relu(h)
    if residual is not None:
        out = out + residual.to(a)
    return out.to(x.dtype), mean, rstd


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
    z = _conv(x.to(a), weight.to(a), _up(bias, a), dilation)
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


# --------------------------------------------------------------------------------------
# block-wise factorized embedding
# --------------------------------------------------------------------------------------
def _block_rows(flat_ids: Tensor, lo: int, hi: int, padding_idx: Optional[int]) -> Tensor:
    """Positions of ``flat_ids`` that fall in block [lo, hi) and are not padding."""
    mask = (flat_ids >= lo) & (flat_ids < hi)
    if padding_idx is not None:
        mask &= flat_ids != padding_idx
    return mask.nonzero().squeeze(1)


def _bounds(cutoffs: Sequence[int]) -> List[Tuple[int, int]]:
    edges = [0] + list(cutoffs)
    return list(zip(edges[:-1], edges[1:]))


def embedding_dim(weights: Sequence[Tensor], projections: Sequence[Optional[Tensor]]) -> int:
    """Output width d: the head projection's rows, else the head table's width."""
    return projections[0].shape[0] if projections[0] is not None else weights[0].shape[1]


def blockwise_embedding_forward(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tensor:
    """out[n] = E_j[id_n - c_j] @ P_j^T for the block j holding id_n; zeros for padding.

    ids: any shape, weights[j]: [c_{j+1}-c_j, d_j], projections[j]: [d, d_j] or None
    -> out: [*ids.shape, d] in the tables' dtype. This is the eager block loop
    (a mask, a lookup, a matmul and a scatter per block).
    """
    flat = ids.reshape(-1)
    a = acc_dtype(weights[0].dtype)
    out = torch.zeros(flat.numel(), embedding_dim(weights, projections), dtype=a, device=ids.device)
    for (lo, hi), table, proj in zip(_bounds(cutoffs), weights, projections):
        rows = _block_rows(flat, lo, hi, padding_idx)
        vectors = table[flat[rows] - lo].to(a)
        out[rows] = vectors if proj is None else vectors @ proj.to(a).t()
    return out.to(weights[0].dtype).reshape(*ids.shape, -1)


def blockwise_embedding_backward(
    grad_out: Tensor,
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """-> (grads of the tables, grads of the projections; None where a projection is None)."""
    flat = ids.reshape(-1)
    a = acc_dtype(weights[0].dtype)
    g = grad_out.reshape(flat.numel(), -1).to(a)
    grad_weights, grad_projections = [], []
    for (lo, hi), table, proj in zip(_bounds(cutoffs), weights, projections):
        rows = _block_rows(flat, lo, hi, padding_idx)
        local = flat[rows] - lo
        g_rows = g[rows]
        if proj is None:
            grad_projections.append(None)
        else:
            grad_projections.append((g_rows.t() @ table[local].to(a)).to(proj.dtype))
            g_rows = g_rows @ proj.to(a)
        grad_table = torch.zeros(table.shape, dtype=a, device=table.device)
        grad_table.index_add_(0, local, g_rows)
        grad_weights.append(grad_table.to(table.dtype))
    return grad_weights, grad_projections


# --------------------------------------------------------------------------------------
# tail-cluster adaptive softmax
# --------------------------------------------------------------------------------------
def _head_logits(hidden: Tensor, head_weight: Tensor, head_bias: Optional[Tensor]) -> Tensor:
    return F.linear(hidden, head_weight, head_bias)


def _tail_logits(hidden: Tensor, projection: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """-> (low-rank code z = h @ Q^T [n, d_i], logits z @ F^T [n, V_i])."""
    z = hidden @ projection.t()
    return z, z @ weight.t()


def adaptive_log_prob_forward(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
) -> Tensor:
    """log p(v | h) for every item v.  hidden: [N, d] -> [N, V] in the accumulation dtype.

    Head items: log_softmax(head)[v]; item v of tail i:
    log_softmax(head)[c1 + i] + log_softmax(tail_i)[v - c_{i+1}].
    """
    a = acc_dtype(hidden.dtype)
    h = hidden.to(a)
    head_lp = torch.log_softmax(_head_logits(h, head_weight.to(a), _up(head_bias, a)), dim=-1)
    c1 = cutoffs[0]
    parts = [head_lp[:, :c1]]
    for i, (proj, weight) in enumerate(zip(tail_projections, tail_weights)):
        _, logits = _tail_logits(h, proj.to(a), weight.to(a))
        parts.append(torch.log_softmax(logits, dim=-1) + head_lp[:, c1 + i : c1 + i + 1])
    return torch.cat(parts, dim=1)


def _linear_backward(g_out: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """For out = x @ W^T: -> (grad_x, grad_W)."""
    return g_out @ weight, g_out.t() @ x


def adaptive_log_prob_backward(
    grad: Tensor,
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
):
    """grad: [N, V] -> (grad_hidden, grad_head_weight, grad_head_bias,
    [grad_tail_projection], [grad_tail_weight])."""
    a = acc_dtype(hidden.dtype)
    h, g = hidden.to(a), grad.to(a)
    c1 = cutoffs[0]
    head_logits = _head_logits(h, head_weight.to(a), _up(head_bias, a))
    g_head_lp = torch.zeros_like(head_logits)
    g_head_lp[:, :c1] = g[:, :c1]
    grad_h = torch.zeros_like(h)
    grad_tp, grad_tw = [], []
    for i, ((lo, hi), proj, weight) in enumerate(zip(_bounds(cutoffs)[1:], tail_projections, tail_weights)):
        g_tail = g[:, lo:hi]
        g_head_lp[:, c1 + i] = g_tail.sum(dim=1)
        z, logits = _tail_logits(h, proj.to(a), weight.to(a))
        g_logits = g_tail - torch.softmax(logits, dim=-1) * g_tail.sum(dim=1, keepdim=True)
        g_z, g_w = _linear_backward(g_logits, z, weight.to(a))
        g_hz, g_p = _linear_backward(g_z, h, proj.to(a))
        grad_h += g_hz
        grad_tp.append(g_p.to(proj.dtype))
        grad_tw.append(g_w.to(weight.dtype))
    g_head = g_head_lp - torch.softmax(head_logits, dim=-1) * g_head_lp.sum(dim=1, keepdim=True)
    g_hh, g_hw = _linear_backward(g_head, h, head_weight.to(a))
    grad_h += g_hh
    grad_hb = g_head.sum(dim=0).to(head_bias.dtype) if head_bias is not None else None
    return grad_h.to(hidden.dtype), g_hw.to(head_weight.dtype), grad_hb, grad_tp, grad_tw


def _row_weights(target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """Per-row factor of the reduction: 1 (none/sum) or 1/count (mean), 0 for ignored rows.

    An all-ignored batch has mean 0 (not nan as in F.cross_entropy), so a batch of
    pure padding cannot poison training.
    """
    keep = (target != ignore_index).to(dtype)
    if reduction == "mean":
        keep = keep / keep.sum().clamp(min=1)
    return keep


def adaptive_softmax_loss_forward(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int,
    reduction: str,
) -> Tensor:
    """Negative log-likelihood -log p(target | hidden), each tail run on its rows only.

    hidden: [N, d], target: [N] -> [N] (reduction "none"; ignored rows give 0) or a
    scalar ("sum"; "mean" over the rows not ignored), in the accumulation dtype.
    """
    a = acc_dtype(hidden.dtype)
    h = hidden.to(a)
    c1 = cutoffs[0]
    head_lp = torch.log_softmax(_head_logits(h, head_weight.to(a), _up(head_bias, a)), dim=-1)
    keep = target != ignore_index
    head_col = torch.where(keep, target, 0).clone()
    nll = torch.zeros(target.shape[0], dtype=a, device=hidden.device)
    for i, ((lo, hi), proj, weight) in enumerate(zip(_bounds(cutoffs)[1:], tail_projections, tail_weights)):
        rows = ((target >= lo) & (target < hi) & keep).nonzero().squeeze(1)
        head_col[rows] = c1 + i
        _, logits = _tail_logits(h[rows], proj.to(a), weight.to(a))
        nll[rows] = -torch.log_softmax(logits, dim=-1).gather(1, (target[rows] - lo).unsqueeze(1)).squeeze(1)
    nll = (nll - head_lp.gather(1, head_col.unsqueeze(1)).squeeze(1)) * keep
    if reduction == "none":
        return nll
    return (nll * _row_weights(target, ignore_index, reduction, a)).sum()


def adaptive_softmax_loss_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int,
    reduction: str,
):
    """-> (grad_hidden, grad_head_weight, grad_head_bias, [grad_tail_projection], [grad_tail_weight]).

    d(-log p)/d logits = softmax - onehot, on the head for every row and on tail i
    for its rows, scaled by the reduction's per-row factor.
    """
    a = acc_dtype(hidden.dtype)
    h = hidden.to(a)
    c1 = cutoffs[0]
    w = grad_loss.to(a) * _row_weights(target, ignore_index, reduction, a)
    keep = target != ignore_index
    head_col = torch.where(keep, target, 0).clone()
    grad_h = torch.zeros_like(h)
    grad_tp, grad_tw = [], []
    for i, ((lo, hi), proj, weight) in enumerate(zip(_bounds(cutoffs)[1:], tail_projections, tail_weights)):
        rows = ((target >= lo) & (target < hi) & keep).nonzero().squeeze(1)
        head_col[rows] = c1 + i
        z, logits = _tail_logits(h[rows], proj.to(a), weight.to(a))
        g_logits = torch.softmax(logits, dim=-1)
        g_logits[torch.arange(rows.numel(), device=rows.device), target[rows] - lo] -= 1
        g_logits *= w[rows].unsqueeze(1)
        g_z, g_w = _linear_backward(g_logits, z, weight.to(a))
        g_hz, g_p = _linear_backward(g_z, h[rows], proj.to(a))
        grad_h.index_add_(0, rows, g_hz)
        grad_tp.append(g_p.to(proj.dtype))
        grad_tw.append(g_w.to(weight.dtype))
    head_logits = _head_logits(h, head_weight.to(a), _up(head_bias, a))
    g_head = torch.softmax(head_logits, dim=-1)
    g_head[torch.arange(h.shape[0], device=h.device), head_col] -= 1
    g_head *= w.unsqueeze(1)
    g_hh, g_hw = _linear_backward(g_head, h, head_weight.to(a))
    grad_h += g_hh
    grad_hb = g_head.sum(dim=0).to(head_bias.dtype) if head_bias is not None else None
    return grad_h.to(hidden.dtype), g_hw.to(head_weight.dtype), grad_hb, grad_tp, grad_tw


def adaptive_topk_forward(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    k: int,
    exclude: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The k most likely items per row: (log_probs [N, k], ids [N, k] int64), best first.

    exclude: [N, m] ids never returned for that row; negative entries are padding.
    This reference materialises the [N, V] log-probs; the fused backends do not.
    """
    lp = adaptive_log_prob_forward(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs)
    if exclude is not None and exclude.numel() > 0:
        lp = mask_excluded(lp, exclude)
    return torch.topk(lp, k, dim=1)


def mask_excluded(scores: Tensor, exclude: Tensor) -> Tensor:
    """scores: [N, V] with -inf at each row's excluded ids; exclude: [N, m], negatives skipped."""
    V = scores.shape[1]
    # Padding entries are sent to an extra column that is dropped afterwards.
    index = torch.where(exclude >= 0, exclude, V).long()
    padded = F.pad(scores, (0, 1))
    return padded.scatter(1, index, float("-inf"))[:, :V]
