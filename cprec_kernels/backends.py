"""Backend selection for every op.

A backend is a module that implements some of the functions of
``cprec_kernels.reference`` under the same names and signatures. Which backend runs
is decided per call from the ``backend`` argument, else the ``CPREC_BACKEND``
environment variable, else ``auto``. ``auto`` takes the first available backend for
the device of the inputs and falls back to the eager ``torch`` reference quietly; a
backend requested by name that cannot run raises, so a user who asks for a fast path
never silently gets a slow one.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")

# Backend name -> modules that may hold its implementations, searched in order.
# A module that does not exist (not written yet, or an extension not built) simply
# contributes nothing, so a later backend plugs in by adding a module here.
_MODULES = {
    "torch": ("cprec_kernels.reference",),
    "triton": (
        "cprec_kernels.triton.conv",
        "cprec_kernels.triton.embedding",
        "cprec_kernels.triton.adaptive_softmax",
    ),
    "cpu": ("cprec_kernels.cpu",),
    "cuda": ("cprec_kernels.cuda",),
}

# Preference order of ``auto`` for each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_loaded: dict = {}
_load_errors: dict = {}


def _load(module_name: str) -> Optional[ModuleType]:
    if module_name not in _loaded:
        try:
            _loaded[module_name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # A backend module that is absent, or whose dependency (triton, the built
            # extension) is absent, means "not available"; any other import error
            # is a bug and surfaces.
            _loaded[module_name] = None
            _load_errors[module_name] = str(err)
    return _loaded[module_name]


def implementation(backend: str, function: str):
    """The callable ``function`` of ``backend``, or None where that backend lacks it."""
    for module_name in _MODULES[backend]:
        module = _load(module_name)
        if module is not None and hasattr(module, function):
            return getattr(module, function)
    return None


def _auto_skips(backend: str, function: str) -> bool:
    """Whether ``backend`` asks ``auto`` to leave ``function`` to others (a kernel
    that measured slower than the reference), declared as ``AUTO_SKIP`` in its module."""
    return any(
        function in getattr(module, "AUTO_SKIP", ())
        for module in map(_load, _MODULES[backend])
        if module is not None
    )


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None if it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    if backend == "cpu":
        return None if device.type == "cpu" else f"the cpu backend needs CPU tensors, got {device}"
    if backend == "cuda":
        return None if device.type == "cuda" else f"the cuda backend needs CUDA tensors, got {device}"
    raise AssertionError(backend)


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else ``CPREC_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("CPREC_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "CPREC_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# GPU kernels multiply with tensor cores, which have no float64: ``auto`` leaves
# float64 calls to the reference (asked for by name, a GPU backend may still serve them).
_NO_AUTO_FLOAT64 = ("triton", "cuda")


def resolve(backend: Optional[str], function: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Pick the concrete backend that runs ``function`` on tensors of ``device``/``dtype``.

    Raises RuntimeError when a backend requested by name cannot run it.
    """
    name = requested_backend(backend)
    if name != "auto":
        reason = _device_reason(name, device)
        if reason is None and implementation(name, function) is None:
            errors = [_load_errors[m] for m in _MODULES[name] if m in _load_errors]
            reason = f"it has no implementation of {function}" + (f" ({'; '.join(errors)})" if errors else "")
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available for {function}: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if candidate == "triton" and device.type != "cuda":
            continue
        if dtype == torch.float64 and candidate in _NO_AUTO_FLOAT64:
            continue
        if candidate != "torch" and _auto_skips(candidate, function):
            continue
        if _device_reason(candidate, device) is None and implementation(candidate, function) is not None:
            return candidate
    return "torch"
