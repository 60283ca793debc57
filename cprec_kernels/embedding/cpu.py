"""The ``cpu`` backend of the block-wise embedding: thin wrappers over
``csrc/cpu/embedding.cpp`` with the signatures of ``cprec_kernels.embedding.reference``."""
from __future__ import annotations

from .._core.cpu_extension import casts, compute_dtype, grads_as, ops
from .._core.tensors import nones_to_empty


def blockwise_embedding_forward(ids, weights, projections, cutoffs, padding_idx):
    dtype = weights[0].dtype
    a = compute_dtype(dtype)
    w = casts(weights, a)
    out = ops.blockwise_embedding_forward(ids, w, nones_to_empty(casts(projections, a), w[0]), list(cutoffs), padding_idx)
    return out.to(dtype)


def blockwise_embedding_backward(grad_out, ids, weights, projections, cutoffs, padding_idx):
    a = compute_dtype(weights[0].dtype)
    w = casts(weights, a)
    gw, gp = ops.blockwise_embedding_backward(
        grad_out.to(a), ids, w, nones_to_empty(casts(projections, a), w[0]), list(cutoffs), padding_idx
    )
    return grads_as(gw, weights), grads_as(gp, projections)
