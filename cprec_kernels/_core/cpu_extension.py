"""Glue every op's ``cpu`` backend shares: loading the C++ extension and the dtype casts.

Importing this module loads the compiled extension ``cprec_kernels._C``, which
registers the kernels as ``torch.ops.cprec_cpu.*``. When the extension is not built
(``CPREC_NO_EXT=1``, or a checkout that never ran ``python setup.py build_ext``) the
import raises ModuleNotFoundError, which the backend tables read as "not available":
``auto`` then falls back to ``torch`` and ``backend="cpu"`` raises RuntimeError.

The C++ schemas have no optional entries in tensor lists, so None (no projection, no
gradient) crosses as an empty tensor both ways. The kernels run in float32 and
float64; half and bfloat16 are computed in float32 and cast back, as the reference does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.cprec_cpu)
except ImportError as err:  # an ABI mismatch is as unusable as an absent build
    raise ModuleNotFoundError(
        "the cprec_kernels C++ extension is not built (run `python setup.py build_ext --inplace` "
        f"or `pip install --no-build-isolation -e .`; CPREC_NO_EXT=1 skips it): {err}",
        name="cprec_kernels._C",
    ) from err

from .tensors import acc_dtype, cast_or_none

Tensor = torch.Tensor
ops = torch.ops.cprec_cpu
_NATIVE = (torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C++ kernels run for inputs of ``dtype``."""
    return dtype if dtype in _NATIVE else acc_dtype(dtype)


def casts(ts: Sequence[Optional[Tensor]], dtype: torch.dtype) -> List[Optional[Tensor]]:
    """``cast_or_none`` of each entry."""
    return [cast_or_none(t, dtype) for t in ts]


def grad_as(grad: Tensor, given: Optional[Tensor]) -> Optional[Tensor]:
    """``grad`` in the dtype of the input it belongs to; None where that input is None."""
    return None if given is None else cast_or_none(grad, given.dtype)


def grads_as(grads: Sequence[Tensor], given: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``grad_as`` of each entry."""
    return [grad_as(g, t) for g, t in zip(grads, given)]
