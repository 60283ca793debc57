"""CPU benchmarks of the ``cpu`` backend (C++ kernels) against eager PyTorch and
``torch.compile`` of the eager code, side by side in one run.

    pytest bench/bench_cpu.py                      # small grid, seconds (CI)
    CPREC_BENCH_FULL=1 pytest bench/bench_cpu.py   # the sizes of issue 6

Rows are grouped per op and size; compare the ``cpu`` row to ``eager``/``compile`` in
the same group. All tensors are CPU tensors whatever the machine has.
``CPREC_BENCH_THREADS=N`` sets ``torch.set_num_threads(N)`` first (as in bench_models.py).
"""
import importlib
import os

import pytest
import torch

import cprec_kernels as ck
from cprec_kernels.nn import CausalConv1d, NextItNetBlock, every_nth_from_end, input_stride, last_position
from cprec_kernels.testing import conv_by_padding, cutoffs_for, eager_blockwise_embedding
from conftest import sizes, zipf_ids
from cpu_steps import CONV_IMPLS, LOSS_IMPLS, adaptive_loss_step, compiled, conv_ln_relu_step, eager_conv_ln_relu

try:
    importlib.import_module("cprec_kernels._core.cpu_extension")
except ModuleNotFoundError:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

IMPLS = CONV_IMPLS
if os.environ.get("CPREC_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CPREC_BENCH_THREADS"]))


def _bench(benchmark, group, fn):
    benchmark.group = group
    fn()  # warm-up: first-call allocation, and torch.compile's compilation
    benchmark(fn)


# --------------------------------------------------------------------------------------
# block-wise embedding, forward + backward
# --------------------------------------------------------------------------------------
def _cutoffs(vocab):
    return cutoffs_for(vocab, (0.02, 0.1, 0.5))


def _embedding_params(vocab, d):
    """CpRec's input layer: an identity head (d_0 = d) and tails of width d / 4^j."""
    cutoffs = _cutoffs(vocab)
    weights, projs = [], []
    for j, (lo, hi) in enumerate(zip([0] + cutoffs, cutoffs)):
        dj = d // 4**j
        weights.append((torch.randn(hi - lo, dj) * 0.1).requires_grad_())
        projs.append(None if j == 0 else (torch.randn(d, dj) * 0.1).requires_grad_())
    return weights, projs, cutoffs


@pytest.mark.parametrize("n,vocab,d", sizes([(1024, 10_000, 64)], [(16_384, 100_000, 256)]))
@pytest.mark.parametrize("impl", IMPLS)
def test_blockwise_embedding_fwd_bwd(benchmark, impl, n, vocab, d):
    torch.manual_seed(0)
    weights, projs, cutoffs = _embedding_params(vocab, d)
    ids = zipf_ids(n, vocab, device="cpu")
    params = weights + [p for p in projs if p is not None]
    grad = torch.randn(n, d)
    eager = compiled(eager_blockwise_embedding) if impl == "compile" else eager_blockwise_embedding

    def step():
        if impl == "cpu":
            out = ck.blockwise_embedding(ids, weights, projs, cutoffs, backend="cpu")
        else:
            out = eager(ids, weights, projs, cutoffs)
        out.backward(grad)
        for p in params:
            p.grad = None

    _bench(benchmark, f"embedding fwd+bwd N={n} V={vocab} d={d}", step)


# --------------------------------------------------------------------------------------
# adaptive softmax loss, forward + backward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,d,vocab,cutoffs",
    sizes([(512, 64, 10_000, [200, 1_000, 5_000])], [(4096, 256, 100_000, [2_000, 10_000, 50_000])]),
)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_adaptive_softmax_loss_fwd_bwd(benchmark, impl, n, d, vocab, cutoffs):
    """See ``cpu_steps.adaptive_loss_step``; ``gemm-floor``: the same products on BLAS alone."""
    _bench(benchmark, f"adaptive loss fwd+bwd N={n} d={d} V={vocab}", adaptive_loss_step(impl, n, d, vocab, cutoffs))


# --------------------------------------------------------------------------------------
# causal conv + LayerNorm + ReLU (+ residual), inference forward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,t,c", sizes([(4, 50, 64)], [(32, 100, 256), (1, 50, 256)]))
@pytest.mark.parametrize("impl", IMPLS)
def test_conv_ln_relu_inference(benchmark, impl, batch, t, c):
    torch.manual_seed(0)
    x = torch.randn(batch, t, c)
    w, b = torch.randn(c, c, 3) / (3 * c) ** 0.5, torch.randn(c)
    ln_w, ln_b = torch.ones(c), torch.zeros(c)
    eager = compiled(eager_conv_ln_relu) if impl == "compile" else eager_conv_ln_relu

    @torch.no_grad()
    def step():
        if impl == "cpu":
            return ck.causal_conv1d_ln_relu(x, w, b, ln_w, ln_b, 2, 1e-8, residual=x, backend="cpu")
        return eager(x, w, b, ln_w, ln_b, x, 2)

    _bench(benchmark, f"conv+ln+relu fwd B={batch} T={t} C={c}", step)


