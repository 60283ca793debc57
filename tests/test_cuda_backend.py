"""The CUDA C++ backend (``backend="cuda"``, csrc/cuda) of the block-wise embedding.

On a GPU: values and every gradient against the eager reference (``backend="torch"``),
a float64 dense oracle and the Triton kernel, in float32/bfloat16/float16, with padding,
empty blocks, block boundaries, 1-D/3-D/non-contiguous ids, runs of one id across many
backward chunks, the staged and the L1 projection paths, and bitwise-equal gradients over
two backward calls. Without a GPU (or without the built extension) those skip; what runs
everywhere: an explicit ``backend="cuda"`` raises a clear RuntimeError, importing
``cprec_kernels.cuda`` without the extension raises ModuleNotFoundError saying why, and
(where nvcc exists; marked slow, ~30 s on 2 cores) csrc/cuda/compile_check.sh compiles
every kernel file.
"""
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cprec_kernels as ck
from cprec_kernels import backends
from embedding_checks import dense_oracle, make_params, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_backend_loads() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("cprec_kernels.cuda")
    except ModuleNotFoundError:
        return False
    return True


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cuda_backend = pytest.mark.skipif(
    not _cuda_backend_loads(), reason="needs a CUDA GPU and the built CUDA extension (cprec_kernels._C_cuda)"
)

# Relative tolerance per table dtype, on the scale of the largest expected entry.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUTOFFS = [7, 20, 41, 60]


