"""Argument checks shared by every op.

Shape, dtype and device checks run in the Python wrappers (they only read metadata,
so ``torch.compile`` traces them); value checks (ids in range) run inside the ops,
where reading a tensor is allowed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t,
    *,
    shape: Optional[Sequence[Optional[int]]] = None,
    min_ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` fits.

    ``shape`` entries of None match any size; ``dtype`` demands an exact dtype
    (usually the dtype of the first floating input).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the other inputs' {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {list(t.shape)}")
    return t


def check_cutoffs(cutoffs, name: str = "cutoffs") -> list:
    """``cutoffs = [c1, ..., V]``: positive, strictly increasing Python ints."""
    try:
        items = list(cutoffs)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(cutoffs).__name__}") from None
    if any(isinstance(c, bool) or not isinstance(c, (int, torch.SymInt)) for c in items):
        raise TypeError(f"{name} must hold ints, got {items}")
    values = [int(c) for c in items]
    if not values:
        raise ValueError(f"{name} must not be empty; give at least [V]")
    if values[0] <= 0 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly increasing positive ints ending at V, got {values}")
    return values


def check_ids_in_range(
    name: str, ids: torch.Tensor, num_items: int, ignore: Optional[int] = None, allow_negative: bool = False
) -> None:
    """Raise ValueError unless every id is in ``[0, num_items)`` or equals ``ignore``.

    With ``allow_negative`` negative ids count as padding and pass. Reads the tensor
    (one host sync), so it runs inside the ops, not in traced code.
    """
    if ids.numel() == 0:
        return
    bad = ids >= num_items
    if not allow_negative:
        bad |= ids < 0
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        first = ids[bad].reshape(-1)[0].item()
        count = int(bad.sum())
        extra = f" or equal {ignore}" if ignore is not None else ""
        raise ValueError(
            f"{name} holds {count} id(s) outside [0, {num_items}){extra}, e.g. {first}"
        )
