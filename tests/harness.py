"""The one harness every op test module is built on.

A check runs an op on one backend and compares its outputs and the gradients of every
floating input with (1) the op's eager reference (``backend="torch"``) on the same
inputs and dtype, and (2) an independent oracle from ``cprec_kernels.testing`` run by
autograd in float64 on float64 copies of the inputs. The upstream gradient is drawn
once in float64 from a fixed seed and cast, so runs in different dtypes see the same
one. Tests run in float64 where the backend supports it, else in float32 (and the
half types where a backend has them) with the tolerances in ``TOL``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")

# (rtol, atol) per dtype for a backend against the reference or the float64 oracle;
# with ``scaled`` the atol is multiplied by max |expected| (for outputs of any size).
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def module_loads(name: str) -> bool:
    """Whether ``name`` imports here (triton present, an extension built)."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        return False
    return True


def backend_params(table, backends: Sequence[str] = ALL_BACKENDS) -> List:
    """pytest params of ``backends`` for an op's BackendTable, each skipped with the
    table's reason where it cannot run on DEVICE (so skips say why)."""
    params = []
    for name in backends:
        reason = table.unavailable(name, DEVICE)
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=name))
    return params


def backend_dtype_params(table, backends: Sequence[str] = ALL_BACKENDS) -> List:
    """(backend, dtype) params: float64 where the backend runs it, and float32 always."""
    params = []
    for name in backends:
        reason = table.unavailable(name, DEVICE)
        for dtype in (torch.float64, torch.float32):
            why = reason or (table.unavailable(name, DEVICE, dtype) if dtype == torch.float64 else None)
            mark = pytest.mark.skipif(why is not None, reason=str(why))
            params.append(pytest.param(name, dtype, marks=mark, id=f"{name}-{str(dtype)[6:]}"))
    return params


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` viewed out of a wider buffer (last dim stride 2,
    storage offset 1), a leaf that requires grad like ``t``."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t.detach()
    view = wide[..., 1::2]
    assert not view.is_contiguous()
    return view.detach().requires_grad_(t.requires_grad)


def leaves(inputs: Dict[str, object]) -> List[torch.Tensor]:
    """The floating tensors of ``inputs`` (values: tensors, None or lists of them), in order."""
    out = []
    for value in inputs.values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out.append(t)
    return out


def as_leaves(inputs: Dict[str, object], dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Fresh leaf copies of ``inputs`` (in ``dtype`` if given) that require grad; detach()
    keeps a strided view strided, so non-contiguous inputs stay non-contiguous."""

    def copy(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        t = t.detach() if dtype is None else t.detach().to(dtype)
        return t.requires_grad_()

    return {k: [copy(t) for t in v] if isinstance(v, (list, tuple)) else copy(v) for k, v in inputs.items()}


def value_and_grads(fn: Callable, inputs: Dict[str, object], seed: int = 1) -> List[Optional[torch.Tensor]]:
    """[every output of fn(**inputs), then the grad of every floating input] for a fixed
    random upstream gradient on each floating output (None for an input autograd
    did not reach)."""
    out = fn(**inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(seed)
    floats = [o for o in outs if o.is_floating_point()]
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in floats]
    xs = leaves(inputs)
    connected = [(o, u) for o, u in zip(floats, upstream) if o.requires_grad]
    if xs and connected:
        outs_c, ups_c = zip(*connected)
        grads = torch.autograd.grad(list(outs_c), xs, list(ups_c), allow_unused=True)
    else:  # nothing reaches the inputs (an oracle that returns constants)
        grads = [None] * len(xs)
    return [o.detach() for o in outs] + list(grads)


def assert_all_close(got, want, dtype: torch.dtype, what: str, tol=None, scaled: bool = False, factor: float = 1.0):
    """Entry by entry: the same None-ness; integer outputs equal; floating ones within
    ``tol`` (default ``TOL[dtype]``) after a cast to float64."""
    rtol, atol = tol or TOL[dtype]
    rtol, atol = rtol * factor, atol * factor
    assert len(got) == len(want), f"{what}: {len(got)} entries vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            assert g is None and w is None, f"{what}[{i}]: one is None"
            continue
        assert g.shape == w.shape, f"{what}[{i}]: shape {list(g.shape)} vs {list(w.shape)}"
        if not w.is_floating_point():
            assert torch.equal(g, w), f"{what}[{i}]"
            continue
        a = atol * (w.abs().max().item() + 1e-3) if scaled else atol
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=a, msg=lambda m: f"{what}[{i}]: {m}")


def check(
    op: Callable,
    inputs: Dict[str, object],
    backend: str,
    dtype: torch.dtype,
    oracle: Optional[Callable] = None,
    tol=None,
    scaled: bool = False,
    against: Sequence[str] = ("torch",),
) -> List[Optional[torch.Tensor]]:
    """op(backend=backend, **inputs) against ``op`` on each backend of ``against`` (same
    inputs, tolerance ``tol``/``TOL[dtype]``, doubled for a second fused backend) and
    against ``oracle(**inputs)`` in float64 (the tolerance of ``dtype``): outputs and
    every gradient. ``inputs`` are taken as the values; fresh leaves are made per run.
    -> what the backend gave: outputs, then the grads."""
    got = value_and_grads(lambda **t: op(backend=backend, **t), as_leaves(inputs))
    for other in against:
        if other == backend:
            continue
        want = value_and_grads(lambda **t: op(backend=other, **t), as_leaves(inputs))
        factor = 1.0 if other == "torch" else 2.0  # two low-precision kernels, each within tol of the truth
        assert_all_close(got, want, dtype, f"{backend} vs {other}", tol, scaled, factor)
    if oracle is not None:
        exact = value_and_grads(oracle, as_leaves(inputs, torch.float64))
        n_out = len(exact) - len(leaves(inputs))
        # The oracle's outputs are the op's visible ones: compare those and the grads.
        mine = got[: n_out] + got[len(got) - len(leaves(inputs)):]
        # An input the oracle never reads (a tail with no target) has no autograd grad: zero.
        exact = [torch.zeros_like(m, dtype=torch.float64) if e is None and m is not None else e
                 for e, m in zip(exact, mine)]
        assert_all_close(mine, exact, dtype, f"{backend} vs oracle", tol, scaled)
    return got