# --------------------------------------------------------------------------------------
# availability (runs everywhere)
# --------------------------------------------------------------------------------------
def _forget_cuda_backend(monkeypatch):
    """Make the next import of cprec_kernels.cuda find no built extension."""
    monkeypatch.setitem(sys.modules, "cprec_kernels._C_cuda", None)
    monkeypatch.delitem(sys.modules, "cprec_kernels.cuda", raising=False)
    monkeypatch.delattr(ck, "_C_cuda", raising=False)
    monkeypatch.delattr(ck, "cuda", raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    monkeypatch.delenv("CPREC_CUDA_JIT", raising=False)


def test_import_without_extension_says_not_built(monkeypatch):
    _forget_cuda_backend(monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="CUDA extension .* is not built") as info:
        importlib.import_module("cprec_kernels.cuda")
    assert "nvcc" in str(info.value)  # says how to get it
    if torch.version.cuda is None:
        assert "CPU-only build" in str(info.value)


def test_explicit_cuda_backend_on_cpu_tensors_raises():
    weights = [torch.randn(7, 8), torch.randn(5, 2)]
    projections = [None, torch.randn(8, 2)]
    ids = torch.tensor([0, 3, 9, 11])
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA tensors"):
        ck.blockwise_embedding(ids, weights, projections, [7, 12], backend="cuda")


def test_explicit_cuda_backend_without_extension_says_why(monkeypatch):
    # The dispatch check for a CUDA device (no tensor is made, so no GPU is needed): the
    # error carries the import error's text; auto falls back quietly.
    _forget_cuda_backend(monkeypatch)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA extension .* is not built"):
        backends.resolve("cuda", "blockwise_embedding_forward", torch.device("cuda"), torch.float32)
    assert backends.resolve(None, "blockwise_embedding_forward", torch.device("cuda"), torch.float32) in (
        "triton",
        "torch",
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_compile_check_script():
    """Every csrc/cuda/*.cu compiles for sm_90 with the toolkit's headers only (~30 s)."""
    script = os.path.join(ROOT, "csrc", "cuda", "compile_check.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedding.cu ok" in result.stdout


# --------------------------------------------------------------------------------------
# correctness on a GPU
# --------------------------------------------------------------------------------------
def assert_close(actual, expected, dtype, what, scale_factor=1.0):
    if expected is None:
        assert actual is None, what
        return
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    scale = expected.abs().max().item() + 1e-3
    tol = TOL[dtype] * scale_factor
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=what)


def _triton_available() -> bool:
    try:
        importlib.import_module("cprec_kernels.triton.embedding")
    except ModuleNotFoundError:
        return False
    return True


def check(ids, cutoffs, widths, d, dtype=torch.float32, head_projection=False, padding_idx=None, **kwargs):
    """CUDA vs the reference (same dtype), the float64 dense oracle and Triton: out and grads."""
    weights, projections = make_params(cutoffs, widths, d, dtype, head_projection, device="cuda")
    grad = torch.randn(*ids.shape, d, dtype=torch.float64).to("cuda", dtype)
    got = run(ids, weights, projections, cutoffs, padding_idx, grad, "cuda", **kwargs)
    expected = [("reference", run(ids, weights, projections, cutoffs, padding_idx, grad, "torch", **kwargs), 1.0)]
    expected.append(("dense oracle", dense_oracle(ids, weights, projections, cutoffs, padding_idx, grad), 1.0))
    if _triton_available():  # two low-precision kernels: each within TOL of the truth
        expected.append(("triton", run(ids, weights, projections, cutoffs, padding_idx, grad, "triton", **kwargs), 2.0))
    for name, ref, factor in expected:
        assert_close(got[0], ref[0], dtype, f"out vs {name}", factor)
        for j, (a, e) in enumerate(zip(got[1], ref[1])):
            assert_close(a, e, dtype, f"grad weights[{j}] vs {name}", factor)
        for j, (a, e) in enumerate(zip(got[2], ref[2])):
            assert_close(a, e, dtype, f"grad projections[{j}] vs {name}", factor)
    return got


def boundary_ids(cutoffs):
    """0, V-1 and c_j - 1, c_j for every cutoff inside the vocabulary."""
    edges = [0] + list(cutoffs)
    return sorted({0, edges[-1] - 1} | {c - 1 for c in edges[1:-1]} | set(edges[1:-1]))


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_projection", [False, True])
def test_matches_reference_oracle_and_triton(dtype, head_projection):
    # Non-contiguous 3-D ids (every other column of a wider tensor) with every block
    # boundary, repeats, and a padding id inside block 1.
    wide = torch.randint(0, CUTOFFS[-1], (3, 5, 14))
    edges = boundary_ids(CUTOFFS)
    wide[0, :2, ::2] = torch.tensor(edges + edges[:6]).reshape(2, 7)
    wide[1, :, ::2] = 8  # padding
    wide[2, 0, ::2] = 33
    ids = wide.cuda()[..., ::2]
    assert not ids.is_contiguous()
    widths = [20 if head_projection else 24, 6, 3, 1]
    check(ids, CUTOFFS, widths, 24, dtype, head_projection, padding_idx=8)


@needs_cuda_backend
@pytest.mark.parametrize("padding_idx", [60, -1, 1000])
def test_padding_outside_vocabulary(padding_idx):
    ids = torch.randint(0, 60, (41,))
    ids[::3] = padding_idx
    out, _, _ = check(ids.cuda(), CUTOFFS, [16, 4, 2, 1], 16, padding_idx=padding_idx)
    assert out[::3].abs().max() == 0


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_row_gets_no_gradient(dtype):
    ids = torch.tensor([3, 3, 25, 5, 25, 3], device="cuda")
    out, grad_w, _ = check(ids, CUTOFFS, [16, 4, 2, 1], 16, dtype, padding_idx=25)
    assert out[2].abs().max() == 0 and out[4].abs().max() == 0
    assert grad_w[2][25 - 20].abs().max() == 0  # id 25 is row 5 of block 2


@needs_cuda_backend
def test_blocks_without_ids():
    # Blocks 1 and 3 get no id: zero table and projection grads.
    ids = torch.tensor([0, 6, 20, 40, 3, 33, 6, 0, 21], device="cuda")
    _, grad_w, grad_p = check(ids, CUTOFFS, [16, 4, 2, 1], 16, head_projection=True)
    for j in (1, 3):
        assert grad_w[j].abs().max() == 0 and grad_p[j].abs().max() == 0
    assert grad_w[0].abs().max() > 0 and grad_p[2].abs().max() > 0


@needs_cuda_backend
@pytest.mark.parametrize("head_projection", [False, True])
def test_single_block_transposed_ids(head_projection):
    ids = torch.randint(0, 23, (4, 9), device="cuda").t()  # transposed: flattening copies
    check(ids, [23], [12 if head_projection else 20], 20, head_projection=head_projection, padding_idx=4)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_int32_ids_1d_strided(dtype):
    base = torch.tensor(boundary_ids(CUTOFFS) * 3, dtype=torch.int32, device="cuda")
    wide = torch.stack([base, torch.zeros_like(base)], dim=1).reshape(-1)
    ids = wide[::2]  # a 1-D view with stride 2: read in place
    assert ids.stride(0) == 2
    check(ids, CUTOFFS, [16, 4, 2, 1], 16, dtype, head_projection=True)


@needs_cuda_backend
def test_more_blocks_and_unaligned_widths():
    # 6 blocks; widths 5, 3, 1 and d = 17: rows not a multiple of 16 bytes (scalar paths).
    cutoffs = [3, 8, 12, 19, 25, 31]
    ids = torch.tensor(boundary_ids(cutoffs) * 2 + [30, 30, 9], device="cuda")
    check(ids, cutoffs, [17, 8, 5, 3, 1, 1], 17, head_projection=True, padding_idx=9)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_projection", [False, True])
def test_many_tokens_staged_and_wide_paths(dtype, head_projection):
    # 3000 tokens: tiles hold >= 16 tokens of each projected block (shared-memory path);
    # d = 320 > 256 columns per staged slice (two slices); a projected head of width
    # 288 > 256 takes the L1 path.
    cutoffs = [50, 400, 2000]
    ids = torch.cat([torch.randint(0, 50, (1500,)), torch.randint(50, 400, (1000,)), torch.randint(400, 2000, (500,))])
    ids = ids[torch.randperm(ids.numel())].reshape(30, 100).cuda()
    widths = [288 if head_projection else 320, 80, 20]
    check(ids, cutoffs, widths, 320, dtype, head_projection, padding_idx=7)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_runs_across_chunks(dtype):
    # Backward chunks hold 64 sorted positions: a run of one popular id covers many
    # chunks, others end exactly on chunk edges (64, 128) or one past.
    runs = [(2, 1000), (5, 64), (6, 128), (7, 65), (8, 1), (21, 40), (45, 63), (59, 33)]
    ids = torch.cat([torch.full((n,), i) for i, n in runs])
    ids = ids[torch.randperm(ids.numel())].cuda()
    check(ids, CUTOFFS, [16, 4, 2, 1], 16, dtype, head_projection=True, padding_idx=8)


@needs_cuda_backend
def test_unchecked_out_of_range_ids_act_as_padding():
    ids = torch.tensor([3, 60, 25, -2, 59], device="cuda")
    out, _, _ = check(ids, CUTOFFS, [16, 4, 2, 1], 16, check_bounds=False)
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_deterministic(dtype):
    ids = (torch.randint(0, 60, (5000,)) % 9).cuda()  # many repeats in the head
    ids[::7] = torch.randint(20, 60, (len(ids[::7]),), device="cuda")
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, dtype, True, device="cuda")
    grad = torch.randn(5000, 16, device="cuda").to(dtype)
    first = run(ids, weights, projections, CUTOFFS, None, grad, "cuda")
    second = run(ids, weights, projections, CUTOFFS, None, grad, "cuda")
    for a, b in zip(first[1] + first[2], second[1] + second[2]):
        assert torch.equal(a, b)


@needs_cuda_backend
def test_backend_functions_structure_and_empty_ids():
    from cprec_kernels import cuda as cuda_backend
    from cprec_kernels import reference

    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float32, False, device="cuda")
    weights = [w.detach() for w in weights]
    projections = [None if p is None else p.detach() for p in projections]
    ids = torch.tensor([[0, 7, 20], [41, 59, 6]], device="cuda")
    out = cuda_backend.blockwise_embedding_forward(ids, weights, projections, CUTOFFS, None)
    assert out.shape == (2, 3, 16)
    args = (torch.ones_like(out), ids, weights, projections, CUTOFFS, None)
    grads = cuda_backend.blockwise_embedding_backward(*args)
    expected = reference.blockwise_embedding_backward(*args)
    assert grads[1][0] is None and expected[1][0] is None
    empty = ids.new_empty(0)
    assert cuda_backend.blockwise_embedding_forward(empty, weights, projections, CUTOFFS, None).shape == (0, 16)
    gw, gp = cuda_backend.blockwise_embedding_backward(out.new_empty(0, 16), empty, weights, projections, CUTOFFS, None)
    assert all(g.abs().max() == 0 for g in gw) and all(g.abs().max() == 0 for g in gp if g is not None)


