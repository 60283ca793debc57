"""Learning-rate warm-up and decay, as a factor on the optimizer's lr per step.

constant: 1 after the warm-up (no warm-up: exactly the plain optimizer); linear and
cosine: decay from 1 after the warm-up to 0 at ``total_steps`` (the epoch cap's
steps, so a run that stops early never reaches the end of the decay).
"""
from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(kind: str, warmup: float) -> None:
    """ValueError unless ``kind`` is a schedule and ``warmup`` a step count or a fraction."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
        raise ValueError(f"warmup_steps must be a step count >= 0 or a fraction in (0, 1), got {warmup}")


def warmup_length(warmup: float, total_steps: int) -> int:
    """Warm-up steps: ``warmup`` itself, or that fraction of ``total_steps`` when < 1."""
    return int(round(warmup * total_steps)) if 0 < warmup < 1 else int(warmup)


def lr_factor(step: int, kind: str, warmup: int, total_steps: int) -> float:
    """The lr multiplier for optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler (call ``step()`` after each optimizer step); its
    ``state_dict`` is what a checkpoint keeps to resume the schedule."""
    check_schedule(kind, warmup)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    n_warm = warmup_length(warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind, n_warm, total_steps))
