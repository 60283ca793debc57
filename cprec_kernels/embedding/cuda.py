"""The ``cuda`` backend of the block-wise embedding: thin wrappers over the CUDA C++ kernels of ``csrc/cuda``.

Importing this module loads the compiled extension ``cprec_kernels._C_cuda``, which
registers the kernels as ``torch.ops.cprec_cuda.*`` for the CUDA dispatch key. It is
built by ``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext
--inplace``) when torch is a CUDA build and nvcc is found. ``CPREC_CUDA_JIT=1`` instead
compiles it on first import with ``torch.utils.cpp_extension.load`` (ninja, the visible
GPU's architecture; a few minutes), for a source checkout on a GPU machine that has not
run the build. When neither gives the extension, the import raises ModuleNotFoundError
saying why, which ``backends`` reads as "not available": ``auto`` falls back quietly and
``backend="cuda"`` raises RuntimeError with that text.

Every function has the name, signature and return structure of its namesake in
``cprec_kernels.embedding.reference``. The kernels run float32, bfloat16 and float16
tables with fp32 accumulation (``DTYPES``); float64 is refused with RuntimeError, as by
every backend that cannot run a dtype (``auto`` never sends it here).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from .._core.tensors import nones_to_empty

Tensor = torch.Tensor

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CSRC = os.path.join(_ROOT, "csrc")
_HOW = (
    "it is built by `pip install --no-build-isolation -e .` when torch is a CUDA build and nvcc is found, "
    "or compiled at import with CPREC_CUDA_JIT=1"
)


def _not_built(reason: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"the cprec_kernels CUDA extension (cprec_kernels._C_cuda) is not built: {reason}; {_HOW}",
        name="cprec_kernels._C_cuda",
    )


def _jit_load():
    """Compile csrc/cuda with torch.utils.cpp_extension.load (ninja) and load it."""
    from torch.utils import cpp_extension

    cuda_dir = os.path.join(_CSRC, "cuda")
    if not os.path.isdir(cuda_dir):
        raise _not_built(f"CPREC_CUDA_JIT=1 but the sources are absent ({cuda_dir})")
    sources = sorted(os.path.join(cuda_dir, n) for n in os.listdir(cuda_dir) if n.endswith((".cu", ".cpp")))
    return cpp_extension.load(
        name="cprec_kernels_C_cuda",
        sources=sources,
        extra_include_paths=[_CSRC],
        extra_cflags=["-O3", "-g0"],
        extra_cuda_cflags=["-O3"],  # torch adds -gencode for the visible GPU
        verbose=os.environ.get("CPREC_CUDA_JIT_VERBOSE") == "1",
    )


def _load_extension():
    if torch.version.cuda is None:
        raise _not_built(f"this torch ({torch.__version__}) is a CPU-only build, without CUDA")
    try:
        from .. import _C_cuda  # noqa: F401  (loading it registers torch.ops.cprec_cuda)

        return _C_cuda
    except ImportError as err:  # absent, or built against another torch (ABI mismatch)
        if os.environ.get("CPREC_CUDA_JIT") != "1":
            raise _not_built(str(err)) from err
    try:
        return _jit_load()
    except ModuleNotFoundError:
        raise
    except Exception as err:  # a failed JIT compile means "not available", with its cause
        raise _not_built(f"the CPREC_CUDA_JIT=1 compile failed: {err}") from err


_extension = _load_extension()
_ops = torch.ops.cprec_cuda
# Table dtypes this backend runs; the backend table refuses others before a call.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(dtype: torch.dtype) -> None:
    # For direct calls that bypass the backend table.
    if dtype not in DTYPES:
        raise RuntimeError(
            f"the cuda backend runs float32, bfloat16 and float16 tables, got {dtype} "
            "(use backend='torch' or 'triton' for float64)"
        )


# --------------------------------------------------------------------------------------
# block-wise factorized embedding
# --------------------------------------------------------------------------------------
def blockwise_embedding_forward(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tensor:
    """ids: any shape, int32/int64; weights[j]: [c_{j+1}-c_j, d_j]; projections[j]: [d, d_j]
    or None -> [*ids.shape, d] in the tables' dtype. Ids outside [0, V) act as padding."""
    _check_dtype(weights[0].dtype)
    return _ops.blockwise_embedding_forward(
        ids, list(weights), nones_to_empty(projections, weights[0]), [int(c) for c in cutoffs], padding_idx
    )


def blockwise_embedding_backward(
    grad_out: Tensor,
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """grad_out: [*ids.shape, d] -> (grads of the tables, grads of the projections; None
    where a projection is None). Deterministic: sort by id, fixed-order fp32 sums."""
    _check_dtype(weights[0].dtype)
    grad_weights, grad_projections = _ops.blockwise_embedding_backward(
        grad_out, ids, list(weights), nones_to_empty(projections, weights[0]), [int(c) for c in cutoffs], padding_idx
    )
    return list(grad_weights), [None if p is None else g for g, p in zip(grad_projections, projections)]
