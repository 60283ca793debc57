"""Backend selection, shared by every op.

Each op declares its backends in a ``BackendTable`` in its package ``__init__``: the
backend name -> the module that holds that op's forward AND backward under fixed
names. Which backend runs is decided per call from the ``backend`` argument, else the
``CPREC_BACKEND`` environment variable, else ``auto``. ``auto`` takes the first
available backend for the device of the inputs and falls back to the eager ``torch``
reference quietly; a backend requested by name that cannot run raises RuntimeError,
so a user who asks for a fast path never silently gets a slow one.

Modules are imported lazily, on the first call that needs them: a module whose import
raises ModuleNotFoundError (triton absent, an extension not built) means "not
available" and its message becomes the reason in the RuntimeError.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")

# Preference order of ``auto`` for each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# GPU kernels multiply with tensor cores, which have no float64: ``auto`` leaves
# float64 calls to the reference (asked for by name, a GPU backend may still serve them
# unless its module's DTYPES leaves float64 out).
_NO_AUTO_FLOAT64 = ("triton", "cuda")

# Module path -> the imported module, or None with its import error in _load_errors.
_loaded: dict = {}
_load_errors: dict = {}


def _load(module_name: str) -> Optional[ModuleType]:
    if module_name not in _loaded:
        try:
            _loaded[module_name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Any other import error is a bug and surfaces.
            _loaded[module_name] = None
            _load_errors[module_name] = str(err)
    return _loaded[module_name]


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else ``CPREC_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("CPREC_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "CPREC_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def eager_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` (None entries skipped) may skip the custom op and
    run its body directly: plain eager execution, not torch.compile/export tracing
    (which must see the op), no tensor subclass such as FakeTensor (a Parameter is
    fine), and no tensor wrapped by a torch.func transform (grad, vmap), which the
    custom op's registration handles."""
    if torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and not wrapped(t)) for t in tensors)


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


class Kernels(NamedTuple):
    """One backend's implementation of one op: both directions, found together."""

    forward: Callable
    backward: Callable


class BackendTable:
    """The backends of one op.

    modules: backend name -> module path; each module defines ``forward`` and
    ``backward`` (function names) with the signatures of the op's reference, and may
    declare ``DTYPES`` (the input dtypes it runs; default: all). ``auto_skip``: backends
    ``auto`` passes over for this op (a kernel measured slower than the reference).
    """

    def __init__(
        self,
        op: str,
        forward: str,
        backward: str,
        modules: Mapping[str, str],
        auto_skip: Sequence[str] = (),
    ) -> None:
        unknown = set(modules) - set(BACKENDS)
        if "torch" not in modules or unknown:
            raise ValueError(f"{op}: a backend table needs 'torch' and names from {BACKENDS}, got {sorted(modules)}")
        self.op, self.forward, self.backward = op, forward, backward
        self.modules = dict(modules)
        self.auto_skip = frozenset(auto_skip)

    def _module(self, backend: str) -> Optional[ModuleType]:
        path = self.modules.get(backend)
        return None if path is None else _load(path)

    def kernels(self, backend: str) -> Optional[Kernels]:
        """The forward and backward of ``backend``, or None where it lacks either."""
        module = self._module(backend)
        if module is None or not hasattr(module, self.forward) or not hasattr(module, self.backward):
            return None
        return Kernels(getattr(module, self.forward), getattr(module, self.backward))

    def optional(self, backend: str, name: str) -> Optional[Callable]:
        """The function ``name`` of ``backend``'s module, or None where it has none: an
        entry point only some backends offer (a faster path for a special case)."""
        module = self._module(backend)
        return None if module is None else getattr(module, name, None)

    def unavailable(
        self, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None
    ) -> Optional[str]:
        """Why ``backend`` cannot run this op here (None if it can)."""
        reason = _device_reason(backend, device)
        if reason is not None:
            return reason
        if backend not in self.modules:
            return f"it has no implementation of {self.op}"
        if self.kernels(backend) is None:
            error = _load_errors.get(self.modules[backend])
            return f"it has no implementation of {self.op}" + (f" ({error})" if error else "")
        dtypes = getattr(self._module(backend), "DTYPES", None)
        if dtype is not None and dtypes is not None and dtype not in dtypes:
            return f"it runs {[str(d) for d in dtypes]}, not {dtype}"
        return None

    def resolve(self, backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
        """The concrete backend that runs this op on tensors of ``device``/``dtype``.

        Raises RuntimeError when a backend requested by name cannot run it.
        """
        name = requested_backend(backend)
        if name != "auto":
            reason = self.unavailable(name, device, dtype)
            if reason is not None:
                raise RuntimeError(f"backend {name!r} is not available for {self.op}: {reason}")
            return name
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if candidate == "triton" and device.type != "cuda":
                continue
            if dtype == torch.float64 and candidate in _NO_AUTO_FLOAT64:
                continue
            if candidate in self.auto_skip:
                continue
            if self.unavailable(candidate, device, dtype) is None:
                return candidate
        return "torch"

    def call_forward(self, backend: str, *args):
        """Run the forward of the already-resolved ``backend``."""
        return self._resolved(backend).forward(*args)

    def call_backward(self, backend: str, *args):
        """Run the backward of the already-resolved ``backend``."""
        return self._resolved(backend).backward(*args)

    def _resolved(self, backend: str) -> Kernels:
        kernels = self.kernels(backend)
        if kernels is None:
            raise RuntimeError(f"backend {backend!r} has no implementation of {self.op}")
        return kernels
