"""Tail-cluster adaptive softmax (Grave et al. 2017; CpRec's output layer): the public
ops (loss, full log-probs, top-k) and their registration.

The head scores the c1 most frequent items plus one token per tail cluster; tail i
scores its items with the low-rank product (h @ Q_i^T) @ F_i^T:

    log p(v) = log_softmax(head)[v]                                    v < c1
    log p(v) = log_softmax(head)[c1 + i] + log_softmax(tail_i)[v - c_{i+1}]   v in tail i

Weight layouts are those of ``torch.nn.AdaptiveLogSoftmaxWithLoss``: head_weight =
``head.weight`` [c1 + n_tails, d], head_bias = ``head.bias`` or None,
tail_projections[i] = ``tail[i][0].weight`` [d_i, d], tail_weights[i] =
``tail[i][1].weight`` [c_{i+2} - c_{i+1}, d_i]; cutoffs = [c1, ..., V].

The definition is ``reference.py``; ``triton.py`` and ``cpu.py`` are the fused
backends, chosen per call through the backend tables below.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._core.backends import BackendTable
from .._core.tensors import acc_dtype, fake_like, grad_if_given, none_to_empty
from .._core.tensors import mask_excluded  # noqa: F401  (public: callers mask scores the top-k way)
from .._core.validation import INDEX_DTYPES, check_cutoffs, check_ids_in_range, check_tensor

Tensor = torch.Tensor
REDUCTIONS = ("mean", "sum", "none")

# Backend -> the module holding both directions of each adaptive softmax op.
_MODULES = {
    "torch": "cprec_kernels.adaptive_softmax.reference",
    "triton": "cprec_kernels.adaptive_softmax.triton",
    "cpu": "cprec_kernels.adaptive_softmax.cpu",
}
# ``auto`` picks the cpu loss: on a quiet 2-core machine (N = 4,096, V = 100k, d = 256,
# forward + backward, gradients formed in the forward, products on the kernels' own GEMM)
# it measured 1.64x (1 thread) and 1.71x (2 threads) ``nn.AdaptiveLogSoftmaxWithLoss``
# (bench/RESULTS.md, issue 19).
ADAPTIVE_SOFTMAX_LOSS = BackendTable(
    "adaptive_softmax_loss", "adaptive_softmax_loss_forward", "adaptive_softmax_loss_backward", _MODULES
)
ADAPTIVE_LOG_PROB = BackendTable("adaptive_log_prob", "adaptive_log_prob_forward", "adaptive_log_prob_backward", _MODULES)
# The selected log-probs are entries of the full matrix, so the top-k's backward is
# the log-prob backward of the same backend.
ADAPTIVE_TOPK = BackendTable("adaptive_topk", "adaptive_topk_forward", "adaptive_log_prob_backward", _MODULES)


def _grads_out(grads, hidden):
    gh, ghw, ghb, gtp, gtw = grads
    return gh, ghw, none_to_empty(ghb, hidden), list(gtp), list(gtw)


def _fake_grads(hidden, head_weight, head_bias, tail_projections, tail_weights):
    return (
        torch.empty_like(hidden),
        torch.empty_like(head_weight),
        fake_like(head_bias, hidden),
        [torch.empty_like(p) for p in tail_projections],
        [torch.empty_like(w) for w in tail_weights],
    )


def _unpack_params(ctx):
    hidden, head_weight, head_bias, *rest = ctx.saved_tensors
    n = ctx.n_tails
    return hidden, head_weight, head_bias, rest[:n], rest[n : 2 * n], rest[2 * n :]


def _save_params(ctx, hidden, head_weight, head_bias, tail_projections, tail_weights, *extra):
    ctx.save_for_backward(hidden, head_weight, head_bias, *tail_projections, *tail_weights, *extra)
    ctx.n_tails = len(tail_weights)


def _param_grads(grads, head_bias):
    gh, ghw, ghb, gtp, gtw = grads
    return gh, ghw, grad_if_given(ghb, head_bias), gtp, gtw


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------
@torch.library.custom_op("cprec::adaptive_softmax_loss", mutates_args=())
def _loss_op(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    ignore_index: int,
    reduction: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (loss, head_lse [N], tail_lse [N]): the statistics are saved for the backward."""
    check_ids_in_range("target", target, cutoffs[-1], ignore=ignore_index)
    return ADAPTIVE_SOFTMAX_LOSS.call_forward(
        backend,
        hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction,
    )


