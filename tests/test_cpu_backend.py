"""The ``cpu`` backend (C++ kernels of csrc/cpu) against the eager reference.

Every test calls the public ops with ``backend="cpu"`` and ``backend="torch"`` on the
same inputs and compares values and all gradients. Tolerances: float64 1e-9
(relative and absolute; the kernels sum in a different order than the reference),
float32 1e-4 relative / 1e-5 absolute, bfloat16 (computed in float32, rounded once)
2e-2. The tests skip when the extension is not built, except the one that checks
what an explicit ``backend="cpu"`` says then.
"""
import importlib
import sys

import pytest
import torch

import cprec_kernels as ck
from cprec_kernels import backends


def _extension_built() -> bool:
    try:
        importlib.import_module("cprec_kernels.cpu")
    except ModuleNotFoundError:
        return False
    return True


needs_ext = pytest.mark.skipif(not _extension_built(), reason="the C++ extension is not built")
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _leaves(tensors):
    # detach(), not clone(): a clone of a strided slice would come out contiguous.
    return [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


def _run(op, backend, tensors, *args, grad_seed=1, **kwargs):
    """-> (outputs, grads of the floating inputs) of op(*tensors, *args, backend=backend)."""
    inputs = _leaves(tensors)
    out = op(*_nest(inputs), *args, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(grad_seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outs if o.is_floating_point())
    loss.backward()
    return outs, [t.grad if t is not None and t.is_floating_point() else None for t in inputs]


_NEST = None  # set by tests whose op takes lists: a function flat list -> op arguments


def _nest(flat):
    return _NEST(flat) if _NEST is not None else flat


def _compare(op, tensors, *args, dtype, nest=None, **kwargs):
    global _NEST
    _NEST = nest
    try:
        got, got_grads = _run(op, "cpu", tensors, *args, **kwargs)
        want, want_grads = _run(op, "torch", tensors, *args, **kwargs)
    finally:
        _NEST = None
    tol = TOL[dtype]
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, **tol)
        else:
            assert torch.equal(g, w)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert (g is None) == (w is None), f"grad {i}: presence differs"
        if g is not None:
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"grad of input {i}: {m}")


# --------------------------------------------------------------------------------------
# availability and dispatch
# --------------------------------------------------------------------------------------
def test_explicit_cpu_backend_says_extension_not_built(monkeypatch):
    # Simulate an unbuilt extension: importing cprec_kernels._C fails.
    monkeypatch.setitem(sys.modules, "cprec_kernels._C", None)
    monkeypatch.delitem(sys.modules, "cprec_kernels.cpu", raising=False)
    monkeypatch.delattr(ck, "_C", raising=False)  # `from . import _C` would find it here
    monkeypatch.delattr(ck, "cpu", raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    x, w = torch.randn(2, 5, 3), torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match="extension is not built"):
        ck.causal_conv1d(x, w, backend="cpu")
    # auto falls back to the reference quietly.
    assert backends.resolve(None, "causal_conv1d_forward", x.device) == "torch"
    torch.testing.assert_close(ck.causal_conv1d(x, w), ck.causal_conv1d(x, w, backend="torch"))


@needs_ext
def test_auto_takes_cpu_and_ops_are_registered(monkeypatch):
    monkeypatch.delenv("CPREC_BACKEND", raising=False)
    for fn in ("causal_conv1d_forward", "blockwise_embedding_backward", "adaptive_topk_forward"):
        assert backends.resolve(None, fn, torch.device("cpu")) == "cpu"
        assert hasattr(torch.ops.cprec_cpu, fn)


# --------------------------------------------------------------------------------------
# block-wise embedding
# --------------------------------------------------------------------------------------
def _embedding_case(dtype, head_proj=True, d=12):
    cutoffs = [5, 12, 30, 41]
    dims = [d if head_proj else d, 6, 3, 1]
    weights = [torch.randn(hi - lo, dj, dtype=dtype) for lo, hi, dj in zip([0] + cutoffs, cutoffs, dims)]
    projs = [torch.randn(d, dj, dtype=dtype) for dj in dims]
    if not head_proj:
        projs[0] = None
    return weights, projs, cutoffs


def _emb_nest(n):
    return lambda flat: (flat[0], flat[1 : 1 + n], flat[1 + n :])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_proj", [True, False])
