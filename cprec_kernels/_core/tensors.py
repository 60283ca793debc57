"""Tensor helpers every op shares: the accumulation dtype, block bounds, the
reduction's row weights, excluded-id masks, and the None <-> empty-tensor conversions.

Custom op schemas cannot return ``None`` nor take None inside a tensor list, so an
absent tensor (no bias, an identity projection, the gradient of either) travels as an
empty tensor across op and extension boundaries and is turned back into ``None``
before autograd or a backend sees it. The helper names say the direction.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast_or_none(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype``; None stays None."""
    # The dtype test first: a no-op .to() is a C++ call, and the conv casts ~10
    # tensors per layer.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def block_bounds(cutoffs: Sequence[int]) -> List[Tuple[int, int]]:
    """cutoffs [c1, ..., V] -> the id ranges [(0, c1), (c1, c2), ..., (c_{n-1}, V)]."""
    edges = [0] + list(cutoffs)
    return list(zip(edges[:-1], edges[1:]))


def row_weights(target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """target: [N] -> [N] factor of each row in the reduction: 1 (none/sum) or
    1/count (mean), 0 for ignored rows.

    An all-ignored batch has mean 0 (not nan as in F.cross_entropy), so a batch of
    pure padding cannot poison training.
    """
    keep = (target != ignore_index).to(dtype)
    if reduction == "mean":
        keep = keep / keep.sum().clamp(min=1)
    return keep


def mask_excluded(scores: Tensor, exclude: Tensor) -> Tensor:
    """scores: [N, V] with -inf at each row's excluded ids; exclude: [N, m], negatives skipped."""
    V = scores.shape[1]
    # Padding entries are sent to an extra column that is dropped afterwards.
    index = torch.where(exclude >= 0, exclude, V).long()
    padded = F.pad(scores, (0, 1))
    return padded.scatter(1, index, float("-inf"))[:, :V]


def empty_like_none(like: Tensor) -> Tensor:
    """The empty placeholder that stands for None, on ``like``'s device and dtype."""
    return like.new_empty(0)


def none_to_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or the empty placeholder where ``t`` is None."""
    return empty_like_none(like) if t is None else t


def nones_to_empty(ts: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    """``none_to_empty`` of each entry of a list."""
    return [none_to_empty(t, like) for t in ts]


def empty_to_none(t: Tensor) -> Optional[Tensor]:
    """None for the empty placeholder, else ``t``."""
    return None if t.numel() == 0 else t


def grad_if_given(grad: Tensor, given: Optional[Tensor]) -> Optional[Tensor]:
    """``grad`` if the input it is the gradient of was given, else None."""
    return grad if given is not None else None


def fake_like(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Fake-tensor output: same metadata as ``t``, or the placeholder when ``t`` is None."""
    return empty_like_none(like) if t is None else torch.empty_like(t)
