"""Triton block-wise embedding (``backend="triton"``) against the eager reference and an
independent dense formulation, values and every gradient.

The oracle builds the full [V, d] matrix cat_j(E_j @ P_j^T) in float64 and looks ids up
with ``F.embedding``, so its gradients come from autograd, not from the reference's
block loop. Runs under TRITON_INTERPRET=1 on CPU (set by conftest.py): shapes are tiny.
"""
import pytest
import torch

import cprec_kernels
from cprec_kernels import reference
from embedding_checks import dense_oracle, make_params, run

triton_embedding = pytest.importorskip("cprec_kernels.triton.embedding")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor these tests make lives on the GPU when there is one (the GPU check
    runs this file there), else on the CPU for the interpreter."""
    with torch.device(DEVICE):
        yield


# Relative tolerance per table dtype, on the scale of the largest expected entry.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(actual, expected, dtype, what):
    if expected is None:
        assert actual is None, what
        return
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    scale = expected.abs().max().item() + 1e-3
    torch.testing.assert_close(actual.double(), expected.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=what)


def check(ids, cutoffs, widths, d, dtype=torch.float32, head_projection=False, padding_idx=None, **kwargs):
    """Triton vs the reference (same dtype) and vs the float64 dense oracle: out and grads."""
    weights, projections = make_params(cutoffs, widths, d, dtype, head_projection)
    grad = torch.randn(*ids.shape, d, dtype=torch.float64).to(dtype)
    got = run(ids, weights, projections, cutoffs, padding_idx, grad, "triton", **kwargs)
    ref = run(ids, weights, projections, cutoffs, padding_idx, grad, "torch", **kwargs)
    oracle = dense_oracle(ids, weights, projections, cutoffs, padding_idx, grad)
    for name, expected in (("reference", ref), ("dense oracle", oracle)):
        assert_close(got[0], expected[0], dtype, f"out vs {name}")
        for j, (a, e) in enumerate(zip(got[1], expected[1])):
            assert_close(a, e, dtype, f"grad weights[{j}] vs {name}")
        for j, (a, e) in enumerate(zip(got[2], expected[2])):
            assert_close(a, e, dtype, f"grad projections[{j}] vs {name}")
    return got


CUTOFFS = [7, 20, 41, 60]


def boundary_ids(cutoffs):
    """0, V-1 and c_j - 1, c_j for every cutoff inside the vocabulary."""
    edges = [0] + list(cutoffs)
    return sorted({0, edges[-1] - 1} | {c - 1 for c in edges[1:-1]} | set(edges[1:-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("head_projection", [False, True])
def test_matches_reference_and_oracle(dtype, head_projection):
    # Non-contiguous 3-D ids (every other column of a wider tensor) with every block
    # boundary, repeats, and a padding id inside block 1.
    wide = torch.randint(0, CUTOFFS[-1], (3, 5, 14))
    ids = wide[..., ::2]
    edges = boundary_ids(CUTOFFS)
    wide[0, :2, ::2] = torch.tensor(edges + edges[:6]).reshape(2, 7)
    wide[1, :, ::2] = 8  # padding
    wide[2, 0, ::2] = 33
    assert not ids.is_contiguous()
    widths = [20 if head_projection else 24, 6, 3, 1]
    check(ids, CUTOFFS, widths, 24, dtype, head_projection, padding_idx=8)


@pytest.mark.parametrize("padding_idx", [60, -1, 1000])
def test_padding_outside_vocabulary(padding_idx):
    ids = torch.randint(0, 60, (41,))
    ids[::3] = padding_idx
    out, grad_w, _ = check(ids, CUTOFFS, [16, 4, 2, 1], 16, padding_idx=padding_idx)
    assert out[::3].abs().max() == 0


def test_padding_row_gets_no_gradient():
    ids = torch.tensor([3, 3, 25, 5, 25, 3])
    out, grad_w, grad_p = check(ids, CUTOFFS, [16, 4, 2, 1], 16, padding_idx=25)
    assert out[2].abs().max() == 0 and out[4].abs().max() == 0
    assert grad_w[2][25 - 20].abs().max() == 0  # id 25 is row 5 of block 2


def test_blocks_without_ids():
    # Blocks 1 and 3 get no id: zero table and projection grads.
    ids = torch.tensor([0, 6, 20, 40, 3, 33, 6, 0, 21])
    _, grad_w, grad_p = check(ids, CUTOFFS, [16, 4, 2, 1], 16, head_projection=True)
    for j in (1, 3):
        assert grad_w[j].abs().max() == 0 and grad_p[j].abs().max() == 0
    assert grad_w[0].abs().max() > 0 and grad_p[2].abs().max() > 0


@pytest.mark.parametrize("head_projection", [False, True])
def test_single_block(head_projection):
    ids = torch.randint(0, 23, (4, 9)).t()  # transposed: flattening it copies
    check(ids, [23], [12 if head_projection else 20], 20, head_projection=head_projection, padding_idx=4)


def test_int32_ids_1d():
    ids = torch.tensor(boundary_ids(CUTOFFS) * 3, dtype=torch.int32)
    check(ids, CUTOFFS, [16, 4, 2, 1], 16, dtype=torch.bfloat16, head_projection=True)


def test_more_blocks_than_one_launch():
    # 6 blocks: the forward takes two launches; ids in every block and padding.
    cutoffs = [3, 8, 12, 19, 25, 31]
    ids = torch.tensor(boundary_ids(cutoffs) * 2 + [30, 30, 9])
    check(ids, cutoffs, [32, 8, 5, 2, 1, 1], 32, head_projection=True, padding_idx=9)


@pytest.mark.parametrize("head_projection", [False, True])
def test_wide_rows_take_several_tiles(head_projection):
    # d = 136 > the forward's 128 columns per tile; d_j = 80 and 136 > 64 columns per
    # backward tile; 80 > 32: several reduction tiles per block.
    ids = torch.tensor(boundary_ids(CUTOFFS) + [3, 3, 30, 50, 6, 12])
    check(ids, CUTOFFS, [80 if head_projection else 136, 34, 9, 2], 136, head_projection=head_projection)


def test_long_runs_across_chunks(monkeypatch):
    # Small chunks and splits: a run of one popular id covers > 16 chunks (several steps
    # of the carry loop), others end exactly on chunk edges, and grad P is split-K.
    monkeypatch.setattr(triton_embedding, "CHUNK", 16)
    monkeypatch.setattr(triton_embedding, "TOKENS_PER_SPLIT", 64)
    runs = [(2, 300), (5, 16), (6, 32), (7, 17), (8, 1), (21, 40), (45, 15), (59, 33)]
    ids = torch.cat([torch.full((n,), i) for i, n in runs])
    ids = ids[torch.randperm(ids.numel())]
    check(ids, CUTOFFS, [16, 4, 2, 1], 16, head_projection=True, padding_idx=8)


def test_unchecked_out_of_range_ids_act_as_padding():
    ids = torch.tensor([3, 60, 25, -2, 59])
    out, _, _ = check(ids, CUTOFFS, [16, 4, 2, 1], 16, check_bounds=False)
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False)
    with pytest.raises(ValueError, match="outside"):
        cprec_kernels.blockwise_embedding(ids, weights, projections, CUTOFFS, backend="triton")


def test_backward_is_deterministic():
    ids = torch.randint(0, 60, (300,)) % 9  # many repeats in the head
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, True)
    grad = torch.randn(300, 16)
    first = run(ids, weights, projections, CUTOFFS, None, grad, "triton")
    second = run(ids, weights, projections, CUTOFFS, None, grad, "triton")
    for a, b in zip(first[1] + first[2], second[1] + second[2]):
        assert torch.equal(a, b)


def test_backend_functions_match_reference_structure():
    """The backend functions themselves: same return structure (None for absent grads)."""
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False)
    weights = [w.detach() for w in weights]
    projections = [None if p is None else p.detach() for p in projections]
    ids = torch.tensor([[0, 7, 20], [41, 59, 6]])
    out = triton_embedding.blockwise_embedding_forward(ids, weights, projections, CUTOFFS, None)
    assert out.shape == (2, 3, 16)
    args = (torch.ones_like(out), ids, weights, projections, CUTOFFS, None)
    grads = triton_embedding.blockwise_embedding_backward(*args)
    expected = reference.blockwise_embedding_backward(*args)
    assert grads[1][0] is None and expected[1][0] is None
    assert [g.shape for g in grads[0]] == [g.shape for g in expected[0]]
    assert [g.shape for g in grads[1][1:]] == [g.shape for g in expected[1][1:]]


def test_opcheck_with_triton_backend():
    # The registered op with this backend: fake tensors, autograd and aot dispatch agree.
    weights = [torch.randn(7, 16, requires_grad=True), torch.randn(13, 4, requires_grad=True)]
    projections = [torch.empty(0), torch.randn(16, 4, requires_grad=True)]
    ids = torch.tensor([0, 6, 7, 19, 3, 3, 8])
    args = (ids, weights, projections, [7, 20], 3, True, "triton")
    torch.library.opcheck(torch.ops.cprec.blockwise_embedding.default, args)
