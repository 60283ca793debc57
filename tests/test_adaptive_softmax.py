"""The tail-cluster adaptive softmax (loss, full log-probs, top-k) on every backend that
runs here (torch, cpu, triton under the interpreter), on the shared harness: values and
every gradient against the reference and against ``nn.AdaptiveLogSoftmaxWithLoss``
holding the same tensors, in float64.

Layouts: "wide" (d = 32, cutoffs [70, 90, 130, 160], tails of widths 16, 8, 4: under
the interpreter the Triton tiles drop to 16 rows x 32 items, so 37 rows span several
row blocks, head tiles and tail tiles, and widths below tl.dot's 16 are padded) and
"narrow" (d = 16, cutoffs [7, 20, 45, 60], tail widths 6, 2, 1). Hidden states are
strided views, scaled up so the softmaxes are peaked and a wrong logit shows.
"""
import pytest
import torch

import cprec_kernels as ck
from cprec_kernels.adaptive_softmax import ADAPTIVE_LOG_PROB, ADAPTIVE_SOFTMAX_LOSS, ADAPTIVE_TOPK
from cprec_kernels.nn import AdaptiveSoftmax
from cprec_kernels.testing import adaptive_module, adaptive_nll_by_module, adaptive_params
from harness import (
    DEVICE,
    as_leaves,
    assert_all_close,
    backend_dtype_params,
    backend_params,
    check,
    noncontiguous,
    value_and_grads,
)

N = 37
LAYOUTS = {"wide": (32, [70, 90, 130, 160], 2.0), "narrow": (16, [7, 20, 45, 60], 2.5)}


def make_params(layout, dtype, head_bias=True):
    """(head_weight, head_bias, tail_projections, tail_weights, cutoffs) of an
    nn.AdaptiveLogSoftmaxWithLoss's initialisation."""
    d, cutoffs, div = LAYOUTS[layout]
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(d, cutoffs[-1], cutoffs[:-1], div_value=div, head_bias=head_bias)
    hw, hb, tp, tw = adaptive_params(module.to(DEVICE, dtype))
    return hw.detach(), None if hb is None else hb.detach(), [p.detach() for p in tp], [w.detach() for w in tw], cutoffs


def make_hidden(n, d, dtype):
    return noncontiguous((3 * torch.randn(n, d, device=DEVICE)).to(dtype))


def boundary_targets(cutoffs, n=N, ignore=(2, 11)):
    """Targets on both sides of every cluster edge, then random; rows ``ignore`` are -100."""
    edges = sorted({0, cutoffs[-1] - 1} | {c + o for c in cutoffs[:-1] for o in (-1, 0)})
    target = torch.cat([torch.tensor(edges), torch.randint(0, cutoffs[-1], (n,))])[:n]
    target[list(ignore)] = -100
    return target.to(DEVICE)


def inputs_of(hidden, params):
    hw, hb, tp, tw, cutoffs = params
    return dict(hidden=hidden, head_weight=hw, head_bias=hb, tail_projections=tp, tail_weights=tw, cutoffs=cutoffs)


def loss_op(hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs, ignore_index=-100,
            reduction="mean", backend="torch"):
    return ck.adaptive_softmax_loss(hidden, target, head_weight, head_bias, tail_projections, tail_weights, cutoffs,
                                    ignore_index, reduction, backend=backend)


def log_prob_op(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, backend="torch"):
    return ck.adaptive_log_prob(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs,
                                backend=backend)


def log_prob_oracle(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs):
    return adaptive_module(head_weight, head_bias, tail_projections, tail_weights, cutoffs).log_prob(hidden)


def topk_values_op(k, exclude=None):
    def op(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, backend="torch"):
        return ck.adaptive_topk(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs, k, exclude,
                                backend=backend)[0]

    return op


def topk_oracle(k, exclude=None):
    def oracle(**inputs):
        log_probs = log_prob_oracle(**inputs)
        if exclude is not None:
            log_probs = ck.mask_excluded(log_probs, exclude)
        return torch.topk(log_probs, k, dim=1).values

    return oracle


