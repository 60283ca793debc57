"""The block-wise factorized embedding on every backend that runs here (torch, cpu,
triton under the interpreter, cuda where present), on the shared harness: values and
every gradient against the reference and against two oracles in float64, the dense
[V, d] lookup (``F.embedding`` on cat_j(E_j @ P_j^T)) and the id-by-id loop.

Tolerances (``TOL``): relative to the largest expected entry, per table dtype; a
second fused backend (cuda against triton) gets twice that.
"""
import pytest
import torch

import cprec_kernels as ck
from cprec_kernels import reference
from cprec_kernels.embedding import BLOCKWISE_EMBEDDING
from cprec_kernels.testing import embedding_by_loop, embedding_dense
from harness import (
    DEVICE,
    as_leaves,
    backend_params,
    check,
    noncontiguous,
    value_and_grads,
)

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1e-2, 1e-2)}
CUTOFFS = [7, 20, 41, 60]
FUSED = ["cpu", "triton", "cuda"]


def dtype_params(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16), backends=("torch", *FUSED)):
    """(backend, dtype) params, skipped where the backend cannot run that dtype here."""
    params = []
    for backend in backends:
        for dtype in dtypes:
            why = BLOCKWISE_EMBEDDING.unavailable(backend, DEVICE, dtype)
            params.append(pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}",
                                       marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


def boundary_ids(cutoffs):
    """0, V-1 and c_j - 1, c_j for every cutoff inside the vocabulary."""
    edges = [0] + list(cutoffs)
    return sorted({0, edges[-1] - 1} | {c - 1 for c in edges[1:-1]} | set(edges[1:-1]))


def make_params(cutoffs, widths, d, dtype, head_projection):
    """Tables N(0, 1/d_j) and projections N(0, 1), so outputs are O(1). -> (weights, projections)."""
    edges = [0] + list(cutoffs)
    weights = [(torch.randn(hi - lo, w, dtype=torch.float64) * w**-0.5).to(DEVICE, dtype)
               for lo, hi, w in zip(edges[:-1], edges[1:], widths)]
    projections = [torch.randn(d, w, dtype=torch.float64).to(DEVICE, dtype) if j > 0 or head_projection else None
                   for j, w in enumerate(widths)]
    return weights, projections


def op(ids, weights, projections, cutoffs, padding_idx=None, check_bounds=True, backend="torch"):
    return ck.blockwise_embedding(ids, weights, projections, cutoffs, padding_idx, check_bounds, backend=backend)


def check_embedding(backend, ids, cutoffs, widths, d, dtype=torch.float32, head_projection=False,
                    padding_idx=None, check_bounds=True, loop_oracle=False):
    """``backend`` against the reference, the dense oracle (and the loop oracle), and on
    cuda also against triton where it runs: out and every grad.
    -> (out, [grad of each table], [grad of each projection or None])."""
    weights, projections = make_params(cutoffs, widths, d, dtype, head_projection)
    inputs = dict(ids=ids.to(DEVICE), weights=weights, projections=projections, cutoffs=cutoffs,
                  padding_idx=padding_idx, check_bounds=check_bounds)
    against = ("torch", "triton") if backend == "cuda" and not BLOCKWISE_EMBEDDING.unavailable("triton", DEVICE) \
        else ("torch",)
    oracles = [embedding_dense] + ([embedding_by_loop] if loop_oracle else [])
    for oracle in oracles:
        got = check(op, inputs, backend, dtype,
                    lambda ids, weights, projections, cutoffs, padding_idx, check_bounds: oracle(
                        ids, weights, projections, cutoffs, padding_idx),
                    tol=TOL[dtype], scaled=True, against=against)
    n = len(weights)
    grads = iter(got[1:])
    grad_w = [next(grads) for _ in range(n)]
    grad_p = [None if p is None else next(grads) for p in projections]
    return got[0], grad_w, grad_p