@pytest.mark.parametrize("padding_idx", [None, 3, 41])
def test_blockwise_embedding(dtype, head_proj, padding_idx):
    weights, projs, cutoffs = _embedding_case(dtype, head_proj)
    # Odd shape, non-contiguous ids, repeated ids, and block [30, 41) left empty.
    ids = torch.randint(0, 30, (3, 14))[:, ::2]
    ids[0, :3] = torch.tensor([3, 3, 29])
    if padding_idx is not None:
        ids[1, 1] = padding_idx
    _compare(ck.blockwise_embedding, [ids, *weights, *projs], cutoffs, padding_idx=padding_idx,
             dtype=dtype, nest=_emb_nest(len(weights)))


@needs_ext
def test_blockwise_embedding_int32_ids_and_bfloat16():
    weights, projs, cutoffs = _embedding_case(torch.bfloat16)
    ids = torch.randint(0, 41, (5, 3), dtype=torch.int32)
    _compare(ck.blockwise_embedding, [ids, *weights, *projs], cutoffs, dtype=torch.bfloat16,
             nest=_emb_nest(len(weights)))


@needs_ext
def test_blockwise_embedding_backward_is_deterministic():
    from cprec_kernels import cpu

    weights, projs, cutoffs = _embedding_case(torch.float32)
    ids = torch.randint(0, 41, (4000,))
    grad = torch.randn(4000, 12)
    threads = torch.get_num_threads()
    runs = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        runs.append(cpu.blockwise_embedding_backward(grad, ids, weights, projs, cutoffs, None))
    torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], run[0] + run[1]):
            assert torch.equal(a, b)


@needs_ext
def test_blockwise_embedding_rejects_out_of_range_ids():
    weights, projs, cutoffs = _embedding_case(torch.float32)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.cprec_cpu.blockwise_embedding_forward(
            torch.tensor([41]), weights, [p if p is not None else torch.empty(0) for p in projs], cutoffs, None
        )


# --------------------------------------------------------------------------------------
# adaptive softmax
# --------------------------------------------------------------------------------------
def _adaptive_case(dtype, bias=True, n=37, d=16, cutoffs=(7, 20, 45, 60)):
    cutoffs = list(cutoffs)
    n_tails = len(cutoffs) - 1
    dims = [max(1, d // 4 ** (i + 1)) for i in range(n_tails)]
    head_w = torch.randn(cutoffs[0] + n_tails, d, dtype=dtype) / d**0.5
    head_b = torch.randn(cutoffs[0] + n_tails, dtype=dtype) if bias else None
    projs = [torch.randn(di, d, dtype=dtype) / d**0.5 for di in dims]
    tails = [torch.randn(hi - lo, di, dtype=dtype) for lo, hi, di in zip(cutoffs, cutoffs[1:], dims)]
    # Non-contiguous hidden: the transpose of a [d, N] tensor.
    hidden = torch.randn(d, n, dtype=dtype).t()
    return hidden, head_w, head_b, projs, tails, cutoffs


def _as_nest(n_tails, extra=0):
    # flat = [hidden, (target), head_w, head_b, *projs, *tails]
    def nest(flat):
        head = flat[: 3 + extra]
        rest = flat[3 + extra :]
        return (*head, rest[:n_tails], rest[n_tails:])

    return nest


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_adaptive_softmax_loss(dtype, reduction, bias):
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(dtype, bias)
    target = torch.randint(0, 45, (hidden.shape[0],))  # tail [45, 60) stays empty
    target[:3] = torch.tensor([-100, 0, 44])  # an ignored row, the first and last items used
    target[5] = -100
    _compare(ck.adaptive_softmax_loss, [hidden, target, head_w, head_b, *projs, *tails], cutoffs,
             reduction=reduction, dtype=dtype, nest=_as_nest(len(projs), extra=1))


@needs_ext
def test_adaptive_softmax_loss_all_ignored_and_matches_torch_module():
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(torch.float64)
    target = torch.full((hidden.shape[0],), -100)
    loss = ck.adaptive_softmax_loss(hidden, target, head_w, head_b, projs, tails, cutoffs, backend="cpu")
    assert loss.item() == 0.0
    # nn.AdaptiveLogSoftmaxWithLoss is the layout oracle: tail i = Linear(d, d_i), Linear(d_i, V_i).
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 45, [7, 20], div_value=4.0, head_bias=True).double()
    target = torch.randint(0, 45, (hidden.shape[0],))
    projs = [t[0].weight for t in module.tail]
    tails = [t[1].weight for t in module.tail]
    with torch.no_grad():
        got = ck.adaptive_softmax_loss(hidden, target, module.head.weight, module.head.bias, projs, tails,
                                       [7, 20, 45], backend="cpu")
        torch.testing.assert_close(got, module(hidden, target).loss, rtol=1e-9, atol=1e-9)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_log_prob(dtype):
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(dtype)
    _compare(ck.adaptive_log_prob, [hidden, head_w, head_b, *projs, *tails], cutoffs, dtype=dtype,
             nest=_as_nest(len(projs)))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 10, 60])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_adaptive_topk(dtype, k, with_exclude):
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(dtype)
    exclude = None
    if with_exclude and k < 60:
        exclude = torch.randint(-1, 60, (hidden.shape[0], 5))
    _compare(ck.adaptive_topk, [hidden, head_w, head_b, *projs, *tails], cutoffs, k, exclude=exclude,
             dtype=dtype, nest=_as_nest(len(projs)))