def check_topk(values, ids, log_probs, k, exclude=None, tol=(1e-4, 1e-5)):
    """Best first, k distinct ids whose log-probs are the given values and equal the
    k best of ``log_probs`` (ties aside), none of them excluded."""
    want = ck.mask_excluded(log_probs, exclude) if exclude is not None else log_probs
    rtol, atol = tol
    assert ids.dtype == torch.int64 and ids.shape == (log_probs.shape[0], k)
    torch.testing.assert_close(values, torch.topk(want, k, dim=1).values, rtol=rtol, atol=atol)
    torch.testing.assert_close(log_probs.gather(1, ids), values, rtol=rtol, atol=atol)
    assert (values.diff(dim=1) <= 0).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    if exclude is not None:
        assert not (ids.unsqueeze(2) == exclude.unsqueeze(1)).any()


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_SOFTMAX_LOSS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head_bias", [True, False], ids=["bias", "no-bias"])
def test_loss(backend, dtype, layout, reduction, head_bias):
    params = make_params(layout, dtype, head_bias)
    inputs = inputs_of(make_hidden(N, LAYOUTS[layout][0], dtype), params)
    inputs.update(target=boundary_targets(params[-1]), reduction=reduction)
    got = check(loss_op, inputs, backend, dtype, adaptive_nll_by_module)
    if reduction == "none":
        assert (got[0][inputs["target"] == -100] == 0).all()


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS))
def test_loss_int32_targets_and_an_empty_tail(backend):
    # Tail 1 ([90, 130)) has no row; every other cluster edge is hit from both sides.
    params = make_params("wide", torch.float32, head_bias=False)
    target = torch.tensor([0, 1, 69, 70, 71, 89, 130, 131, 158, 159] * 4, dtype=torch.int32, device=DEVICE)[:N]
    inputs = inputs_of(make_hidden(N, 32, torch.float32), params)
    inputs.update(target=target, reduction="none")
    got = check(loss_op, inputs, backend, torch.float32, adaptive_nll_by_module)
    assert (got[-2] == 0).all() and (got[-5] == 0).all()  # tail 1's weight and projection
    assert (got[-1] != 0).any() and (got[-4] != 0).any()


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS))
def test_loss_all_rows_ignored_is_zero_with_zero_grads(backend):
    params = make_params("narrow", torch.float32)
    for reduction in ("mean", "sum", "none"):
        inputs = inputs_of(make_hidden(N, 16, torch.float32), params)
        inputs.update(target=torch.full((N,), 7, device=DEVICE), ignore_index=7, reduction=reduction)
        got = check(loss_op, inputs, backend, torch.float32, adaptive_nll_by_module)
        assert all((g == 0).all() for g in got if g is not None)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu", "triton", "cuda"]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_loss_half_precision_is_near_reference(backend, dtype):
    params = make_params("wide", dtype)
    inputs = inputs_of(make_hidden(N, 32, dtype), params)
    inputs.update(target=boundary_targets(params[-1]), reduction="sum")
    got = value_and_grads(lambda **t: loss_op(**t, backend=backend), as_leaves(inputs))
    want = value_and_grads(lambda **t: loss_op(**t, backend="torch"), as_leaves(inputs))
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1:] if g is not None)
    # Dot operands are rounded to the half dtype (as a half nn.Linear does); the reference is fp32.
    assert_all_close(got[:1], want[:1], dtype, "loss", tol=(2e-2, 0.5))
    assert_all_close(got[1:], want[1:], dtype, "grads", tol=(0.0, 5e-2), scaled=True)


