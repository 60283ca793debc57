"""Tail-cluster adaptive softmax: training loss (forward+backward) and top-k ranking.

Loss rows (Zipf targets, mean reduction, grads of hidden and of every weight):
``triton`` and ``torch`` (this library's backends), ``nn_adaptive``
(``torch.nn.AdaptiveLogSoftmaxWithLoss`` with the same parameters), ``full_softmax``
(``F.cross_entropy`` of the [N, V] logits of a [V, d] output layer) and
``linear_cross_entropy`` (``torch.nn.functional.linear_cross_entropy`` of that layer,
where the installed torch has it).
Top-k rows (k = 10): ``triton`` (the streaming top-k, memory O(N * k)), and
``<backend>_log_prob_topk`` (the full [N, V] log-probs, then ``torch.topk``) for the
triton and torch log-prob and for ``nn_adaptive``'s ``log_prob``.

Layout: 4 clusters (head + 3 tails), cutoffs at 2%, 10% and 35% of V, div 4, no head
bias; d = 256, bf16 hidden and weights on CUDA.

    pytest bench/bench_adaptive_softmax.py                      # small grid, CPU, seconds
    CPREC_BENCH_FULL=1 pytest bench/bench_adaptive_softmax.py   # N 4k..64k, V 10k..1M

Each row's ``extra_info`` holds op, mode, backend, device, dtype, sizes and, on CUDA,
the peak memory of the timed calls. Triton rows are skipped on CPU (the interpreter is
not a code path worth timing); full-softmax rows whose [N, V] logits cannot fit are
skipped.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, sizes, sync, zipf_ids
from conftest import record as record_row

import cprec_kernels
from cprec_kernels.nn import AdaptiveSoftmax
from cprec_kernels.testing import cutoffs_for as cutoffs_at

DIV = 4.0
CUT_FRACTIONS = (0.02, 0.10, 0.35)
TOPK = 10

ROWS = sizes([256], [4096, 32768, 65536])
VOCABS = sizes([2000], [10_000, 100_000, 1_000_000])
WIDTH = sizes(64, 256)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
LOSS_IMPLS = ["triton", "torch", "nn_adaptive", "full_softmax", "linear_cross_entropy"]
TOPK_IMPLS = ["triton", "triton_log_prob_topk", "torch_log_prob_topk", "nn_adaptive_log_prob_topk"]

_layers: dict = {}


def cutoffs_for(vocab: int) -> list:
    return cutoffs_at(vocab, CUT_FRACTIONS)


def layer_for(vocab: int) -> AdaptiveSoftmax:
    """One adaptive softmax per vocabulary, built once so every row times the same weights."""
    if vocab not in _layers:
        torch.manual_seed(0)
        _layers[vocab] = AdaptiveSoftmax(WIDTH, cutoffs_for(vocab), DIV).to(DEVICE, DTYPE)
    return _layers[vocab]


def inputs(n: int, vocab: int):
    """hidden [n, d] (requires grad) and Zipf targets [n] on DEVICE."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, WIDTH, generator=g).to(DEVICE, DTYPE).requires_grad_()
    return hidden, zipf_ids(n, vocab, generator=g)


def skip_unless_runnable(impl: str, n: int, vocab: int) -> None:
    if impl.startswith("triton") and DEVICE.type != "cuda":
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not timed)")
    if impl == "linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    # Bytes per [N, V] entry of the rows that materialise it: full softmax keeps bf16
    # logits, their fp32 copy, log-softmax and grads; log_prob + topk an fp32 matrix
    # and the temporaries of its blocks.
    per_entry = {"full_softmax": 16, "triton_log_prob_topk": 8, "torch_log_prob_topk": 12,
                 "nn_adaptive_log_prob_topk": 12}.get(impl, 0)
    if DEVICE.type == "cuda" and per_entry:
        need = per_entry * n * vocab
        if need > 0.8 * torch.cuda.get_device_properties(DEVICE).total_memory:
            pytest.skip(f"the [N, V] matrices need ~{need / 2**30:.0f} GiB")


def loss_step(impl: str, hidden, target, vocab: int):
    """-> a callable running loss forward + backward (no .grad accumulation) and syncing."""
    layer = layer_for(vocab)
    if impl in ("full_softmax", "linear_cross_entropy"):
        weight = torch.randn(vocab, WIDTH, device=DEVICE, dtype=DTYPE).requires_grad_()
        params = [weight]
        if impl == "full_softmax":
            def loss():
                return F.cross_entropy(F.linear(hidden, weight).float(), target)
        else:
            def loss():
                return F.linear_cross_entropy(hidden, weight, target)
    elif impl == "nn_adaptive":
        module = layer.to_torch()
        params = list(module.parameters())

        def loss():
            return module(hidden, target).loss
    else:
        params = list(layer.parameters())

        def loss():
            return cprec_kernels.adaptive_softmax_loss(hidden, target, *layer._params(), backend=impl)

    def step():
        torch.autograd.grad(loss(), [hidden, *params])
        sync()

    return step


def topk_step(impl: str, hidden, vocab: int):
    """-> a callable ranking the k best items of every row (inference, no grad) and syncing."""
    layer = layer_for(vocab)
    hidden = hidden.detach()
    if impl == "triton":
        def rank():
            return cprec_kernels.adaptive_topk(hidden, *layer._params(), TOPK, backend="triton")
    elif impl == "nn_adaptive_log_prob_topk":
        module = layer.to_torch()

        def rank():
            return torch.topk(module.log_prob(hidden), TOPK, dim=1)
    else:
        backend = impl.split("_")[0]

        def rank():
            return torch.topk(cprec_kernels.adaptive_log_prob(hidden, *layer._params(), backend=backend), TOPK, dim=1)

    def step():
        with torch.no_grad():
            rank()
        sync()

    return step


def record(benchmark, op: str, mode: str, impl: str, n: int, vocab: int, **extra) -> None:
    record_row(
        benchmark,
        op=op,
        mode=mode,
        backend=impl,
        dtype=str(DTYPE).replace("torch.", ""),
        rows=n,
        vocab=vocab,
        d=WIDTH,
        clusters=len(CUT_FRACTIONS) + 1,
        div=DIV,
        **extra,
    )


def run(benchmark, step) -> None:
    step()  # compile / warm up outside the timing
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=sizes(5, 10), warmup_rounds=1)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_adaptive_softmax_loss(benchmark, impl, n, vocab):
    skip_unless_runnable(impl, n, vocab)
    hidden, target = inputs(n, vocab)
    run(benchmark, loss_step(impl, hidden, target, vocab))
    record(benchmark, "adaptive_softmax_loss", "forward_backward", impl, n, vocab)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("impl", TOPK_IMPLS)
def test_adaptive_topk(benchmark, impl, n, vocab):
    skip_unless_runnable(impl, n, vocab)
    hidden, _ = inputs(n, vocab)
    run(benchmark, topk_step(impl, hidden, vocab))
    record(benchmark, "adaptive_topk", "forward", impl, n, vocab, k=TOPK)