# --------------------------------------------------------------------------------------
# values and gradients, every backend
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", dtype_params())
@pytest.mark.parametrize("head_projection", [False, True])
def test_matches_reference_and_oracles(backend, dtype, head_projection):
    # Non-contiguous 3-D ids (every other column of a wider tensor) with every block
    # boundary, repeats, and a padding id inside block 1.
    wide = torch.randint(0, CUTOFFS[-1], (3, 5, 14))
    edges = boundary_ids(CUTOFFS)
    wide[0, :2, ::2] = torch.tensor(edges + edges[:6]).reshape(2, 7)
    wide[1, :, ::2] = 8  # padding
    wide[2, 0, ::2] = 33
    ids = wide.to(DEVICE)[..., ::2]
    assert not ids.is_contiguous()
    widths = [20 if head_projection else 24, 6, 3, 1]
    check_embedding(backend, ids, CUTOFFS, widths, 24, dtype, head_projection, padding_idx=8)


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float64, torch.float32)))
@pytest.mark.parametrize("head_projection", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3, 23])
@pytest.mark.parametrize("shape", [(17,), (2, 3, 5)])
def test_matches_loop_oracle(backend, dtype, head_projection, padding_idx, shape):
    cutoffs = [5, 12, 23]
    # every block boundary appears, plus random ids
    n = torch.Size(shape).numel()
    ids = torch.cat([torch.tensor([0, 4, 5, 11, 12, 22]), torch.randint(0, 23, (max(0, n - 6),))])[:n].reshape(shape)
    if padding_idx is not None:
        ids.view(-1)[1] = padding_idx
    out, _, _ = check_embedding(backend, noncontiguous(ids), cutoffs, [6, 3, 1], 6, dtype, head_projection,
                                padding_idx, loop_oracle=True)
    if padding_idx is not None:
        assert out.reshape(-1, 6)[1].abs().sum() == 0


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float64, torch.float32)))
@pytest.mark.parametrize("head_projection", [True, False])
@pytest.mark.parametrize("padding_idx", [None, 3, 41])
def test_odd_shape_repeats_and_an_empty_block(backend, dtype, head_projection, padding_idx):
    # Odd shape, non-contiguous ids, repeated ids, and block [30, 41) left empty.
    ids = torch.randint(0, 30, (3, 14))[:, ::2]
    ids[0, :3] = torch.tensor([3, 3, 29])
    if padding_idx is not None:
        ids[1, 1] = padding_idx
    check_embedding(backend, ids, [5, 12, 30, 41], [12, 6, 3, 1], 12, dtype, head_projection, padding_idx)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
@pytest.mark.parametrize("padding_idx", [60, -1, 1000])
def test_padding_outside_vocabulary(backend, padding_idx):
    ids = torch.randint(0, 60, (41,))
    ids[::3] = padding_idx
    out, _, _ = check_embedding(backend, ids, CUTOFFS, [16, 4, 2, 1], 16, padding_idx=padding_idx)
    assert out[::3].abs().max() == 0


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float32, torch.bfloat16, torch.float16)))
def test_padding_row_gets_no_gradient(backend, dtype):
    ids = torch.tensor([3, 3, 25, 5, 25, 3])
    out, grad_w, _ = check_embedding(backend, ids, CUTOFFS, [16, 4, 2, 1], 16, dtype, padding_idx=25)
    assert out[2].abs().max() == 0 and out[4].abs().max() == 0
    assert grad_w[2][25 - 20].abs().max() == 0  # id 25 is row 5 of block 2


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
def test_blocks_without_ids(backend):
    # Blocks 1 and 3 get no id: zero table and projection grads.
    ids = torch.tensor([0, 6, 20, 40, 3, 33, 6, 0, 21])
    _, grad_w, grad_p = check_embedding(backend, ids, CUTOFFS, [16, 4, 2, 1], 16, head_projection=True)
    for j in (1, 3):
        assert grad_w[j].abs().max() == 0 and grad_p[j].abs().max() == 0
    assert grad_w[0].abs().max() > 0 and grad_p[2].abs().max() > 0


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
@pytest.mark.parametrize("head_projection", [False, True])
def test_single_block_transposed_ids(backend, head_projection):
    ids = torch.randint(0, 23, (4, 9)).t()  # transposed: flattening it copies
    check_embedding(backend, ids, [23], [12 if head_projection else 20], 20, head_projection=head_projection,
                    padding_idx=4)


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float32, torch.bfloat16, torch.float16)))
def test_int32_ids_1d_strided(backend, dtype):
    base = torch.tensor(boundary_ids(CUTOFFS) * 3, dtype=torch.int32)
    ids = torch.stack([base, torch.zeros_like(base)], dim=1).reshape(-1)[::2]  # a 1-D view with stride 2
    assert ids.stride(0) == 2
    check_embedding(backend, ids, CUTOFFS, [16, 4, 2, 1], 16, dtype, head_projection=True)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
