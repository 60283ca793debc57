"""The training steps of issue 19's op targets, one per implementation, shared by
``bench_cpu.py`` (pytest-benchmark, one implementation after another) and
``interleaved.py`` (all implementations alternated round by round).

Each factory builds its inputs once (seeded) and returns a no-argument callable that
runs one forward + backward and drops the gradients.
"""
from __future__ import annotations

from typing import Callable, List

import torch

import cprec_kernels as ck
from cprec_kernels.testing import conv_ln_relu_by_modules, zipf_ids

CONV_IMPLS = ["cpu", "eager", "compile"]
LOSS_IMPLS = CONV_IMPLS + ["gemm-floor"]


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def eager_conv_ln_relu(x, w, b, ln_w, ln_b, residual, dilation, eps=1e-8):
    """NextItNet's conv layer as eager PyTorch: padded copy, conv1d, LayerNorm, ReLU."""
    return conv_ln_relu_by_modules(x, w, b, ln_w, ln_b, dilation, eps, residual)


def conv_ln_relu_step(impl: str, batch: int, t: int, c: int) -> Callable[[], None]:
    """Forward + backward of one conv layer per dilation 1, 2, 4, 8 (one NextItNet block
    pair each) on x: [batch, t, c], with the grads of x, the weights and the LN
    parameters. impl: cpu (the fused op on the cpu backend), eager or compile."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_ln_relu_step: impl must be one of {CONV_IMPLS}, got {impl!r}")
    torch.manual_seed(0)
    x = torch.randn(batch, t, c, requires_grad=True)
    layers = [(torch.randn(c, c, 3) / (3 * c) ** 0.5, torch.randn(c), torch.ones(c), torch.zeros(c)) for _ in range(4)]
    layers = [[p.requires_grad_() for p in layer] for layer in layers]
    grad = torch.randn(batch, t, c)
    eager = compiled(eager_conv_ln_relu) if impl == "compile" else eager_conv_ln_relu

    def step():
        for (w, b, ln_w, ln_b), dil in zip(layers, (1, 2, 4, 8)):
            if impl == "cpu":
                out = ck.causal_conv1d_ln_relu(x, w, b, ln_w, ln_b, dil, 1e-8, residual=x, backend="cpu")
            else:
                out = eager(x, w, b, ln_w, ln_b, x, dil)
            out.backward(grad)
        for p in [x] + [p for layer in layers for p in layer]:
            p.grad = None

    return step


def adaptive_loss_step(impl: str, n: int, d: int, vocab: int, cutoffs: List[int]) -> Callable[[], None]:
    """Forward + backward of the adaptive softmax loss on hidden: [n, d] with Zipf
    targets in [0, vocab). impl: cpu (the op on the cpu backend), eager
    (``nn.AdaptiveLogSoftmaxWithLoss``), compile (of that module), or gemm-floor: only
    the matrix products every exact implementation does (per layer, on the rows it
    sees: the logits and the two gradient GEMMs) as ``torch.mm`` (BLAS) runs them, with
    no softmax, gathers or allocations around them. No implementation built on BLAS
    products can beat it, so eager / floor bounds what fusion alone can gain over the
    eager module; the cpu op runs its products on its own GEMM (csrc/cpu/panel_gemm.h)
    and can go below it."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"adaptive_loss_step: impl must be one of {LOSS_IMPLS}, got {impl!r}")
    torch.manual_seed(0)
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(d, vocab, cutoffs, div_value=4.0)
    hidden = torch.randn(n, d, requires_grad=True)
    target = zipf_ids(n, vocab, device="cpu")
    projs = [t[0].weight for t in module.tail]
    tails = [t[1].weight for t in module.tail]
    run = compiled(module) if impl == "compile" else module
    bounds = list(zip(cutoffs, cutoffs[1:] + [vocab]))
    tail_rows = [hidden.detach()[(target >= lo) & (target < hi)] for lo, hi in bounds]

    def gemms(h, weight, proj=None):
        """Forward and backward products of one layer: (projection,) logits."""
        z = h if proj is None else torch.mm(h, proj.t())
        g = torch.mm(z, weight.t())
        grad_z = torch.mm(g, weight)
        torch.mm(g.t(), z)
        if proj is not None:
            torch.mm(grad_z.t(), h), torch.mm(grad_z, proj)

    def step():
        if impl == "gemm-floor":
            with torch.no_grad():
                gemms(hidden.detach(), module.head.weight.detach())
                for rows, proj, tail in zip(tail_rows, projs, tails):
                    gemms(rows, tail.detach(), proj.detach())
            return
        if impl == "cpu":
            loss = ck.adaptive_softmax_loss(hidden, target, module.head.weight, module.head.bias, projs, tails,
                                            cutoffs + [vocab], backend="cpu")
        else:
            loss = run(hidden, target).loss
        loss.backward()
        hidden.grad = None
        module.zero_grad(set_to_none=True)

    return step