@_loss_op.register_fake
def _(hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction, backend):
    shape = (hidden.shape[0],) if reduction == "none" else ()
    a = acc_dtype(hidden.dtype)
    return hidden.new_empty(shape, dtype=a), hidden.new_empty(hidden.shape[0], dtype=a), hidden.new_empty(
        hidden.shape[0], dtype=a
    )


@torch.library.custom_op("cprec::adaptive_softmax_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: Tensor,
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    ignore_index: int,
    reduction: str,
    head_lse: Tensor,
    tail_lse: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    grads = ADAPTIVE_SOFTMAX_LOSS.call_backward(
        backend,
        grad, hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction,
        head_lse, tail_lse,
    )
    return _grads_out(grads, hidden)


@_loss_backward_op.register_fake
def _(grad, hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction,
      head_lse, tail_lse, backend):
    return _fake_grads(hidden, head_weight, head_bias, tail_projections, tail_weights)


def _loss_setup(ctx, inputs, output):
    hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction, backend = inputs
    _, head_lse, tail_lse = output
    # Their true gradients are never formed: a caller must not differentiate them.
    ctx.mark_non_differentiable(head_lse, tail_lse)
    _save_params(ctx, hidden, head_weight, head_bias, tail_projections, tail_weights, target, head_lse, tail_lse)
    ctx.cutoffs, ctx.ignore_index, ctx.reduction, ctx.backend = cutoffs, ignore_index, reduction, backend


def _loss_backward(ctx, grad, _grad_head_lse, _grad_tail_lse):
    hidden, head_weight, head_bias, tail_projections, tail_weights, (target, head_lse, tail_lse) = _unpack_params(ctx)
    grads = _loss_backward_op(
        grad.contiguous(), hidden, target, head_weight, head_bias, tail_projections, tail_weights,
        ctx.cutoffs, ctx.ignore_index, ctx.reduction, head_lse, tail_lse, ctx.backend,
    )
    gh, ghw, ghb, gtp, gtw = _param_grads(grads, head_bias)
    return gh, None, ghw, ghb, gtp, gtw, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# --------------------------------------------------------------------------------------
# the scalar loss with its gradients formed in the same pass
# --------------------------------------------------------------------------------------
# A backend may offer ``adaptive_softmax_loss_with_grads``: a mean or sum loss and its
# gradients for grad_loss = 1, computed while the logits are at hand, as Liger-Kernel's
# fused linear cross-entropy does. Training then never recomputes the head logits (a third
# of the head's GEMM work, and the whole step's largest GEMM at V = 1M); the backward
# only scales the saved gradients. ``adaptive_softmax_loss`` takes it when gradients are
# needed and the backend has it (today: cpu).
WITH_GRADS = "adaptive_softmax_loss_with_grads"


@torch.library.custom_op("cprec::adaptive_softmax_loss_with_grads", mutates_args=())
def _loss_with_grads_op(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    ignore_index: int,
    reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    """-> (loss [], then d loss / d (hidden, head_weight, head_bias (empty when None),
    tail_projections, tail_weights))."""
    check_ids_in_range("target", target, cutoffs[-1], ignore=ignore_index)
    with_grads = ADAPTIVE_SOFTMAX_LOSS.optional(backend, WITH_GRADS)
    if with_grads is None:
        raise RuntimeError(f"backend {backend!r} has no {WITH_GRADS}")
    loss, grads = with_grads(
        hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction
    )
    return (loss, *_grads_out(grads, hidden))


@_loss_with_grads_op.register_fake
def _(hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index, reduction, backend):
    loss = hidden.new_empty((), dtype=acc_dtype(hidden.dtype))
    return (loss, *_fake_grads(hidden, head_weight, head_bias, tail_projections, tail_weights))


def _loss_with_grads_setup(ctx, inputs, output):
    head_bias = inputs[3]
    _, gh, ghw, ghb, gtp, gtw = output
    ctx.mark_non_differentiable(gh, ghw, ghb, *gtp, *gtw)
    ctx.save_for_backward(gh, ghw, ghb, *gtp, *gtw)
    ctx.n_tails, ctx.has_bias = len(gtw), head_bias is not None


def _loss_with_grads_backward(ctx, grad, *_grads_of_grads):
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients carry no second derivatives
        raise RuntimeError(
            "adaptive_softmax_loss: the cpu training loss has no double backward; compute it with "
            "backend='torch' to differentiate its gradients"
        )
    gh, ghw, ghb, *rest = (g * grad for g in ctx.saved_tensors)
    n = ctx.n_tails
    return gh, None, ghw, ghb if ctx.has_bias else None, rest[:n], rest[n:], None, None, None, None


_loss_with_grads_op.register_autograd(_loss_with_grads_backward, setup_context=_loss_with_grads_setup)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------
# full log-probabilities
# --------------------------------------------------------------------------------------
@torch.library.custom_op("cprec::adaptive_log_prob", mutates_args=())
def _log_prob_op(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    backend: str,
) -> Tensor:
    return ADAPTIVE_LOG_PROB.call_forward(backend, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs)


@_log_prob_op.register_fake
def _(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, backend):
    return hidden.new_empty(hidden.shape[0], cutoffs[-1], dtype=acc_dtype(hidden.dtype))


@torch.library.custom_op("cprec::adaptive_log_prob_backward", mutates_args=())
def _log_prob_backward_op(
    grad: Tensor,
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    grads = ADAPTIVE_LOG_PROB.call_backward(
        backend,
        grad, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs,
    )
    return _grads_out(grads, hidden)


@_log_prob_backward_op.register_fake
def _(grad, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, backend):
    return _fake_grads(hidden, head_weight, head_bias, tail_projections, tail_weights)


def _params_setup(ctx, inputs, *extra):
    hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, *_, backend = inputs
    _save_params(ctx, hidden, head_weight, head_bias, tail_projections, tail_weights, *extra)
    ctx.cutoffs, ctx.backend = cutoffs, backend


def _log_prob_setup(ctx, inputs, output):
    _params_setup(ctx, inputs)


def _log_prob_grads(ctx, grad_lp):
    hidden, head_weight, head_bias, tail_projections, tail_weights, _ = _unpack_params(ctx)
    grads = _log_prob_backward_op(
        grad_lp.contiguous(), hidden, head_weight, head_bias, tail_projections, tail_weights, ctx.cutoffs, ctx.backend
    )
    return _param_grads(grads, head_bias)


def _log_prob_backward(ctx, grad):
    return *_log_prob_grads(ctx, grad), None, None


_log_prob_op.register_autograd(_log_prob_backward, setup_context=_log_prob_setup)


# --------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------
@torch.library.custom_op("cprec::adaptive_topk", mutates_args=())
def _topk_op(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: List[Tensor],
    tail_weights: List[Tensor],
    cutoffs: List[int],
    k: int,
    exclude: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    num_items = cutoffs[-1]
    if exclude is None:
        return ADAPTIVE_TOPK.call_forward(
            backend, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, None
        )
    # V is the padding id of the embedding, so histories used as ``exclude`` carry it:
    # it is padding here too, like the negative entries the backends already skip.
    check_ids_in_range("exclude", exclude, num_items + 1, allow_negative=True)
    exclude = torch.where(exclude == num_items, -1, exclude)
    values, ids = ADAPTIVE_TOPK.call_forward(
        backend, hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, exclude
    )
    # Past the items a row has left, backends differ in which -inf entries they pick
    # (excluded ids among them): those slots are defined as id -1, score -inf.
    missing = torch.arange(k, device=ids.device) >= _items_left(exclude, num_items)[:, None]
    return values.masked_fill(missing, float("-inf")), ids.masked_fill(missing, -1)


def _items_left(exclude: Tensor, num_items: int) -> Tensor:
    """exclude: [N, m] ids in [0, V) or negative padding -> [N] int64: V minus the number
    of distinct ids each row excludes (an id may be listed twice)."""
    ordered = exclude.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return num_items - ((ordered >= 0) & first).sum(dim=1)


@_topk_op.register_fake
def _(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, exclude, backend):
    values = hidden.new_empty(hidden.shape[0], k, dtype=acc_dtype(hidden.dtype))
    return values, hidden.new_empty(hidden.shape[0], k, dtype=torch.int64)


def _topk_setup(ctx, inputs, output):
    _, ids = output
    _params_setup(ctx, inputs, ids)


def _topk_backward(ctx, grad_values, _grad_ids):
    # The selected log-probs are entries of the full matrix: scatter their grads
    # into it and reuse the log-prob backward.
    # Missing slots (id -1, score -inf) select nothing: their grads go nowhere.
    ids = ctx.saved_tensors[-1]
    missing = ids < 0
    grad_lp = grad_values.new_zeros(grad_values.shape[0], ctx.cutoffs[-1]).scatter_add(
        1, ids.masked_fill(missing, 0), grad_values.masked_fill(missing, 0)
    )
    return *_log_prob_grads(ctx, grad_lp), None, None, None, None


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def check_adaptive_args(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
) -> List[int]:
    """Raise TypeError (dtype) or ValueError (shape, value) unless the adaptive softmax
    layout fits; -> cutoffs as a list of ints."""
    check_tensor("hidden", hidden, shape=(None, None))
    if hidden.shape[0] == 0:
        raise ValueError("hidden is an empty batch (0 rows)")
    cutoffs = check_cutoffs(cutoffs)
    n_tails, d = len(cutoffs) - 1, hidden.shape[1]
    like = dict(dtype=hidden.dtype, device=hidden.device)
    check_tensor("head_weight", head_weight, shape=(cutoffs[0] + n_tails, d), **like)
    if head_bias is not None:
        check_tensor("head_bias", head_bias, shape=(cutoffs[0] + n_tails,), **like)
    if len(tail_projections) != n_tails or len(tail_weights) != n_tails:
        raise ValueError(
            f"cutoffs {cutoffs} define {n_tails} tail clusters, got {len(tail_projections)} "
            f"tail_projections and {len(tail_weights)} tail_weights"
        )
    for i, (proj, weight) in enumerate(zip(tail_projections, tail_weights)):
        check_tensor(f"tail_projections[{i}]", proj, shape=(None, d), **like)
        size = cutoffs[i + 1] - cutoffs[i]
        check_tensor(f"tail_weights[{i}]", weight, shape=(size, proj.shape[0]), **like)
    return cutoffs


def _contiguous(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in tensors]


def adaptive_softmax_loss(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Negative log-likelihood of ``target`` under the adaptive softmax.

    hidden: [N, d], target: [N] ids in [0, V) or ``ignore_index`` -> scalar
    ("mean" over rows not ignored, 0 when every row is ignored; "sum") or [N]
    ("none", 0 on ignored rows), in float32 (float64 for float64 inputs).
    A mean/sum loss that needs gradients runs, on a backend that offers it (cpu),
    ``cprec::adaptive_softmax_loss_with_grads``: its gradients are formed in the forward
    and kept until the backward scales them (no double backward: a backward with
    ``create_graph=True`` raises).
    """
    cutoffs = check_adaptive_args(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs)
    check_tensor("target", target, shape=(hidden.shape[0],), dtypes=INDEX_DTYPES, device=hidden.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    name = ADAPTIVE_SOFTMAX_LOSS.resolve(backend, hidden.device, hidden.dtype)
    args = (
        hidden.contiguous(), target.contiguous(), head_weight.contiguous(), head_bias,
        _contiguous(tail_projections), _contiguous(tail_weights), cutoffs, int(ignore_index), reduction, name,
    )
    if (
        reduction != "none"
        and _needs_grad(hidden, head_weight, head_bias, *tail_projections, *tail_weights)
        and ADAPTIVE_SOFTMAX_LOSS.optional(name, WITH_GRADS) is not None
    ):
        return _loss_with_grads_op(*args)[0]
    return _loss_op(*args)[0]


def adaptive_log_prob(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    backend: Optional[str] = None,
) -> Tensor:
    """log p(v | hidden) for every item.  hidden: [N, d] -> [N, V] (float32, or float64)."""
    cutoffs = check_adaptive_args(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs)
    name = ADAPTIVE_LOG_PROB.resolve(backend, hidden.device, hidden.dtype)
    return _log_prob_op(
        hidden.contiguous(), head_weight.contiguous(), head_bias,
        _contiguous(tail_projections), _contiguous(tail_weights), cutoffs, name,
    )


def adaptive_topk(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    k: int,
    exclude: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """The k most likely items of each row, best first.

    hidden: [N, d], exclude: [N, m] ids never returned for that row (negative entries
    and the padding id V are skipped) -> (log_probs [N, k] float32/float64, ids [N, k]
    int64). Where a row has fewer than k items left after ``exclude``, its last slots
    hold id -1 and log-prob -inf, on every backend.
    """
    cutoffs = check_adaptive_args(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cutoffs[-1]:
        raise ValueError(f"k must be an int in [1, V = {cutoffs[-1]}], got {k!r}")
    if exclude is not None:
        check_tensor("exclude", exclude, shape=(hidden.shape[0], None), dtypes=INDEX_DTYPES, device=hidden.device)
        exclude = exclude.contiguous()
    name = ADAPTIVE_TOPK.resolve(backend, hidden.device, hidden.dtype)
    return _topk_op(
        hidden.contiguous(), head_weight.contiguous(), head_bias,
        _contiguous(tail_projections), _contiguous(tail_weights), cutoffs, k, exclude, name,
    )