def test_triton_refuses_float64_by_name():
    if ADAPTIVE_SOFTMAX_LOSS.unavailable("triton", DEVICE) is not None:
        pytest.skip(ADAPTIVE_SOFTMAX_LOSS.unavailable("triton", DEVICE))
    hw, hb, tp, tw, cutoffs = make_params("wide", torch.float64)
    hidden = make_hidden(N, 32, torch.float64)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*not torch.float64"):
        ck.adaptive_softmax_loss(hidden, boundary_targets(cutoffs), hw, hb, tp, tw, cutoffs, backend="triton")
    with pytest.raises(RuntimeError, match="not torch.float64"):
        ck.adaptive_topk(hidden, hw, hb, tp, tw, cutoffs, 3, backend="triton")
    # auto leaves float64 to a backend that runs it
    ck.adaptive_softmax_loss(hidden, boundary_targets(cutoffs), hw, hb, tp, tw, cutoffs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist on CUDA")
def test_triton_loss_never_syncs_with_the_host():
    kernels = ADAPTIVE_SOFTMAX_LOSS.kernels("triton")
    hw, hb, tp, tw, cutoffs = make_params("wide", torch.float32)
    args = (make_hidden(N, 32, torch.float32).detach().contiguous(), boundary_targets(cutoffs), hw, hb, tp, tw,
            cutoffs, -100)
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.forward(*args, "mean")
        kernels.backward(torch.ones((), device=DEVICE), *args, "mean")
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------------------
# log-probs and top-k
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_LOG_PROB))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_log_prob(backend, dtype, layout):
    params = make_params(layout, dtype)
    got = check(log_prob_op, inputs_of(make_hidden(N, LAYOUTS[layout][0], dtype), params), backend, dtype,
                log_prob_oracle)
    torch.testing.assert_close(got[0].exp().sum(dim=1), torch.ones(N, dtype=got[0].dtype, device=DEVICE))


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_TOPK))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k", [1, 10, 60])
@pytest.mark.parametrize("with_exclude", [False, True], ids=["all", "exclude"])
def test_topk(backend, dtype, layout, k, with_exclude):
    if backend == "triton" and k == 60:
        k = 20  # the interpreter's cost grows with next_pow2(k); k = V runs on the other backends
    params = make_params(layout, dtype, head_bias=k == 1)
    hidden = make_hidden(N, LAYOUTS[layout][0], dtype)
    exclude = None
    if with_exclude and k > params[-1][-1] - 7:
        pytest.skip("excluding 7 ids leaves fewer than k")
    if with_exclude:
        # Each row's best items, random ids (repeats allowed) and -1 padding.
        best = ck.adaptive_log_prob(hidden, *params, backend="torch").topk(4, dim=1).indices
        exclude = torch.cat([best, torch.randint(-1, params[-1][-1], (N, 3), device=DEVICE)], dim=1)
        exclude[::3, 2:4] = -1
    inputs = inputs_of(hidden, params)
    check(topk_values_op(k, exclude), inputs, backend, dtype, topk_oracle(k, exclude))
    values, ids = ck.adaptive_topk(hidden, *params, k, exclude, backend=backend)
    log_probs = ck.adaptive_log_prob(hidden, *params, backend="torch")
    check_topk(values, ids, log_probs.to(values.dtype), k, exclude)
    if backend == "cpu":  # the same order of summation as the reference: the same ids
        assert torch.equal(ids, ck.adaptive_topk(hidden, *params, k, exclude, backend="torch")[1])


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_TOPK))
def test_topk_past_the_items_left(backend, dtype):
    """k above what ``exclude`` leaves: the missing slots are id -1 and -inf on every
    backend, never an excluded id; the padding id V (and repeats, and -1) are padding."""
    params = make_params("narrow", dtype)
    V = params[-1][-1]
    hidden = make_hidden(4, LAYOUTS["narrow"][0], dtype)
    keep = [[3, 8], [0, 1, 2, 30, 59], [], list(range(V))]  # the items each row may return
    exclude = torch.full((4, V + 4), V, dtype=torch.int64)  # V: padding
    for row, kept in enumerate(keep):
        dropped = [i for i in range(V) if i not in kept]
        exclude[row, : len(dropped)] = torch.tensor(dropped, dtype=torch.int64)
    exclude[:, -4:] = torch.tensor([-1, V, 5, 5])  # a repeat of 5 (excluded in rows 0-2 already)
    exclude[3, -2:] = V  # row 3 keeps every item
    exclude = exclude.to(DEVICE)
    k = 6
    leaves_ = as_leaves(inputs_of(hidden, params))
    values, ids = ck.adaptive_topk(**leaves_, k=k, exclude=exclude, backend=backend)
    log_probs = ck.adaptive_log_prob(hidden, *params, backend="torch").to(values.dtype)
    for row, kept in enumerate(keep):
        n = min(len(kept), k)
        want = log_probs[row, kept].sort(descending=True) if kept else None
        assert ids[row, n:].tolist() == [-1] * (k - n), f"row {row}: {ids[row].tolist()}"
        assert torch.isneginf(values[row, n:]).all()
        if n:
            assert sorted(ids[row, :n].tolist()) == sorted(torch.tensor(kept)[want.indices[:n].cpu()].tolist())
            torch.testing.assert_close(values[row, :n], want.values[:n], rtol=1e-4, atol=1e-5)
    # The -inf slots take no gradient; the real ones take theirs.
    torch.where(ids >= 0, values, 0).sum().backward()
    grad_lp = torch.zeros(4, V, dtype=torch.float64, device=DEVICE)
    for row in range(4):
        for slot in range(k):
            if ids[row, slot] >= 0:
                grad_lp[row, ids[row, slot]] += 1
    ref = as_leaves(inputs_of(hidden, params), torch.float64)
    (ck.adaptive_log_prob(**ref, backend="torch") * grad_lp).sum().backward()
    assert_all_close([leaves_["hidden"].grad], [ref["hidden"].grad], dtype, "hidden grad")


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_TOPK))
def test_topk_refuses_ids_past_the_padding_id(backend):
    params = make_params("narrow", torch.float32)
    hidden = make_hidden(2, LAYOUTS["narrow"][0], torch.float32)
    with pytest.raises(ValueError, match="exclude holds 1 id"):
        ck.adaptive_topk(hidden, *params, k=2, exclude=torch.tensor([[0, 61], [1, 60]], device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_TOPK))