def test_more_blocks_and_unaligned_widths(backend):
    # 6 blocks (two forward launches in Triton); widths 5, 3, 1 and d = 17: rows not a
    # multiple of 16 bytes (the CUDA scalar paths); ids in every block and padding.
    cutoffs = [3, 8, 12, 19, 25, 31]
    ids = torch.tensor(boundary_ids(cutoffs) * 2 + [30, 30, 9])
    check_embedding(backend, ids, cutoffs, [17, 8, 5, 3, 1, 1], 17, head_projection=True, padding_idx=9)
    check_embedding(backend, ids, cutoffs, [32, 8, 5, 2, 1, 1], 32, head_projection=True, padding_idx=9)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
@pytest.mark.parametrize("head_projection", [False, True])
def test_wide_rows_take_several_tiles(backend, head_projection):
    # d = 136 > the Triton forward's 128 columns per tile; d_j = 80 and 136 > 64 columns
    # per backward tile; 80 > 32: several reduction tiles per block.
    ids = torch.tensor(boundary_ids(CUTOFFS) + [3, 3, 30, 50, 6, 12])
    check_embedding(backend, ids, CUTOFFS, [80 if head_projection else 136, 34, 9, 2], 136,
                    head_projection=head_projection)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
def test_unchecked_out_of_range_ids_act_as_padding(backend):
    ids = torch.tensor([3, 60, 25, -2, 59])
    if backend == "cpu":  # the C++ kernel checks ids itself
        weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False)
        with pytest.raises(RuntimeError, match="outside"):
            op(ids, weights, projections, CUTOFFS, check_bounds=False, backend="cpu")
        return
    out, _, _ = check_embedding(backend, ids, CUTOFFS, [16, 4, 2, 1], 16, check_bounds=False)
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False)
    with pytest.raises(ValueError, match="outside"):
        op(ids.to(DEVICE), weights, projections, CUTOFFS, backend=backend)


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float64,), ("torch", "cpu", "triton")))
def test_gradcheck(backend, dtype):
    weights, projections = make_params([3, 7], [4, 2], 4, dtype, True)
    ids = torch.tensor([0, 2, 3, 6, 6, 1], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda w0, w1, p0, p1: op(ids, [w0, w1], [p0, p1], [3, 7], padding_idx=1, backend=backend),
        tuple(t.requires_grad_() for t in (*weights, *projections)),
    )
    table = torch.randn(7, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[6, 0], [2, 2]], device=DEVICE)
    torch.testing.assert_close(op(ids, [table], [None], [7], backend=backend), table[ids])
    assert torch.autograd.gradcheck(lambda t: op(ids, [t], [None], [7], backend=backend), (table,))


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING))
def test_opcheck(backend):
    w0 = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    w1 = torch.randn(13, 4, device=DEVICE, requires_grad=True)
    p1 = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[0, 6, 7], [19, 3, 8]], device=DEVICE)
    identity = w0.new_empty(0)
    for padding_idx in (3, 20):
        torch.library.opcheck(torch.ops.cprec.blockwise_embedding.default,
                              (ids, [w0, w1], [identity, p1], [7, 20], padding_idx, True, backend))


