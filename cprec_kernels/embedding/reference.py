"""Eager PyTorch reference of the block-wise factorized embedding: the definition,
forward and backward (``cutoffs = [c1, ..., V]``, ``d`` model width).

This module is the op's ``torch`` backend; the other backends implement the same
functions with the same signatures and are tested against these. Half and bfloat16
inputs are computed in float32 and cast back, so the reference is the accuracy
ceiling the fused kernels are held to.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._core.tensors import acc_dtype, block_bounds

Tensor = torch.Tensor


def _block_rows(flat_ids: Tensor, lo: int, hi: int, padding_idx: Optional[int]) -> Tensor:
    """Positions of ``flat_ids`` that fall in block [lo, hi) and are not padding."""
    mask = (flat_ids >= lo) & (flat_ids < hi)
    if padding_idx is not None:
        mask &= flat_ids != padding_idx
    return mask.nonzero().squeeze(1)


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
    for (lo, hi), table, proj in zip(block_bounds(cutoffs), weights, projections):
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
    for (lo, hi), table, proj in zip(block_bounds(cutoffs), weights, projections):
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