def test_head_only_layout(backend):
    # cutoffs = [V]: no tails (nn.AdaptiveLogSoftmaxWithLoss cannot express it).
    layer = AdaptiveSoftmax(32, [160], head_bias=True).to(DEVICE)
    params = (layer.head_weight.detach(), layer.head_bias.detach(), [], [], [160])
    inputs = inputs_of(make_hidden(N, 32, torch.float32), params)
    loss_inputs = dict(inputs, target=boundary_targets([160]), reduction="mean")
    check(loss_op, loss_inputs, backend, torch.float32)
    log_probs = check(log_prob_op, inputs, backend, torch.float32)[0]
    want = torch.log_softmax(inputs["hidden"] @ params[0].t() + params[1], dim=1)
    torch.testing.assert_close(log_probs, want, rtol=1e-4, atol=1e-5)
    values, ids = ck.adaptive_topk(inputs["hidden"], *params, k=3, backend=backend)
    check_topk(values, ids, want, 3)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_TOPK, ["torch", "cpu"]))
def test_topk_streams_a_large_vocabulary(backend):
    # V = 200k items in tiles; two rows, the inference case. A wrong tile offset or an
    # unmerged tail shows up as a different id.
    torch.manual_seed(3)
    d, cutoffs = 32, [2000, 10000, 50000, 200000]
    dims = [d // 4 ** (i + 1) or 1 for i in range(3)]
    hw = torch.randn(cutoffs[0] + 3, d) / d**0.5
    tp = [torch.randn(di, d) / d**0.5 for di in dims]
    tw = [torch.randn(hi - lo, di) for lo, hi, di in zip(cutoffs, cutoffs[1:], dims)]
    hidden = torch.randn(d, 2).t()
    got = ck.adaptive_topk(hidden, hw, None, tp, tw, cutoffs, 10, backend=backend)
    want = torch.topk(log_prob_oracle(hidden.double(), hw.double(), None, [p.double() for p in tp],
                                      [w.double() for w in tw], cutoffs), 10, dim=1)
    torch.testing.assert_close(got[0].double(), want.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want.indices)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_SOFTMAX_LOSS, ["torch", "cpu"]))
