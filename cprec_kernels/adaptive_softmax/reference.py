"""Eager PyTorch reference of the tail-cluster adaptive softmax (loss, full log-probs,
top-k): the definition, forward and backward (``N`` rows, ``d`` model width, ``V``
vocabulary, ``cutoffs = [c1, ..., V]``).

This module is the op's ``torch`` backend; the other backends implement the same
functions with the same signatures and are tested against these. Half and bfloat16
inputs are computed in float32 and cast back, so the reference is the accuracy
ceiling the fused kernels are held to.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._core.tensors import acc_dtype, block_bounds, cast_or_none, mask_excluded, row_weights

Tensor = torch.Tensor


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
    head_lp = torch.log_softmax(_head_logits(h, head_weight.to(a), cast_or_none(head_bias, a)), dim=-1)
    c1 = cutoffs[0]
    parts = [head_lp[:, :c1]]
    for i, (proj, weight) in enumerate(zip(tail_projections, tail_weights)):
        _, logits = _tail_logits(h, proj.to(a), weight.to(a))
        parts.append(torch.log_softmax(logits, dim=-1) + head_lp[:, c1 + i : c1 + i + 1])
    return torch.cat(parts, dim=1)


def _linear_backward(g_out: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """For out = x @ W^T: -> (grad_x, grad_W)."""
    return g_out @ weight, g_out.t() @ x


def _with_head_grads(g_head, h, hidden, head_weight, head_bias, grad_h, grad_tp, grad_tw) -> tuple:
    """The backward's result once the head's logit grads g_head: [N, c1 + tails] are
    known: grad_h (the tails' share so far) plus the head's, in the input dtypes."""
    g_hh, g_hw = _linear_backward(g_head, h, head_weight.to(h.dtype))
    grad_h += g_hh
    grad_hb = g_head.sum(dim=0).to(head_bias.dtype) if head_bias is not None else None
    return grad_h.to(hidden.dtype), g_hw.to(head_weight.dtype), grad_hb, grad_tp, grad_tw


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
    head_logits = _head_logits(h, head_weight.to(a), cast_or_none(head_bias, a))
    g_head_lp = torch.zeros_like(head_logits)
    g_head_lp[:, :c1] = g[:, :c1]
    grad_h = torch.zeros_like(h)
    grad_tp, grad_tw = [], []
    for i, ((lo, hi), proj, weight) in enumerate(zip(block_bounds(cutoffs)[1:], tail_projections, tail_weights)):
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
    return _with_head_grads(g_head, h, hidden, head_weight, head_bias, grad_h, grad_tp, grad_tw)


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Negative log-likelihood -log p(target | hidden), each tail run on its rows only,
    and the softmax statistics the backward takes instead of recomputing them.

    hidden: [N, d], target: [N] -> (loss, head_lse [N], tail_lse [N]), all in the
    accumulation dtype. loss: [N] (reduction "none"; ignored rows give 0) or a scalar
    ("sum"; "mean" over the rows not ignored). head_lse: log-sum-exp of every row's head
    logits; tail_lse: that of the row's target tail cluster (0 for head targets and
    ignored rows).
    """
    a = acc_dtype(hidden.dtype)
    h = hidden.to(a)
    c1 = cutoffs[0]
    head_logits = _head_logits(h, head_weight.to(a), cast_or_none(head_bias, a))
    head_lse = torch.logsumexp(head_logits, dim=-1)
    keep = target != ignore_index
    head_col = torch.where(keep, target, 0).clone()
    nll = torch.zeros(target.shape[0], dtype=a, device=hidden.device)
    tail_lse = torch.zeros_like(nll)
    for i, ((lo, hi), proj, weight) in enumerate(zip(block_bounds(cutoffs)[1:], tail_projections, tail_weights)):
        rows = ((target >= lo) & (target < hi) & keep).nonzero().squeeze(1)
        head_col[rows] = c1 + i
        _, logits = _tail_logits(h[rows], proj.to(a), weight.to(a))
        tail_lse[rows] = torch.logsumexp(logits, dim=-1)
        nll[rows] = tail_lse[rows] - logits.gather(1, (target[rows] - lo).unsqueeze(1)).squeeze(1)
    nll = (nll + head_lse - head_logits.gather(1, head_col.unsqueeze(1)).squeeze(1)) * keep
    if reduction != "none":
        nll = (nll * row_weights(target, ignore_index, reduction, a)).sum()
    return nll, head_lse, tail_lse


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
    head_lse: Tensor,
    tail_lse: Tensor,
):
    """-> (grad_hidden, grad_head_weight, grad_head_bias, [grad_tail_projection], [grad_tail_weight]).

    d(-log p)/d logits = softmax - onehot, on the head for every row and on tail i
    for its rows, scaled by the reduction's per-row factor; the softmaxes are
    exp(logits - lse) with the forward's statistics head_lse, tail_lse: [N].
    """
    a = acc_dtype(hidden.dtype)
    h = hidden.to(a)
    c1 = cutoffs[0]
    w = grad_loss.to(a) * row_weights(target, ignore_index, reduction, a)
    keep = target != ignore_index
    head_col = torch.where(keep, target, 0).clone()
    grad_h = torch.zeros_like(h)
    grad_tp, grad_tw = [], []
    for i, ((lo, hi), proj, weight) in enumerate(zip(block_bounds(cutoffs)[1:], tail_projections, tail_weights)):
        rows = ((target >= lo) & (target < hi) & keep).nonzero().squeeze(1)
        head_col[rows] = c1 + i
        z, logits = _tail_logits(h[rows], proj.to(a), weight.to(a))
        g_logits = torch.exp(logits - tail_lse[rows].to(a).unsqueeze(1))
        g_logits[torch.arange(rows.numel(), device=rows.device), target[rows] - lo] -= 1
        g_logits *= w[rows].unsqueeze(1)
        g_z, g_w = _linear_backward(g_logits, z, weight.to(a))
        g_hz, g_p = _linear_backward(g_z, h[rows], proj.to(a))
        grad_h.index_add_(0, rows, g_hz)
        grad_tp.append(g_p.to(proj.dtype))
        grad_tw.append(g_w.to(weight.dtype))
    head_logits = _head_logits(h, head_weight.to(a), cast_or_none(head_bias, a))
    g_head = torch.exp(head_logits - head_lse.to(a).unsqueeze(1))
    g_head[torch.arange(h.shape[0], device=h.device), head_col] -= 1
    g_head *= w.unsqueeze(1)
    return _with_head_grads(g_head, h, hidden, head_weight, head_bias, grad_h, grad_tp, grad_tw)


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