# --------------------------------------------------------------------------------------
# the backend functions themselves, and determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING, FUSED))
def test_backend_functions_match_the_reference(backend):
    """Called directly: the reference's values and return structure (None for absent grads)."""
    kernels = BLOCKWISE_EMBEDDING.kernels(backend)
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False)
    ids = torch.tensor([[0, 7, 20], [41, 59, 6]], device=DEVICE)
    out = kernels.forward(ids, weights, projections, CUTOFFS, None)
    torch.testing.assert_close(out, reference.blockwise_embedding_forward(ids, weights, projections, CUTOFFS, None))
    args = (torch.randn_like(out), ids, weights, projections, CUTOFFS, None)
    grads = kernels.backward(*args)
    expected = reference.blockwise_embedding_backward(*args)
    assert grads[1][0] is None and expected[1][0] is None
    for got, want in zip(grads[0] + grads[1][1:], expected[0] + expected[1][1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if backend == "cuda":  # empty ids: zero grads, no launch
        empty = ids.new_empty(0)
        assert kernels.forward(empty, weights, projections, CUTOFFS, None).shape == (0, 16)
        gw, gp = kernels.backward(out.new_empty(0, 16), empty, weights, projections, CUTOFFS, None)
        assert all(g.abs().max() == 0 for g in gw) and all(g.abs().max() == 0 for g in gp if g is not None)


@pytest.mark.parametrize("backend, dtype", dtype_params((torch.float32, torch.bfloat16, torch.float16), FUSED))
def test_backward_is_deterministic(backend, dtype):
    n = 5000 if DEVICE.type == "cuda" else 300  # the interpreter is slow
    ids = torch.randint(0, 60, (n,)) % 9  # many repeats in the head
    ids[::7] = torch.randint(20, 60, (len(ids[::7]),))
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, dtype, True)
    inputs = dict(ids=ids.to(DEVICE), weights=weights, projections=projections, cutoffs=CUTOFFS, backend=backend)
    first = value_and_grads(op, as_leaves(inputs))
    second = value_and_grads(op, as_leaves(inputs))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING, ["cpu"]))
def test_cpu_backward_is_thread_count_invariant(backend):
    kernels = BLOCKWISE_EMBEDDING.kernels("cpu")
    weights, projections = make_params([5, 12, 30, 41], [12, 6, 3, 1], 12, torch.float32, True)
    ids = torch.randint(0, 41, (4000,))
    grad = torch.randn(4000, 12)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(kernels.backward(grad, ids, weights, projections, [5, 12, 30, 41], None))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], run[0] + run[1]):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Triton: chunked runs and block boundaries of the table gradient
# --------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(BLOCKWISE_EMBEDDING.unavailable("triton", DEVICE) is not None,
                                  reason=str(BLOCKWISE_EMBEDDING.unavailable("triton", DEVICE)))


@needs_triton
def test_triton_long_runs_across_chunks(monkeypatch):
    # Small chunks and splits: a run of one popular id covers > 16 chunks (several steps
    # of the carry loop), others end exactly on chunk edges, and grad P is split-K.
    from cprec_kernels.embedding import triton as kernels

    monkeypatch.setattr(kernels, "CHUNK", 16)
    monkeypatch.setattr(kernels, "TOKENS_PER_SPLIT", 64)
    runs = [(2, 300), (5, 16), (6, 32), (7, 17), (8, 1), (21, 40), (45, 15), (59, 33)]
    ids = torch.cat([torch.full((n,), i) for i, n in runs])
    check_embedding("triton", ids[torch.randperm(ids.numel())], CUTOFFS, [16, 4, 2, 1], 16, head_projection=True,
                    padding_idx=8)