@needs_ext
def test_adaptive_topk_streams_large_vocab():
    # V = 200k items in tiles; one row, the inference case. A wrong tile offset or an
    # unmerged tail shows up as a different id.
    torch.manual_seed(3)
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(
        torch.float32, n=2, d=32, cutoffs=(2000, 10000, 50000, 200000))
    got = ck.adaptive_topk(hidden, head_w, head_b, projs, tails, cutoffs, 10, backend="cpu")
    want = ck.adaptive_topk(hidden, head_w, head_b, projs, tails, cutoffs, 10, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------
# causal convolution (+ LayerNorm + ReLU + residual)
# --------------------------------------------------------------------------------------
# (B, T, C_in, C_out, K, dilation): odd sizes, T = 1, shifts past T, K = 1.
CONV_CASES = [(3, 7, 5, 6, 3, 2), (1, 1, 4, 4, 3, 1), (2, 5, 3, 7, 1, 1), (4, 9, 6, 5, 4, 3), (2, 3, 4, 4, 3, 4)]


def _wide_slice(shape, dtype):
    """A non-contiguous tensor of ``shape``: the front of a wider one."""
    *lead, last = shape
    return torch.randn(*lead, last + 3, dtype=dtype)[..., :last]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d(dtype, case, bias):
    B, T, ci, co, K, dil = case
    x = _wide_slice((B, T, ci), dtype)
    w = torch.randn(co, ci, K, dtype=dtype)
    b = torch.randn(co, dtype=dtype) if bias else None
    _compare(ck.causal_conv1d, [x, w, b], dil, dtype=dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("affine,residual", [(True, True), (False, False), (True, False)])
def test_causal_conv1d_ln_relu(dtype, case, affine, residual):
    B, T, ci, co, K, dil = case
    x = _wide_slice((B, T, ci), dtype)
    w = torch.randn(co, ci, K, dtype=dtype)
    b = torch.randn(co, dtype=dtype)
    lw = torch.randn(co, dtype=dtype) if affine else None
    lb = torch.randn(co, dtype=dtype) if affine else None
    res = torch.randn(B, T, co, dtype=dtype) if residual else None

    def op(x, w, b, lw, lb, res, dilation, backend):
        return ck.causal_conv1d_ln_relu(x, w, b, lw, lb, dilation, 1e-5, residual=res, backend=backend)

    _compare(op, [x, w, b, lw, lb, res], dil, dtype=dtype)


# The fused forward has three paths: Winograd F(4,3) (K = 3, C_in and C_out >= 32, B*T >= 64,
# 2*dilation < T, tiles of 4 overshooting T by at most a third), one GEMM + shifted-row
# epilogue, or, when B*T < C_out, an im2col GEMM against the weight's own layout (the
# last three cases). These cases are wide enough to take them: sequence starts in
# every tile phase and partial last tiles (T = 37, 45, 31 with dilations 1, 5, 3, 2), odd
# widths (row tails past the 8-lane loops), dilation not dividing T, 2*dilation >= T,
# dilation >= T, K = 4.
FUSED_CASES = [(3, 37, 48, 40, 3, 1), (3, 37, 48, 40, 3, 5), (2, 45, 40, 36, 3, 3), (3, 31, 33, 40, 3, 2),
               (2, 64, 33, 35, 3, 7), (4, 33, 32, 32, 3, 2), (2, 20, 40, 40, 3, 10), (2, 5, 40, 40, 3, 9),
               (3, 37, 48, 40, 4, 3), (2, 40, 36, 44, 2, 50), (1, 13, 33, 40, 3, 2), (1, 7, 36, 64, 4, 1),
               (3, 9, 40, 41, 3, 4), (3, 37, 48, 40, 3, 8)]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("bias,affine,residual", [(True, True, True), (False, False, False)])
def test_causal_conv1d_ln_relu_fused_forward_paths(dtype, case, bias, affine, residual):
    torch.manual_seed(sum(case))
    B, T, ci, co, K, dil = case
    x = _wide_slice((B, T, ci), dtype)
    w = torch.randn(co, ci, K, dtype=dtype) / (ci * K) ** 0.5
    b = torch.randn(co, dtype=dtype) if bias else None
    lw = torch.randn(co, dtype=dtype) if affine else None
    lb = torch.randn(co, dtype=dtype) if affine else None
    res = _wide_slice((B, T, co), dtype) if residual else None

    def op(x, w, b, lw, lb, res, dilation, backend):
        return ck.causal_conv1d_ln_relu(x, w, b, lw, lb, dilation, 1e-5, residual=res, backend=backend)

    _compare(op, [x, w, b, lw, lb, res], dil, dtype=dtype)


@needs_ext
def test_causal_conv1d_ln_relu_fused_forward_thread_count_invariant():
    # dilation 3 at T = 41: the Winograd path (17% tile padding), whose transformed weights
    # once came from an MKL GEMM with an inner size of 3 that rounded differently on 2 threads.
    from cprec_kernels import cpu

    torch.manual_seed(0)
    x, w, b = torch.randn(5, 41, 64), torch.randn(64, 64, 3) / 14, torch.randn(64)
    threads = torch.get_num_threads()
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        runs.append(cpu.causal_conv1d_ln_relu_forward(x, w, b, None, None, x, 3, 1e-5))
    torch.set_num_threads(threads)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------------------
# gradcheck and opcheck through the cpu backend
# --------------------------------------------------------------------------------------
@needs_ext
def test_gradcheck_float64():
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(2, 4, 3, dtype=dt, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=dt, requires_grad=True)
    b = torch.randn(3, dtype=dt, requires_grad=True)
    lw = torch.randn(3, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ck.causal_conv1d(*a, dilation=2, backend="cpu"), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b, lw: ck.causal_conv1d_ln_relu(x, w, b, lw, None, 1, 1e-5, backend="cpu"), (x, w, b, lw))
    hidden, head_w, head_b, projs, tails, cutoffs = _adaptive_case(dt, n=5, d=8, cutoffs=(3, 6, 9))
    params = [t.requires_grad_() for t in [hidden.contiguous(), head_w, head_b, *projs, *tails]]
    target = torch.tensor([0, 4, 8, -100, 2])

    def loss(h, hw, hb, p0, p1, t0, t1):
        return ck.adaptive_softmax_loss(h, target, hw, hb, [p0, p1], [t0, t1], cutoffs, backend="cpu")

    assert torch.autograd.gradcheck(loss, params)
    weights = [torch.randn(2, 4, dtype=dt, requires_grad=True), torch.randn(3, 2, dtype=dt, requires_grad=True)]
    proj = torch.randn(4, 2, dtype=dt, requires_grad=True)
    ids = torch.tensor([[0, 4, 4], [1, 2, 0]])
    assert torch.autograd.gradcheck(
        lambda w0, w1, p: ck.blockwise_embedding(ids, [w0, w1], [None, p], [2, 5], backend="cpu"),
        (*weights, proj))


@needs_ext
def test_opcheck_cpu_backend():
    from cprec_kernels import adaptive_softmax, conv, embedding

    x, w, b = torch.randn(2, 5, 3), torch.randn(4, 3, 2), torch.randn(4)
    torch.library.opcheck(conv._causal_conv1d_op, (x, w, b, 1, "cpu"))
    torch.library.opcheck(conv._conv_ln_relu_op, (x, w, b, torch.randn(4), None, None, 2, 1e-5, "cpu"))
    weights, projs, cutoffs = _embedding_case(torch.float32)
    projs = [p if p is not None else torch.empty(0) for p in projs]
    ids = torch.randint(0, 41, (3, 4))
    torch.library.opcheck(embedding._embedding_op, (ids, weights, projs, cutoffs, None, True, "cpu"))
    hidden, head_w, head_b, tp, tw, cut = _adaptive_case(torch.float32)
    target = torch.randint(0, 60, (hidden.shape[0],))
    torch.library.opcheck(adaptive_softmax._loss_op,
                          (hidden.contiguous(), target, head_w, head_b, tp, tw, cut, -100, "mean", "cpu"))
    torch.library.opcheck(adaptive_softmax._topk_op, (hidden.contiguous(), head_w, head_b, tp, tw, cut, 5, None, "cpu"))
