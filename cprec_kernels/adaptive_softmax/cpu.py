"""The ``cpu`` backend of the adaptive softmax: thin wrappers over
``csrc/cpu/adaptive_softmax.cpp`` with the signatures of
``cprec_kernels.adaptive_softmax.reference``. The top-k streams item tiles and reduces
them per row; the [N, V] log-probs are never allocated."""
from __future__ import annotations

from .._core.cpu_extension import casts, compute_dtype, grad_as, grads_as, ops
from .._core.tensors import cast_or_none


def _params_in(hidden, head_weight, head_bias, tail_projections, tail_weights):
    a = compute_dtype(hidden.dtype)
    return hidden.to(a), head_weight.to(a), cast_or_none(head_bias, a), casts(tail_projections, a), casts(tail_weights, a)


def _grads_out(grads, hidden, head_weight, head_bias, tail_projections, tail_weights):
    gh, ghw, ghb, gtp, gtw = grads
    return (
        gh.to(hidden.dtype), ghw.to(head_weight.dtype), grad_as(ghb, head_bias),
        grads_as(gtp, tail_projections), grads_as(gtw, tail_weights),
    )


def adaptive_softmax_loss_forward(
    hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction
):
    h, *rest = _params_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    return tuple(ops.adaptive_softmax_loss_stats_forward(h, target, *rest, list(cutoffs), int(ignore_index), reduction))


def adaptive_softmax_loss_backward(
    grad_loss, hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction,
    head_lse, tail_lse,
):
    params = (hidden, head_weight, head_bias, tail_projections, tail_weights)
    h, *rest = _params_in(*params)
    grads = ops.adaptive_softmax_loss_stats_backward(
        grad_loss, h, target, *rest, list(cutoffs), int(ignore_index), reduction, head_lse, tail_lse
    )
    return _grads_out(grads, *params)


def adaptive_softmax_loss_with_grads(
    hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction
):
    """-> (loss, gradients for grad_loss = 1): a scalar loss and its gradients in one pass."""
    params = (hidden, head_weight, head_bias, tail_projections, tail_weights)
    h, *rest = _params_in(*params)
    loss, *grads = ops.adaptive_softmax_loss_with_grads(
        h, target, *rest, list(cutoffs), int(ignore_index), reduction
    )
    return loss, _grads_out(grads, *params)


def adaptive_log_prob_forward(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs):
    return ops.adaptive_log_prob_forward(
        *_params_in(hidden, head_weight, head_bias, tail_projections, tail_weights), list(cutoffs)
    )


def adaptive_log_prob_backward(grad, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs):
    params = (hidden, head_weight, head_bias, tail_projections, tail_weights)
    grads = ops.adaptive_log_prob_backward(grad, *_params_in(*params), list(cutoffs))
    return _grads_out(grads, *params)


def adaptive_topk_forward(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, exclude):
    params = _params_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    return tuple(ops.adaptive_topk_forward(*params, list(cutoffs), int(k), exclude))