@needs_triton
@pytest.mark.parametrize("chunk", [16, 64])
def test_triton_table_grad_stays_inside_its_block(monkeypatch, chunk):
    # The table-grad kernels write row (id - lo) of block j for the sorted ids between
    # bounds[j] and bounds[j + 1]. Given V guard rows on both sides of each block (lo
    # moved down by V, V extra rows after), an id taken from any other block by a wrong
    # boundary lands in a guard row instead of out of bounds, and the assertions see it.
    from cprec_kernels.embedding import triton as kernels

    monkeypatch.setattr(kernels, "CHUNK", chunk)
    G = CUTOFFS[-1]
    widths = [16, 4, 2, 1]
    weights, projections = make_params(CUTOFFS, widths, 16, torch.float32, False)
    runs = [(i, n) for i, n in zip(boundary_ids(CUTOFFS), [1, 17, 5, 16, 2, 33, 1, 9])]
    ids = torch.cat([torch.full((n,), i) for i, n in runs] + [torch.randint(0, 60, (40,))])
    ids = ids[torch.randperm(ids.numel())].to(DEVICE)
    g = torch.randn(ids.numel(), 16, device=DEVICE)
    want, _ = reference.blockwise_embedding_backward(g, ids, weights, projections, CUTOFFS, None)
    keys, order, bounds = kernels._sort_by_id(ids, CUTOFFS, None)
    edges = [0] + CUTOFFS
    for j, (table, proj) in enumerate(zip(weights, projections)):
        guarded = torch.zeros(table.shape[0] + 2 * G, table.shape[1], device=DEVICE)
        grad = kernels._table_grad(g, keys, order, bounds, j, edges[j] - G, guarded, proj)
        assert grad[:G].abs().max() == 0, f"block {j}: ids of the previous block written"
        assert grad[G + table.shape[0]:].abs().max() == 0, f"block {j}: ids of the next block written"
        torch.testing.assert_close(grad[G:G + table.shape[0]], want[j], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# CUDA: the staged and L1 projection paths, 64-position backward chunks, float64
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING, ["cuda"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_projection", [False, True])
def test_cuda_many_tokens_staged_and_wide_paths(backend, dtype, head_projection):
    # 3000 tokens: tiles hold >= 16 tokens of each projected block (shared-memory path);
    # d = 320 > 256 columns per staged slice (two slices); a projected head of width
    # 288 > 256 takes the L1 path.
    ids = torch.cat([torch.randint(0, 50, (1500,)), torch.randint(50, 400, (1000,)), torch.randint(400, 2000, (500,))])
    ids = ids[torch.randperm(ids.numel())].reshape(30, 100)
    check_embedding(backend, ids, [50, 400, 2000], [288 if head_projection else 320, 80, 20], 320, dtype,
                    head_projection, padding_idx=7)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING, ["cuda"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_long_runs_across_chunks(backend, dtype):
    # Backward chunks hold 64 sorted positions: a run of one popular id covers many
    # chunks, others end exactly on chunk edges (64, 128) or one past.
    runs = [(2, 1000), (5, 64), (6, 128), (7, 65), (8, 1), (21, 40), (45, 63), (59, 33)]
    ids = torch.cat([torch.full((n,), i) for i, n in runs])
    check_embedding(backend, ids[torch.randperm(ids.numel())], CUTOFFS, [16, 4, 2, 1], 16, dtype,
                    head_projection=True, padding_idx=8)


@pytest.mark.parametrize("backend", backend_params(BLOCKWISE_EMBEDDING, ["cuda"]))
def test_cuda_refuses_float64_by_name(backend):
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float64, False)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*not torch.float64"):
        op(torch.tensor([1, 2], device=DEVICE), weights, projections, CUTOFFS, backend="cuda")
