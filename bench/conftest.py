"""Shared set-up of the pytest-benchmark suites.

``pytest bench/`` runs the small sizes only (what CI runs, in seconds);
``CPREC_BENCH_FULL=1 pytest bench/`` runs the full grid of each suite. On CUDA the
Triton interpreter is never used; on CPU it is switched off too (benchmarks time
real code paths only), so Triton rows are skipped on CPU.
"""
import os

import pytest
import torch

from cprec_kernels import testing

FULL = os.environ.get("CPREC_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sizes(small, full):
    """The parameter grid of a suite: ``full`` under CPREC_BENCH_FULL=1, else ``small``."""
    return full if FULL else small


def zipf_ids(n: int, vocab: int, exponent: float = 1.1, device=DEVICE, generator=None) -> torch.Tensor:
    """``cprec_kernels.testing.zipf_ids`` on the benchmark's device unless told otherwise."""
    return testing.zipf_ids(n, vocab, exponent, device, generator)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return DEVICE


def record(benchmark, **info) -> None:
    """Name a row: ``info`` (op, backend, dtype, sizes, ...) plus the device and, on
    CUDA, the peak memory since the caller's ``torch.cuda.reset_peak_memory_stats``."""
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else str(DEVICE)
    benchmark.extra_info.update(device=device, **info)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
