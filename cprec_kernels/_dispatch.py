"""Glue shared by the op registrations: calling a backend and absent-tensor placeholders.

Custom op schemas cannot return ``None``, so an absent gradient (no bias, no
projection) travels as an empty tensor and is turned back into ``None`` before
autograd sees it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends


def call(backend: str, function: str, *args):
    """Run ``function`` of the already-resolved ``backend``."""
    impl = backends.implementation(backend, function)
    if impl is None:
        raise RuntimeError(f"backend {backend!r} has no implementation of {function}")
    return impl(*args)


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for a missing tensor."""
    return like.new_empty(0)


def or_absent(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return absent(like) if t is None else t


def present(t: torch.Tensor, was_given) -> Optional[torch.Tensor]:
    """``t`` if the input it is the gradient of was given, else None."""
    return t if was_given is not None else None


def fake_like(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Fake-tensor output: same metadata as ``t``, or the placeholder when ``t`` is None."""
    return absent(like) if t is None else torch.empty_like(t)