def test_gradcheck(backend, dtype):
    if dtype != torch.float64:
        pytest.skip("gradcheck runs in float64")
    hw, hb, tp, tw, cutoffs = make_params("narrow", dtype)
    hidden = torch.randn(5, 16, dtype=dtype, device=DEVICE)
    target = torch.tensor([0, 19, 44, -100, 2], device=DEVICE)
    params = tuple(t.requires_grad_() for t in (hidden, hw, hb, *tp, *tw))

    def unpack(h, hw, hb, *rest):
        return h, hw, hb, list(rest[:3]), list(rest[3:])

    def loss(*a):
        h, hw, hb, tp, tw = unpack(*a)
        return ck.adaptive_softmax_loss(h, target, hw, hb, tp, tw, cutoffs, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, params)
    assert torch.autograd.gradcheck(lambda *a: ck.adaptive_log_prob(*unpack(*a), cutoffs, backend=backend), params)
    assert torch.autograd.gradcheck(lambda *a: ck.adaptive_topk(*unpack(*a), cutoffs, 3, backend=backend)[0], params)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS))
def test_opcheck(backend):
    hw, hb, tp, tw, cutoffs = make_params("narrow", torch.float32)
    for p in (hw, hb, *tp, *tw):
        p.requires_grad_()
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 19, 44, 59, 2, -100], device=DEVICE)
    ops = torch.ops.cprec
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(ops.adaptive_softmax_loss.default, (h, t, hw, hb, tp, tw, cutoffs, -100, reduction,
                                                                  backend))
        _, head_lse, tail_lse = ops.adaptive_softmax_loss(h, t, hw, hb, tp, tw, cutoffs, -100, reduction, backend)
        assert not head_lse.requires_grad and not tail_lse.requires_grad
        grad = torch.randn(6 if reduction == "none" else (), device=DEVICE)
        # The backward op has no double backward: check it on detached inputs.
        args = (grad, h, t, hw, hb, tp, tw, cutoffs, -100, reduction, head_lse, tail_lse, backend)
        torch.library.opcheck(ops.adaptive_softmax_loss_backward.default, torch.utils._pytree.tree_map_only(
            torch.Tensor, torch.Tensor.detach, args))
    torch.library.opcheck(ops.adaptive_log_prob.default, (h, hw, None, tp, tw, cutoffs, backend))
    ex = torch.tensor([[0, -1]] * 6, device=DEVICE)
    # top-k's ids are not differentiable: leave out the tests that differentiate every output.
    torch.library.opcheck(ops.adaptive_topk.default, (h, hw, hb, tp, tw, cutoffs, 3, ex, backend),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(ops.adaptive_topk.default, (h.detach(), hw.detach(), None, [p.detach() for p in tp],
                                                      [w.detach() for w in tw], cutoffs, 5, None, backend))


# --------------------------------------------------------------------------------------
# the loss that saves its softmax statistics
# --------------------------------------------------------------------------------------
# forward -> (loss, head_lse [N], tail_lse [N]): head_lse is the log-sum-exp of each
# row's head logits, tail_lse that of its target tail cluster's logits (0 for head
# targets and ignored rows). The backward takes both instead of recomputing them.
STATS_CUTOFFS = [7, 20, 45, 61]


def stats_case(dtype, bias, empty_cluster, seed, n=41, d=24):
    """(hidden, target, head_weight, head_bias, projs, tails, cutoffs): a non-contiguous
    hidden [n, d], targets with 5 ignored rows; with ``empty_cluster`` no target falls in
    the second tail [20, 45)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    cutoffs = STATS_CUTOFFS
    dims = [max(1, d // 2 ** (i + 1)) for i in range(len(cutoffs) - 1)]
    head_w = rand(cutoffs[0] + len(dims), d, scale=d**-0.5)
    head_b = rand(cutoffs[0] + len(dims)) if bias else None
    projs = [rand(di, d, scale=d**-0.5) for di in dims]
    tails = [rand(hi - lo, di) for lo, hi, di in zip(cutoffs, cutoffs[1:], dims)]
    hidden = rand(d, n).t()
    target = torch.randint(0, cutoffs[-1], (n,), generator=g)
    if empty_cluster:
        target = torch.where((target >= 20) & (target < 45), target % 7, target)
    target[torch.randperm(n, generator=g)[:5]] = -100
    return hidden, target, head_w, head_b, projs, tails, cutoffs


def expected_stats(hidden, target, head_w, head_b, projs, tails, cutoffs):
    """float64 log-sum-exps of the head logits and of each row's target cluster (0 elsewhere)."""
    h = hidden.double()
    head = torch.logsumexp(torch.nn.functional.linear(h, head_w.double(), None if head_b is None else head_b.double()),
                           dim=1)
    tail = torch.zeros_like(head)
    for lo, hi, proj, weight in zip(cutoffs, cutoffs[1:], projs, tails):
        rows = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
        tail[rows] = torch.logsumexp(h[rows] @ proj.double().t() @ weight.double().t(), dim=1)
    return head, tail


def _flat_grads(grads, bias):
    gh, ghw, ghb, gtp, gtw = grads
    return [gh, ghw, ghb if bias else None, *gtp, *gtw]


def stats_case_for(backend, *args, **kwargs):
    """stats_case on DEVICE. The custom op takes contiguous inputs (the public function
    makes them so); the C++ kernels also read strided ones, so cpu keeps the strided hidden."""
    hidden, target, head_w, head_b, projs, tails, cutoffs = stats_case(*args, **kwargs)
    hidden = hidden.to(DEVICE) if backend == "cpu" else hidden.contiguous().to(DEVICE)
    return (hidden, target.to(DEVICE), head_w.to(DEVICE), None if head_b is None else head_b.to(DEVICE),
            [p.to(DEVICE) for p in projs], [w.to(DEVICE) for w in tails], cutoffs)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_SOFTMAX_LOSS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,empty_cluster", [(True, False), (False, True)], ids=["bias", "empty-tail"])
def test_loss_statistics_forward_and_backward(backend, dtype, reduction, bias, empty_cluster):
    """cprec::adaptive_softmax_loss -> (loss, head_lse, tail_lse) against the float64
    reference and log-sum-exps computed here; its backward op, given them, against the
    reference backward."""
    from cprec_kernels.adaptive_softmax import reference

    case = stats_case_for(backend, dtype, bias, empty_cluster, seed=len(reduction) + 2 * bias + (dtype == torch.float32))
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    up = [hidden.double(), target, head_w.double(), None if head_b is None else head_b.double(),
          [p.double() for p in projs], [t.double() for t in tails], cutoffs]
    ops = torch.ops.cprec

    loss, head_lse, tail_lse = ops.adaptive_softmax_loss(*case, -100, reduction, backend)
    a = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == head_lse.dtype == tail_lse.dtype == a
    assert head_lse.shape == tail_lse.shape == (hidden.shape[0],)
    want_loss, *_ = reference.adaptive_softmax_loss_forward(*up, -100, reduction)
    assert_all_close([loss, head_lse, tail_lse], [want_loss, *expected_stats(*case)], dtype, "stats forward")

    grad_loss = (torch.randn(hidden.shape[0], dtype=a) if reduction == "none" else torch.tensor(1.7, dtype=a))
    grad_loss = grad_loss.to(DEVICE)
    got = ops.adaptive_softmax_loss_backward(grad_loss, *case, -100, reduction, head_lse, tail_lse, backend)
    want = reference.adaptive_softmax_loss_backward(grad_loss.double(), *up, -100, reduction,
                                                    *expected_stats(*case))
    assert_all_close(_flat_grads(got, bias), _flat_grads(want, bias), dtype, "stats backward")
    if empty_cluster:
        assert torch.count_nonzero(got[3][1]) == 0 and torch.count_nonzero(got[4][1]) == 0


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_SOFTMAX_LOSS))
def test_loss_backward_uses_the_given_statistics(backend, dtype):
    """Shifted statistics rescale the softmax terms: the gradients must move, so the
    backward reads them rather than recomputing them."""
    case = stats_case_for(backend, dtype, True, False, seed=3)
    ops = torch.ops.cprec
    _, head_lse, tail_lse = ops.adaptive_softmax_loss(*case, -100, "sum", backend)
    grad_loss = torch.tensor(1.0, dtype=head_lse.dtype, device=DEVICE)

    def backward(hl, tl):
        return ops.adaptive_softmax_loss_backward(grad_loss, *case, -100, "sum", hl, tl, backend)

    base, head_shift, tail_shift = backward(head_lse, tail_lse), backward(head_lse + 1, tail_lse), backward(
        head_lse, tail_lse + 1)
    assert not torch.allclose(base[1], head_shift[1])  # head weight gradient
    assert torch.equal(base[4][0], head_shift[4][0])  # tails do not read head_lse
    assert not torch.allclose(base[4][0], tail_shift[4][0])  # first tail's weight gradient
    assert torch.equal(base[1], tail_shift[1])


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
@pytest.mark.parametrize("bad,exc", [("dtype", TypeError), ("shape", ValueError)])
def test_cpu_stats_backward_rejects_bad_statistics(backend, bad, exc):
    from cprec_kernels._core.cpu_extension import ops

    case = stats_case(torch.float32, True, False, seed=5)
    _, head_lse, tail_lse = ops.adaptive_softmax_loss_stats_forward(*case, -100, "mean")
    wrong = head_lse.double() if bad == "dtype" else head_lse[:-1]
    with pytest.raises(exc, match="head_lse"):
        ops.adaptive_softmax_loss_stats_backward(torch.tensor(1.0), *case, -100, "mean", wrong, tail_lse)