@pytest.mark.parametrize("batch,t,c", sizes([(4, 50, 64)], [(16, 50, 256), (32, 100, 256)]))
@pytest.mark.parametrize("impl", IMPLS)
def test_conv_ln_relu_fwd_bwd(benchmark, impl, batch, t, c):
    """Training: see ``cpu_steps.conv_ln_relu_step`` (one layer per dilation 1, 2, 4, 8)."""
    _bench(benchmark, f"conv+ln+relu fwd+bwd dilations 1-8 B={batch} T={t} C={c}", conv_ln_relu_step(impl, batch, t, c))


# --------------------------------------------------------------------------------------
# single-request inference: one user, T = 50, top-10 over V items
# --------------------------------------------------------------------------------------
class NextItNetEager(torch.nn.Module):
    """NextItNet in eager PyTorch: full embedding, residual blocks, Linear(d, V) + topk."""

    def __init__(self, vocab, d, dilations):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.dilations = dilations
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(d, d, 3) for _ in range(2 * len(dilations)))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d, eps=1e-8) for _ in range(2 * len(dilations)))
        self.out = torch.nn.Linear(d, vocab)

    def trunk(self, ids):
        x = self.embed(ids)
        for i, dil in enumerate(self.dilations):
            h = x
            for j, dj in enumerate((dil, 2 * dil)):
                conv, norm = self.convs[2 * i + j], self.norms[2 * i + j]
                h = torch.relu(norm(conv_by_padding(h, conv.weight, conv.bias, dj)))
            x = x + h
        return x[:, -1]

    def forward(self, ids, k):
        return torch.topk(torch.log_softmax(self.out(self.trunk(ids)), -1), k)


class CpRecCpu(torch.nn.Module):
    """CpRec on the cpu backend: block-wise embedding, fused conv layers (cross-layer
    sharing), adaptive softmax top-k that never builds the [1, V] scores. ``forward``
    evaluates only the positions the last one depends on (``last_position``);
    ``full_history`` runs the convs over all T positions as training does."""

    def __init__(self, vocab, d, dilations, full_history=False):
        super().__init__()
        cutoffs = _cutoffs(vocab)
        self.cutoffs, self.full_history = cutoffs, full_history
        w, p, _ = _embedding_params(vocab, d)
        self.emb_w = [t.detach() for t in w]
        self.emb_p = [None if t is None else t.detach() for t in p]
        conv = CausalConv1d(d, d, 3)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(d, d, 3) / (3 * d) ** 0.5)
            conv.bias.zero_()
        self.blocks = torch.nn.ModuleList(
            NextItNetBlock(d, dil, conv1=conv, conv2=conv, eps=1e-8, backend="cpu") for dil in dilations
        )
        self.softmax = torch.nn.AdaptiveLogSoftmaxWithLoss(d, vocab, cutoffs[:-1], div_value=4.0)

    def trunk(self, ids):
        if self.full_history:
            x = ck.blockwise_embedding(ids, self.emb_w, self.emb_p, self.cutoffs, backend="cpu")
            for block in self.blocks:
                x = block(x)
            return x[:, -1]
        ids = every_nth_from_end(ids, input_stride(self.blocks))
        x = ck.blockwise_embedding(ids, self.emb_w, self.emb_p, self.cutoffs, backend="cpu")
        return last_position(self.blocks, x, strided=True)

    def forward(self, ids, k):
        s = self.softmax
        return ck.adaptive_topk(self.trunk(ids), s.head.weight, s.head.bias, [t[0].weight for t in s.tail],
                                [t[1].weight for t in s.tail], self.cutoffs, k, backend="cpu")


@pytest.mark.parametrize("vocab,d,t", sizes([(10_000, 64, 50)], [(100_000, 256, 50)]))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("part", ["output", "model"])
@pytest.mark.parametrize("impl", ["cprec-cpu", "cprec-cpu-full-history", "nextitnet-eager"])
def test_single_request_top10(benchmark, impl, part, threads, vocab, d, t):
    """``output``: the last hidden state -> top-10 only; ``model``: ids -> top-10
    through 4 residual blocks (dilations 1, 2, 4, 8)."""
    if part == "output" and impl == "cprec-cpu-full-history":
        pytest.skip("the same output layer as cprec-cpu")
    torch.manual_seed(0)
    dilations = [1, 2, 4, 8]
    if impl == "nextitnet-eager":
        model = NextItNetEager(vocab, d, dilations).eval()
    else:
        model = CpRecCpu(vocab, d, dilations, full_history=impl.endswith("full-history")).eval()
    ids = zipf_ids(t, vocab, device="cpu").unsqueeze(0)  # one user: [1, T]
    with torch.no_grad():
        hidden = model.trunk(ids)  # [1, d]
    if impl.startswith("cprec-cpu"):
        s = model.softmax
        head = (s.head.weight, s.head.bias, [x[0].weight for x in s.tail], [x[1].weight for x in s.tail])
        output = lambda: ck.adaptive_topk(hidden, *head, model.cutoffs, 10, backend="cpu")  # noqa: E731
    else:
        output = lambda: torch.topk(torch.log_softmax(model.out(hidden), -1), 10)  # noqa: E731
    fn = output if part == "output" else (lambda: model(ids, 10))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            _bench(benchmark, f"single request top-10 {part} V={vocab} d={d} T={t} threads={threads}", fn)
    finally:
        torch.set_num_threads(previous)