@needs_cuda_backend
def test_float64_is_refused_by_name():
    weights, projections = make_params(CUTOFFS, [16, 4, 2, 1], 16, torch.float64, False, device="cuda")
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        ck.blockwise_embedding(torch.tensor([1, 2], device="cuda"), weights, projections, CUTOFFS, backend="cuda")


@needs_cuda_backend
def test_opcheck_cuda_backend():
    w0 = torch.randn(3, 4, device="cuda", requires_grad=True)
    w1 = torch.randn(5, 2, device="cuda", requires_grad=True)
    p1 = torch.randn(4, 2, device="cuda", requires_grad=True)
    ids = torch.tensor([[0, 7], [3, 8]], device="cuda")
    identity = w0.new_empty(0)
    torch.library.opcheck(
        torch.ops.cprec.blockwise_embedding.default, (ids, [w0, w1], [identity, p1], [3, 8], 8, True, "cuda")
    )


@needs_gpu
def test_auto_keeps_triton_on_cuda(monkeypatch):
    # auto prefers Triton on CUDA until a GPU run shows the CUDA kernel faster.
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    chosen = backends.resolve(None, "blockwise_embedding_forward", torch.device("cuda"), torch.float32)
    assert chosen == ("triton" if _triton_available() else "cuda" if _cuda_backend_loads() else "torch")
