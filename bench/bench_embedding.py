"""Block-wise factorized embedding: forward and forward+backward.

Rows: ``triton`` (the fused kernels), ``torch`` (the eager block loop of
``cprec_kernels.reference``) and ``embedding`` (a plain ``F.embedding`` of full width d,
what the block-wise form replaces), on Zipf-distributed ids. 4 blocks, div 4, cutoffs
at 5%, 20% and 50% of V, no head projection (CpRec's default layout).

    pytest bench/bench_embedding.py                      # small grid, CPU, seconds
    CPREC_BENCH_FULL=1 pytest bench/bench_embedding.py   # N 4k..1M, V 10k..1M, d 64/256

Each row's ``extra_info`` holds op, backend, device, dtype, sizes, the bytes the forward
must move (ids + gathered rows + projections + output: divide by the time for the
bandwidth reached) and, on CUDA, the peak memory of the timed call.
Triton rows are skipped on CPU: the interpreter is not a code path worth timing.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, record, sizes, sync, zipf_ids

import cprec_kernels
from cprec_kernels.nn import block_width
from cprec_kernels.testing import cutoffs_for as cutoffs_at

DIV = 4.0
CUT_FRACTIONS = (0.05, 0.2, 0.5)

TOKENS = sizes([512], [4096, 65536, 262144, 1048576])
VOCABS = sizes([1000], [10_000, 100_000, 1_000_000])
WIDTHS = sizes([32], [64, 256])
DTYPES = sizes([torch.float32], [torch.float32, torch.bfloat16])
IMPLS = ["triton", "torch", "embedding"]

_ids_cache: dict = {}


def cutoffs_for(vocab: int) -> list:
    return cutoffs_at(vocab, CUT_FRACTIONS)


def ids_for(n: int, vocab: int) -> torch.Tensor:
    """Zipf ids [n] on DEVICE, drawn once per (n, vocab) so every row times the same batch."""
    if (n, vocab) not in _ids_cache:
        _ids_cache[(n, vocab)] = zipf_ids(n, vocab, generator=torch.Generator().manual_seed(0))
    return _ids_cache[(n, vocab)]


def blockwise_params(vocab: int, d: int, dtype: torch.dtype):
    """-> (cutoffs, tables [c_{j+1}-c_j, d_j], projections [d, d_j], None for the head)."""
    cutoffs = cutoffs_for(vocab)
    edges = [0] + cutoffs
    widths = [block_width(d, DIV, j) for j in range(len(cutoffs))]
    weights = [
        torch.randn(hi - lo, w, device=DEVICE, dtype=dtype).requires_grad_()
        for lo, hi, w in zip(edges[:-1], edges[1:], widths)
    ]
    projections = [None] + [torch.randn(d, w, device=DEVICE, dtype=dtype).requires_grad_() for w in widths[1:]]
    return cutoffs, weights, projections


def forward_bytes(ids: torch.Tensor, cutoffs, weights, projections, d: int) -> int:
    """Bytes the forward must move: ids, one gathered row per token, projections, output."""
    item = weights[0].element_size()
    block = torch.bucketize(ids, torch.tensor(cutoffs, device=ids.device), right=True)
    widths = torch.tensor([w.shape[1] for w in weights], device=ids.device)
    rows = int(widths[block].sum()) * item
    projs = sum(p.numel() for p in projections if p is not None) * item
    return ids.numel() * ids.element_size() + rows + projs + ids.numel() * d * item


def make_step(impl: str, ids, vocab: int, d: int, dtype, backward: bool):
    """-> (step callable, extra_info). The step runs forward (and backward) and syncs."""
    if impl == "embedding":
        table = torch.randn(vocab, d, device=DEVICE, dtype=dtype).requires_grad_()
        params = [table]
        bytes_moved = ids.numel() * (ids.element_size() + 2 * d * table.element_size())

        def forward():
            return F.embedding(ids, table)
    else:
        cutoffs, weights, projections = blockwise_params(vocab, d, dtype)
        params = weights + [p for p in projections if p is not None]
        bytes_moved = forward_bytes(ids, cutoffs, weights, projections, d)

        def forward():
            return cprec_kernels.blockwise_embedding(ids, weights, projections, cutoffs, backend=impl)

    grad = torch.randn(ids.numel(), d, device=DEVICE, dtype=dtype) if backward else None

    def step():
        out = forward()
        if backward:
            # autograd.grad, not .backward(): no accumulation into .grad between rounds.
            torch.autograd.grad(out, params, grad)
        sync()

    return step, {"forward_bytes": bytes_moved}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_blockwise_embedding(benchmark, impl, n, vocab, d, dtype, backward):
    if impl == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not timed)")
    ids = ids_for(n, vocab)
    step, info = make_step(impl, ids, vocab, d, dtype, backward)
    step()  # compile / warm up outside the timing
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark(step)
    record(
        benchmark,
        op="blockwise_embedding",
        mode="forward_backward" if backward else "forward",
        backend=impl,
        dtype=str(dtype).replace("torch.", ""),
        tokens=n,
        vocab=vocab,
        d=d,
        blocks=len(CUT_FRACTIONS) + 1,
        div=DIV,
        **info,
    )