# --------------------------------------------------------------------------------------
# the scalar loss with its gradients formed in the forward (cpu)
# --------------------------------------------------------------------------------------
def _grad_fn_name(loss):
    return type(loss.grad_fn).__name__ if loss.grad_fn is not None else None


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias,empty_cluster", [(True, False), (False, True)], ids=["bias", "empty-tail"])
def test_loss_with_grads_in_the_forward(backend, dtype, reduction, bias, empty_cluster):
    """A mean/sum loss that needs gradients runs cprec::adaptive_softmax_loss_with_grads:
    its value and its gradients, scaled by the incoming gradient, against the float64
    reference forward and backward (strided hidden, ignored rows, an empty tail)."""
    from cprec_kernels.adaptive_softmax import reference

    case = stats_case_for(backend, dtype, bias, empty_cluster, seed=11 + 2 * bias + len(reduction))
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    leaves = [t.detach().requires_grad_() for t in (hidden, head_w) + ((head_b,) if bias else ())]
    tp = [p.detach().requires_grad_() for p in projs]
    tw = [w.detach().requires_grad_() for w in tails]
    hidden_l, head_w_l = leaves[:2]
    head_b_l = leaves[2] if bias else None
    loss = ck.adaptive_softmax_loss(hidden_l, target, head_w_l, head_b_l, tp, tw, cutoffs, reduction=reduction,
                                    backend=backend)
    assert "adaptive_softmax_loss_with_grads" in _grad_fn_name(loss)
    (loss * 1.7).backward()

    up = [hidden.double(), target, head_w.double(), None if head_b is None else head_b.double(),
          [p.double() for p in projs], [t.double() for t in tails], cutoffs]
    want_loss, head_lse, tail_lse = reference.adaptive_softmax_loss_forward(*up, -100, reduction)
    want = reference.adaptive_softmax_loss_backward(torch.tensor(1.7, dtype=torch.float64), *up, -100, reduction,
                                                    head_lse, tail_lse)
    got = (hidden_l.grad, head_w_l.grad, head_b_l.grad if bias else None, [p.grad for p in tp], [w.grad for w in tw])
    assert_all_close([loss], [want_loss], dtype, "loss")
    assert_all_close(_flat_grads(got, bias), _flat_grads(want, bias), dtype, "gradients")
    if empty_cluster:
        assert torch.count_nonzero(tp[1].grad) == 0 and torch.count_nonzero(tw[1].grad) == 0


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
def test_loss_with_grads_only_when_training_a_scalar_loss(backend):
    """No gradient needed (no_grad, or no input requires it) or a per-row loss: the
    loss op that saves its statistics runs instead, with the same value."""
    case = stats_case_for(backend, torch.float32, True, False, seed=21)
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    h = hidden.detach().requires_grad_()
    trained = ck.adaptive_softmax_loss(h, target, head_w, head_b, projs, tails, cutoffs, backend=backend)
    assert "adaptive_softmax_loss_with_grads" in _grad_fn_name(trained)
    with torch.no_grad():
        plain = ck.adaptive_softmax_loss(h, target, head_w, head_b, projs, tails, cutoffs, backend=backend)
    frozen = ck.adaptive_softmax_loss(hidden, target, head_w, head_b, projs, tails, cutoffs, backend=backend)
    assert plain.grad_fn is None and frozen.grad_fn is None
    torch.testing.assert_close(trained.detach(), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frozen, plain, rtol=0, atol=0)
    rows = ck.adaptive_softmax_loss(h, target, head_w, head_b, projs, tails, cutoffs, reduction="none",
                                    backend=backend)
    assert "adaptive_softmax_loss_with_grads" not in _grad_fn_name(rows)
    torch.testing.assert_close(rows.sum() / (target != -100).sum(), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
def test_loss_with_grads_opcheck(backend):
    case = stats_case_for(backend, torch.float32, True, False, seed=23)
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    args = (hidden.contiguous().requires_grad_(), target, head_w.requires_grad_(), head_b.requires_grad_(),
            [p.requires_grad_() for p in projs], [w.requires_grad_() for w in tails], cutoffs, -100)
    for reduction in ("mean", "sum"):
        torch.library.opcheck(torch.ops.cprec.adaptive_softmax_loss_with_grads.default, (*args, reduction, backend))


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
def test_cpu_loss_with_grads_refuses_a_per_row_loss(backend):
    from cprec_kernels._core.cpu_extension import ops

    case = stats_case(torch.float32, True, False, seed=5)
    with pytest.raises(ValueError, match="mean or sum"):
        ops.adaptive_softmax_loss_with_grads(*case, -100, "none")


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_cpu_loss_float32_over_a_wide_logit_range(backend, scale):
    """The cpu kernels' own float32 exp (a polynomial, fused with the shift and scale):
    logits from nearly flat to spread over hundreds (rows where most items underflow),
    widths that are not multiples of the vector width. Loss and every gradient are within
    2x the float32 reference backend's own error against float64 (at scale 30 that error
    is ~1e-3: the conditioning of the problem, not of the kernels)."""
    hidden, target, head_w, head_b, projs, tails, cutoffs = stats_case(torch.float32, True, False, seed=31, n=67)

    def run(name, dtype):
        h = (hidden * scale).to(dtype).contiguous().requires_grad_()
        ps = [t.detach().to(dtype).requires_grad_() for t in [head_w, head_b, *projs, *tails]]
        n = len(projs)
        loss = ck.adaptive_softmax_loss(h, target, ps[0], ps[1], ps[2 : 2 + n], ps[2 + n :], cutoffs,
                                        reduction="sum", backend=name)
        loss.backward()
        return [loss.detach(), h.grad, *[p.grad for p in ps]]

    want = run("torch", torch.float64)
    errors = {name: [(g.double() - w).abs().max().item() for g, w in zip(run(name, torch.float32), want)]
              for name in ("torch", backend)}
    for i, (ours, eager) in enumerate(zip(errors[backend], errors["torch"])):
        assert ours <= 2 * eager + 1e-6, (i, ours, eager)


@pytest.mark.parametrize("backend", backend_params(ADAPTIVE_SOFTMAX_LOSS, ["cpu"]))
def test_loss_with_grads_refuses_a_double_backward(backend):
    case = stats_case_for(backend, torch.float64, True, False, seed=41)
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    h = hidden.detach().requires_grad_()
    loss = ck.adaptive_softmax_loss(h, target, head_w, head_b, projs, tails, cutoffs, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    (grad,) = torch.autograd.grad(loss, h)  # a plain backward still works
    assert grad.shape == h.shape
