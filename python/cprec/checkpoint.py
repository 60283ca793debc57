"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds tensors, numbers, strings, lists and dicts only, so loading never
runs code; a file that carries anything else is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or not loadable safely."""


def save_checkpoint(obj: dict, path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new
    one, never a torn one: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so a reader never
    sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _unsafe_global(message: str) -> str:
    """The line of torch's refusal that names the offending global, if any."""
    lines = [line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return lines[0] if lines else message.splitlines()[0]


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; raise CheckpointError if it is
    missing, damaged, or carries objects that would run code when unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
        raise CheckpointError(
            f"{path}: refused: it holds objects that are not plain tensors/containers and could run code "
            f"when loaded ({_unsafe_global(str(err))})"
        ) from err
    except Exception as err:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise CheckpointError(f"{path}: not a cprec checkpoint (no model/config entries)")
    return obj
