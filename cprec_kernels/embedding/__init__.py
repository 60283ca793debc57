"""Block-wise factorized embedding (CpRec's input layer): public op and registration.

    out[n] = E_j[id_n - c_j] @ P_j^T   for the block j with c_j <= id_n < c_{j+1}

ids: any shape of int64/int32 in [0, V) (or ``padding_idx``), E_j = weights[j]:
[c_{j+1} - c_j, d_j], P_j = projections[j]: [d, d_j] (``nn.Linear(d_j, d)`` layout) or
None for the identity (then d_j = d), cutoffs = [c1, ..., V] -> out: [*ids.shape, d].

The definition is ``reference.py``; ``triton.py``, ``cpu.py`` and ``cuda.py`` are the
fused backends, chosen per call through the backend table below.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .._core.backends import BackendTable
from .._core.tensors import empty_to_none, grad_if_given, none_to_empty, nones_to_empty
from .._core.validation import INDEX_DTYPES, check_cutoffs, check_ids_in_range, check_tensor
from .reference import embedding_dim

Tensor = torch.Tensor

BLOCKWISE_EMBEDDING = BackendTable(
    "blockwise_embedding",
    "blockwise_embedding_forward",
    "blockwise_embedding_backward",
    {
        "torch": "cprec_kernels.embedding.reference",
        "triton": "cprec_kernels.embedding.triton",
        "cpu": "cprec_kernels.embedding.cpu",
        "cuda": "cprec_kernels.embedding.cuda",
    },
)


def _projections(projections: Sequence[Tensor]) -> List[Optional[Tensor]]:
    # Custom op schemas take no Optional entries in a differentiable list, so an
    # identity projection travels as an empty tensor.
    return [empty_to_none(p) for p in projections]


@torch.library.custom_op("cprec::blockwise_embedding", mutates_args=())
def _embedding_op(
    ids: Tensor,
    weights: List[Tensor],
    projections: List[Tensor],
    cutoffs: List[int],
    padding_idx: Optional[int],
    check_bounds: bool,
    backend: str,
) -> Tensor:
    if check_bounds:
        check_ids_in_range("ids", ids, cutoffs[-1], ignore=padding_idx)
    return BLOCKWISE_EMBEDDING.call_forward(backend, ids, weights, _projections(projections), cutoffs, padding_idx)


@_embedding_op.register_fake
def _(ids, weights, projections, cutoffs, padding_idx, check_bounds, backend):
    return weights[0].new_empty(*ids.shape, embedding_dim(weights, _projections(projections)))


@torch.library.custom_op("cprec::blockwise_embedding_backward", mutates_args=())
def _embedding_backward_op(
    grad: Tensor,
    ids: Tensor,
    weights: List[Tensor],
    projections: List[Tensor],
    cutoffs: List[int],
    padding_idx: Optional[int],
    backend: str,
) -> tuple[List[Tensor], List[Tensor]]:
    gw, gp = BLOCKWISE_EMBEDDING.call_backward(
        backend, grad, ids, weights, _projections(projections), cutoffs, padding_idx
    )
    return list(gw), nones_to_empty(gp, grad)


@_embedding_backward_op.register_fake
def _(grad, ids, weights, projections, cutoffs, padding_idx, backend):
    return [torch.empty_like(w) for w in weights], [torch.empty_like(p) for p in projections]


def _setup(ctx, inputs, output):
    ids, weights, projections, cutoffs, padding_idx, _, backend = inputs
    ctx.save_for_backward(ids, *weights, *projections)
    ctx.cutoffs, ctx.padding_idx, ctx.backend = cutoffs, padding_idx, backend


def _backward(ctx, grad):
    ids, *saved = ctx.saved_tensors
    n = len(ctx.cutoffs)
    weights, projections = saved[:n], saved[n:]
    gw, gp = _embedding_backward_op(
        grad.contiguous(), ids, weights, projections, ctx.cutoffs, ctx.padding_idx, ctx.backend
    )
    gp = [grad_if_given(g, empty_to_none(p)) for g, p in zip(gp, projections)]
    return None, gw, gp, None, None, None, None


_embedding_op.register_autograd(_backward, setup_context=_setup)


def check_embedding_args(
    ids: Tensor, weights: Sequence[Tensor], projections: Sequence[Optional[Tensor]], cutoffs: Sequence[int]
) -> List[int]:
    """Raise TypeError (dtype) or ValueError (shape, value) unless the block layout fits;
    -> cutoffs as a list of ints."""
    check_tensor("ids", ids, dtypes=INDEX_DTYPES)
    if ids.numel() == 0:
        raise ValueError(f"ids is an empty batch (shape {list(ids.shape)})")
    cutoffs = check_cutoffs(cutoffs)
    if len(weights) != len(cutoffs) or len(projections) != len(cutoffs):
        raise ValueError(
            f"need one table and one projection (or None) per block: {len(cutoffs)} cutoffs, "
            f"{len(weights)} weights, {len(projections)} projections"
        )
    first = check_tensor("weights[0]", weights[0], shape=(cutoffs[0], None), device=ids.device)
    if projections[0] is not None:
        check_tensor("projections[0]", projections[0], shape=(None, first.shape[1]), dtype=first.dtype)
    d = embedding_dim(weights, projections)
    lo = 0
    for j, (hi, table, proj) in enumerate(zip(cutoffs, weights, projections)):
        check_tensor(f"weights[{j}]", table, shape=(hi - lo, None), dtype=first.dtype, device=ids.device)
        if proj is None:
            if table.shape[1] != d:
                raise ValueError(
                    f"projections[{j}] is None (identity) but weights[{j}] has width {table.shape[1]}, not d = {d}"
                )
        else:
            check_tensor(f"projections[{j}]", proj, shape=(d, table.shape[1]), dtype=first.dtype, device=ids.device)
        lo = hi
    return cutoffs


def blockwise_embedding(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int] = None,
    check_bounds: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Look up each id in its frequency block and project it to width d.

    ids: [*] int64/int32, weights[j]: [c_{j+1} - c_j, d_j], projections[j]: [d, d_j]
    or None, cutoffs: [c1, ..., V] -> [*ids.shape, d].
    ``padding_idx`` ids give zero rows and no gradient; it may lie outside [0, V)
    (a pad id apart from the items). Ids outside [0, V) raise ValueError unless
    ``check_bounds=False`` (for callers who validated them already).
    """
    cutoffs = check_embedding_args(ids, weights, projections, cutoffs)
    if padding_idx is not None and not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    name = BLOCKWISE_EMBEDDING.resolve(backend, ids.device, weights[0].dtype)
    return _embedding_op(
        ids,
        [w.contiguous() for w in weights],
        [none_to_empty(p, weights[0]).contiguous() for p in projections],
        cutoffs,
        padding_idx,
        bool(check_bounds),
        name,
    )
