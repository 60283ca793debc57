"""The ``cpu`` backend: thin wrappers over the C++ kernels of ``csrc/cpu``.

Importing this module loads the compiled extension ``cprec_kernels._C``, which
registers the kernels as ``torch.ops.cprec_cpu.*``. When the extension is not built
(``CPREC_NO_EXT=1``, or a checkout that never ran ``python setup.py build_ext``)
the import raises ModuleNotFoundError, which ``backends`` reads as "not available":
``auto`` then falls back to ``torch`` and ``backend="cpu"`` raises RuntimeError.

Every function has the name, signature and return structure of its namesake in
``cprec_kernels.reference``. The C++ schemas have no optional entries in tensor
lists, so None (no projection, no gradient) crosses as an empty tensor both ways.
The kernels run in float32 and float64; half and bfloat16 are computed in float32
and cast back, as the reference does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.cprec_cpu)
except ImportError as err:  # an ABI mismatch is as unusable as an absent build
    raise ModuleNotFoundError(
        "the cprec_kernels C++ extension is not built (run `python setup.py build_ext --inplace` "
        f"or `pip install --no-build-isolation -e .`; CPREC_NO_EXT=1 skips it): {err}",
        name="cprec_kernels._C",
    ) from err

from .reference import acc_dtype

Tensor = torch.Tensor
_ops = torch.ops.cprec_cpu

# Measured slower than the eager reference on an idle 2-core machine (bench/RESULTS.md:
# 294 ms vs 178 ms at N = 4,096, V = 100k, d = 256), so ``auto`` keeps the reference;
# backend="cpu" still runs it.
AUTO_SKIP = frozenset({"adaptive_softmax_loss_forward"})
_NATIVE = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _NATIVE else acc_dtype(dtype)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _casts(ts: Sequence[Optional[Tensor]], dtype: torch.dtype) -> List[Optional[Tensor]]:
    return [_cast(t, dtype) for t in ts]


def _none_to_empty(ts: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    return [like.new_empty(0) if t is None else t for t in ts]


def _empty_to_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


# --------------------------------------------------------------------------------------
# block-wise factorized embedding
# --------------------------------------------------------------------------------------
def blockwise_embedding_forward(ids, weights, projections, cutoffs, padding_idx):
    dtype = weights[0].dtype
    a = _compute_dtype(dtype)
    w = _casts(weights, a)
    out = _ops.blockwise_embedding_forward(ids, w, _none_to_empty(_casts(projections, a), w[0]), list(cutoffs), padding_idx)
    return out.to(dtype)


def blockwise_embedding_backward(grad_out, ids, weights, projections, cutoffs, padding_idx):
    dtype = weights[0].dtype
    a = _compute_dtype(dtype)
    w = _casts(weights, a)
    gw, gp = _ops.blockwise_embedding_backward(
        grad_out.to(a), ids, w, _none_to_empty(_casts(projections, a), w[0]), list(cutoffs), padding_idx
    )
    grad_weights = [g.to(t.dtype) for g, t in zip(gw, weights)]
    grad_projections = [None if p is None else g.to(p.dtype) for g, p in zip(gp, projections)]
    return grad_weights, grad_projections


# --------------------------------------------------------------------------------------
# tail-cluster adaptive softmax
# --------------------------------------------------------------------------------------
def _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights):
    a = _compute_dtype(hidden.dtype)
    return a, (hidden.to(a), head_weight.to(a), _cast(head_bias, a), _casts(tail_projections, a), _casts(tail_weights, a))


def _adaptive_grads_out(grads, hidden, head_weight, head_bias, tail_projections, tail_weights):
    gh, ghw, ghb, gtp, gtw = grads
    return (
        gh.to(hidden.dtype),
        ghw.to(head_weight.dtype),
        None if head_bias is None else ghb.to(head_bias.dtype),
        [g.to(p.dtype) for g, p in zip(gtp, tail_projections)],
        [g.to(w.dtype) for g, w in zip(gtw, tail_weights)],
    )


def adaptive_softmax_loss_forward(
    hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction
):
    _, params = _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    h, *rest = params
    return _ops.adaptive_softmax_loss_forward(h, target, *rest, list(cutoffs), int(ignore_index), reduction)


def adaptive_softmax_loss_backward(
    grad_loss, hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction
):
    _, params = _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    h, *rest = params
    grads = _ops.adaptive_softmax_loss_backward(
        grad_loss, h, target, *rest, list(cutoffs), int(ignore_index), reduction
    )
    return _adaptive_grads_out(grads, hidden, head_weight, head_bias, tail_projections, tail_weights)


def adaptive_log_prob_forward(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs):
    _, params = _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    return _ops.adaptive_log_prob_forward(*params, list(cutoffs))


def adaptive_log_prob_backward(grad, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs):
    _, params = _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    grads = _ops.adaptive_log_prob_backward(grad, *params, list(cutoffs))
    return _adaptive_grads_out(grads, hidden, head_weight, head_bias, tail_projections, tail_weights)


def adaptive_topk_forward(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, exclude):
    """Streaming top-k: item tiles scored and reduced per row, [N, V] never allocated."""
    _, params = _adaptive_in(hidden, head_weight, head_bias, tail_projections, tail_weights)
    return tuple(_ops.adaptive_topk_forward(*params, list(cutoffs), int(k), exclude))


# --------------------------------------------------------------------------------------
# causal dilated convolution
# --------------------------------------------------------------------------------------
def causal_conv1d_forward(x, weight, bias, dilation):
    a = _compute_dtype(x.dtype)
    return _ops.causal_conv1d_forward(x.to(a), weight.to(a), _cast(bias, a), int(dilation)).to(x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias, dilation):
    a = _compute_dtype(x.dtype)
    gx, gw, gb = _ops.causal_conv1d_backward(grad_y.to(a), x.to(a), weight.to(a), _cast(bias, a), int(dilation))
    return gx.to(x.dtype), gw.to(weight.dtype), None if bias is None else gb.to(bias.dtype)


def causal_conv1d_ln_relu_forward(x, weight, bias, ln_weight, ln_bias, residual, dilation, eps):
    a = _compute_dtype(x.dtype)
    out, mean, rstd = _ops.causal_conv1d_ln_relu_forward(
        x.to(a), weight.to(a), _cast(bias, a), _cast(ln_weight, a), _cast(ln_bias, a), _cast(residual, a),
        int(dilation), float(eps),
    )
    return out.to(x.dtype), mean, rstd


def causal_conv1d_ln_relu_backward(grad_out, x, weight, bias, ln_weight, ln_bias, mean, rstd, dilation, eps):
    a = _compute_dtype(x.dtype)
    gx, gw, gb, glw, glb = _ops.causal_conv1d_ln_relu_backward(
        grad_out.to(a), x.to(a), weight.to(a), _cast(bias, a), _cast(ln_weight, a), _cast(ln_bias, a),
        mean, rstd, int(dilation), float(eps),
    )
    return (
        gx.to(x.dtype),
        gw.to(weight.dtype),
        None if bias is None else gb.to(bias.dtype),
        None if ln_weight is None else glw.to(ln_weight.dtype),
        None if ln_bias is None else glb.to(ln_bias.dtype),
    )
