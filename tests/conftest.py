"""Test-wide setup.

Triton kernels are checked on the CPU through the interpreter, which must be switched
on before any module with a ``@triton.jit`` kernel is imported; backends import their
modules lazily, so setting it here, before any test module, is early enough.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("CPREC_RECORD_LAUNCHES"):  # .ci/run: recompiled for sm_90 by bench/sm90_compile.py
    import runpy

    _bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "sm90_compile.py")
    runpy.run_path(_bench)["record_launches"](os.environ["CPREC_RECORD_LAUNCHES"])

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data; skips the test where a checkout has no shared/ beside it."""
    path = os.path.normpath(DATA_DIR)
    if not os.path.isdir(path):
        pytest.skip("../shared/data is absent (only CI and developers have it)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
