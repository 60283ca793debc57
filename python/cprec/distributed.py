"""Multi-process training with ``torch.distributed`` (started by ``torchrun``).

Each process takes an equal slice of every global batch, DDP averages gradients,
and metric sums are all-reduced, so a run on N processes computes what one process
computes with the same ``--batch-size`` (to float reduction order).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def init(device_type: str) -> None:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, ...); "
                           "start with: torchrun --nproc_per_node N -m cprec train --distributed ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes logs, checkpoints and results."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each process on a GPU machine takes the GPU of its local rank."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def my_slice(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a global batch of indices."""
    n = world_size()
    if n == 1:
        return batch
    if len(batch) % n:
        # Uneven last batch: spread the remainder so every rank has a share (maybe empty).
        return batch.tensor_split(n)[rank()]
    share = len(batch) // n
    return batch[rank() * share : (rank() + 1) * share]


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list:
    """Element-wise sum over processes (float64, on the device the backend needs)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def restart_count() -> int:
    """How often torchrun has restarted this worker (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the model (its forward is the training loss)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids: Optional[list] = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
