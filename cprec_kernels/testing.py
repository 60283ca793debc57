"""Independent formulations of every op (oracles) and the shared benchmark layouts.

Each oracle computes an op the way a user would write it with stock PyTorch, by a
route other than the op's reference: the tests check every backend against them and
the benches time them as the eager baselines, so both sides measure the same thing.
Gradients come from autograd through these functions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def conv_by_padding(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """The textbook causal conv: pad (K-1)*dilation zeros on the left of a channels-first
    copy, ``F.conv1d``, back to channels-last.  x: [B, T, C_in] -> [B, T, C_out]."""
    pad = (weight.shape[2] - 1) * dilation
    return F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation).transpose(1, 2)


def conv_ln_relu_by_modules(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    dilation: int,
    eps: float,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """NextItNet's conv layer from stock modules: padded conv, ``F.layer_norm``, ReLU
    (+ residual).  x: [B, T, C_in] -> [B, T, C_out]."""
    z = conv_by_padding(x, weight, bias, dilation)
    out = torch.relu(F.layer_norm(z, (weight.shape[0],), ln_weight, ln_bias, eps))
    return out if residual is None else out + residual


def embedding_by_loop(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int] = None,
) -> Tensor:
    """One id at a time: find its block by scanning the cutoffs.  ids: [*] -> [*, d]."""
    d = projections[0].shape[0] if projections[0] is not None else weights[0].shape[1]
    rows = []
    for i in ids.reshape(-1).tolist():
        if i == padding_idx:
            rows.append(weights[0].new_zeros(d))
            continue
        j = next(j for j, c in enumerate(cutoffs) if i < c)
        lo = 0 if j == 0 else cutoffs[j - 1]
        v = weights[j][i - lo]
        rows.append(v if projections[j] is None else F.linear(v, projections[j]))
    return torch.stack(rows).reshape(*ids.shape, d)


def embedding_dense(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int] = None,
) -> Tensor:
    """One ``F.embedding`` lookup in the dense [V, d] matrix cat_j(E_j @ P_j^T); ids
    outside [0, V) and ``padding_idx`` give zero rows.  ids: [*] -> [*, d]."""
    full = torch.cat([w if p is None else w @ p.t() for w, p in zip(weights, projections)])
    flat = ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < cutoffs[-1])
    if padding_idx is not None:
        keep &= flat != padding_idx
    out = F.embedding(torch.where(keep, flat, 0), full) * keep[:, None].to(full.dtype)
    return out.reshape(*ids.shape, -1)


def eager_blockwise_embedding(
    ids: Tensor, weights: Sequence[Tensor], projections: Sequence[Optional[Tensor]], cutoffs: Sequence[int]
) -> Tensor:
    """The eager block loop users write (fairseq AdaptiveInput style): a mask, a lookup,
    a matmul and a scatter per block.  ids: [*] -> [*, d]."""
    flat = ids.reshape(-1)
    d = weights[0].shape[1] if projections[0] is None else projections[0].shape[0]
    out = weights[0].new_zeros(flat.numel(), d)
    for lo, hi, table, proj in zip([0] + list(cutoffs[:-1]), cutoffs, weights, projections):
        rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
        vec = F.embedding(flat[rows] - lo, table)
        out = out.index_put((rows,), vec if proj is None else vec @ proj.t())
    return out.view(*ids.shape, -1)


def adaptive_params(
    module: torch.nn.AdaptiveLogSoftmaxWithLoss,
) -> Tuple[Tensor, Optional[Tensor], List[Tensor], List[Tensor]]:
    """The functional layout (head_weight, head_bias, tail_projections, tail_weights) of
    an ``nn.AdaptiveLogSoftmaxWithLoss``, the adaptive softmax oracle."""
    return (
        module.head.weight,
        module.head.bias,
        [t[0].weight for t in module.tail],
        [t[1].weight for t in module.tail],
    )


def adaptive_module(
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    """An ``nn.AdaptiveLogSoftmaxWithLoss`` whose weights ARE the given tensors (not
    copies), so autograd through its ``forward``/``log_prob`` reaches them. Needs at
    least one tail cluster (the module cannot express cutoffs = [V])."""
    d = head_weight.shape[1]
    module = torch.nn.utils.skip_init(
        torch.nn.AdaptiveLogSoftmaxWithLoss, d, cutoffs[-1], list(cutoffs[:-1]), div_value=1.0,
        head_bias=head_bias is not None,
    )
    given = {"head.weight": head_weight, "head.bias": head_bias}
    for i, (proj, weight) in enumerate(zip(tail_projections, tail_weights)):
        given[f"tail.{i}.0.weight"], given[f"tail.{i}.1.weight"] = proj, weight
    for name, tensor in given.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        delattr(owner, attr)
        setattr(owner, attr, tensor)
    return module


def adaptive_nll_by_module(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The adaptive softmax loss from ``nn.AdaptiveLogSoftmaxWithLoss`` on the rows not
    ignored; ignored rows give 0 and an all-ignored mean is 0.  hidden: [N, d]."""
    module = adaptive_module(head_weight, head_bias, tail_projections, tail_weights, cutoffs)
    keep = target != ignore_index
    rows = keep.nonzero().squeeze(1)
    per_row = hidden.new_zeros(hidden.shape[0])
    if rows.numel() > 0:
        per_row = per_row.index_put((rows,), -module(hidden[rows], target[rows].long()).output)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)


def cutoffs_for(vocab: int, fractions: Sequence[float]) -> List[int]:
    """Block cutoffs at the given fractions of the vocabulary, then V: [c1, ..., V]."""
    return [int(vocab * f) for f in fractions] + [vocab]


def zipf_ids(n: int, vocab: int, exponent: float = 1.1, device="cpu",
             generator: Optional[torch.Generator] = None) -> Tensor:
    """n ids in [0, vocab) drawn from a Zipf law (id 0 most frequent), as item
    popularity in recommendation data is: P(id) proportional to (id + 1)^-exponent."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    ids = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
    return ids.to(device)
