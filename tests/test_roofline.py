"""bench/roofline.py: its kernel counter and fused-kernel FLOPs agree with
torch.utils.flop_counter.FlopCounterMode on small sizes, and bytes are tensor sizes."""
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("roofline", os.path.join(ROOT, "bench", "roofline.py"))
roofline = sys.modules["roofline"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(roofline)


def _flop_counter_total(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _check(eager, fused, s):
    total = _flop_counter_total(eager)
    assert total > 0
    assert sum(k.flops for k in roofline.count(eager, s)) == total
    assert sum(k.flops for k in fused) == total  # the fused kernels do the eager GEMMs, no more


def test_bytes_are_the_kernels_tensor_sizes():
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    kernels = roofline.count(lambda: F.linear(x, w), float_bytes=2)
    # One GEMM reads x [5, 7] and w [3, 7] and writes [5, 3]: the transpose is a view.
    assert [k.name for k in kernels] == ["mm"]
    assert kernels[0].bytes == (5 * 7 + 3 * 7 + 5 * 3) * 2
    assert kernels[0].flops == 2 * 5 * 3 * 7


def test_conv_counts_agree_with_flop_counter():
    eager, fused = roofline.conv_ln_relu(3, 11, 24, 4)
    _check(eager, fused, 4)


def test_embedding_counts_agree_with_flop_counter():
    ids = torch.randint(0, roofline.EMB_V, (777,))
    eager, fused = roofline.embedding(ids, 2)
    _check(eager, fused, 2)


def test_adaptive_loss_counts_agree_with_flop_counter():
    target = torch.randint(0, roofline.ASM_V, (333,))
    eager, fused = roofline.adaptive_loss(target, 2)
    _check(eager, fused, 2)


def test_extrapolation_is_exact_for_affine_counts():
    # A repeated pattern: every prefix of a multiple of 64 ids has the same block fractions.
    ids = torch.randint(0, roofline.EMB_V, (64,)).repeat(128)
    predicted = roofline.extrapolate(lambda i: roofline.embedding(i, 4)[0], ids[:6144], 4)
    direct = roofline.count(roofline.embedding(ids[:6144], 4)[0], 4)
    assert [k.name for k in predicted] == [k.name for k in direct]
    for p, d in zip(predicted, direct):
        assert abs(p.bytes - d.bytes) <= 1e-6 * max(d.bytes, 1)
