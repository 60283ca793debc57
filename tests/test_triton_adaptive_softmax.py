"""The Triton adaptive softmax (loss, log-prob, top-k) against the eager reference and
against ``torch.nn.AdaptiveLogSoftmaxWithLoss`` holding the same parameters.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), where the tile
sizes drop to 16 rows x 32 items, so the tiny shapes below still span several row
blocks, head tiles and tail tiles. Shapes: N = 37 rows, d = 32, cutoffs
[70, 90, 130, 160] (a head of 73 columns, tails of 20, 40 and 30 items with widths
16, 8 and 4, below tl.dot's minimum of 16, so padding is exercised).
"""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import cprec_kernels as ck  # noqa: E402
from cprec_kernels.nn import AdaptiveSoftmax  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, D, CUTOFFS, DIV = 37, 32, [70, 90, 130, 160], 2.0
V = CUTOFFS[-1]
TOL = dict(rtol=1e-4, atol=1e-5)


def make_layer(head_bias=True, cutoffs=CUTOFFS, dtype=torch.float32):
    """(nn.AdaptiveLogSoftmaxWithLoss, our AdaptiveSoftmax with a copy of its parameters)."""
    theirs = nn.AdaptiveLogSoftmaxWithLoss(D, cutoffs[-1], cutoffs[:-1], div_value=DIV, head_bias=head_bias)
    theirs = theirs.to(device=DEVICE, dtype=dtype)
    return theirs, AdaptiveSoftmax.from_torch(theirs)


def params(layer):
    return layer.head_weight, layer.head_bias, list(layer.tail_projections), list(layer.tail_weights), layer.cutoffs


def make_hidden(n=N, dtype=torch.float32):
    # Scaled up so the softmaxes are peaked and a wrong logit shows in the loss.
    return (3 * torch.randn(n, D, device=DEVICE)).to(dtype).requires_grad_()


def loss_and_grads(layer, hidden, target, backend, reduction="mean", grad=None, **kw):
    """The loss and the grads of hidden and of every parameter (None where absent)."""
    ps = [p for p in (layer.head_weight, layer.head_bias, *layer.tail_projections, *layer.tail_weights)]
    for t in (hidden, *ps):
        if t is not None:
            t.grad = None
    loss = ck.adaptive_softmax_loss(hidden, target, *params(layer), reduction=reduction, backend=backend, **kw)
    loss.backward(torch.ones_like(loss) if grad is None else grad)
    return [loss.detach()] + [None if t is None else t.grad.clone() for t in (hidden, *ps)]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"output {i}: expected None"
        else:
            torch.testing.assert_close(g.float(), w.float(), **(tol or TOL), msg=lambda m: f"output {i}: {m}")


def random_target(n=N, ignore_some=True):
    target = torch.randint(0, V, (n,), device=DEVICE)
    if ignore_some:
        target[::6] = -100
    return target


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reduction, head_bias", [("mean", True), ("sum", True), ("none", True), ("mean", False)]
)
def test_loss_and_grads_match_reference(reduction, head_bias):
    _, layer = make_layer(head_bias)
    hidden, target = make_hidden(), random_target()
    grad = torch.randn(N, device=DEVICE) if reduction == "none" else None
    want = loss_and_grads(layer, hidden, target, "torch", reduction, grad)
    got = loss_and_grads(layer, hidden, target, "triton", reduction, grad)
    assert_all_close(got, want)
    if reduction == "none":
        assert (got[0][target == -100] == 0).all()


def test_loss_and_grads_match_torch_module():
    theirs, ours = make_layer(head_bias=True)
    hidden, target = make_hidden(), random_target(ignore_some=False)
    got = loss_and_grads(ours, hidden, target, "triton", "mean")
    out = theirs(hidden, target)
    hidden.grad = None
    out.loss.backward()
    torch.testing.assert_close(got[0], out.loss, **TOL)
    want = [hidden.grad, theirs.head.weight.grad, theirs.head.bias.grad]
    want += [t[0].weight.grad for t in theirs.tail] + [t[1].weight.grad for t in theirs.tail]
    assert_all_close(got[1:], want)
    per_row = ck.adaptive_softmax_loss(hidden, target, *params(ours), reduction="none", backend="triton")
    torch.testing.assert_close(per_row, -out.output.detach(), **TOL)


def test_targets_on_every_boundary_with_an_empty_tail():
    # Tail 1 ([90, 130)) has no row; every other cluster edge is hit from both sides.
    _, layer = make_layer(head_bias=False)
    edges = [0, 1, 69, 70, 71, 89, 130, 131, 158, 159]
    target = torch.tensor(edges * 4, device=DEVICE, dtype=torch.int32)[:N]
    wide = make_hidden(N).detach().repeat(1, 2)  # a non-contiguous view of the inputs
    hidden = wide[:, ::2].requires_grad_()
    grad = torch.randn(N, device=DEVICE)
    want = loss_and_grads(layer, hidden, target, "torch", "none", grad)
    got = loss_and_grads(layer, hidden, target, "triton", "none", grad)
    assert_all_close(got, want)
    assert (got[-2] == 0).all() and (got[-5] == 0).all()  # tail 1's weight and projection


def test_all_rows_ignored():
    _, layer = make_layer()
    hidden, target = make_hidden(), torch.full((N,), 7, device=DEVICE)
    for reduction in ("mean", "none"):
        got = loss_and_grads(layer, hidden, target, "triton", reduction, ignore_index=7)
        assert (got[0] == 0).all()
        assert all((g == 0).all() for g in got[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_is_close_to_reference(dtype):
    _, layer = make_layer(dtype=dtype)
    hidden, target = make_hidden(dtype=dtype), random_target()
    want = loss_and_grads(layer, hidden, target, "torch", "sum")
    got = loss_and_grads(layer, hidden, target, "triton", "sum")
    assert got[0].dtype == torch.float32
    # Dot operands are rounded to the half dtype (as a half nn.Linear does); the reference is fp32.
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=0.5)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == dtype
        scale = w.float().abs().max().clamp(min=1)
        assert (g.float() - w.float()).abs().max() <= 5e-2 * scale


def test_float64_is_refused():
    _, layer = make_layer(dtype=torch.float64)
    hidden = make_hidden(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ck.adaptive_softmax_loss(hidden, random_target(), *params(layer), backend="triton")


def test_head_only_layout():
    # cutoffs = [V]: no tails (nn.AdaptiveLogSoftmaxWithLoss cannot express it).
    layer = AdaptiveSoftmax(D, [V], head_bias=True).to(DEVICE)
    hidden, target = make_hidden(), random_target()
    assert_all_close(loss_and_grads(layer, hidden, target, "triton"), loss_and_grads(layer, hidden, target, "torch"))
    log_probs = ck.adaptive_log_prob(hidden.detach(), *params(layer), backend="torch")
    values, ids = ck.adaptive_topk(hidden.detach(), *params(layer), k=3, backend="triton")
    check_topk(values, ids, log_probs, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist on CUDA")
def test_loss_backend_never_syncs_with_the_host():
    from cprec_kernels.triton import adaptive_softmax as kernels

    _, layer = make_layer()
    hidden, target = make_hidden().detach(), random_target()
    args = (hidden, target, *params(layer)[:-1], CUTOFFS, -100)
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.adaptive_softmax_loss_forward(*args, "mean")
        kernels.adaptive_softmax_loss_backward(torch.ones((), device=DEVICE), *args, "mean")
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------------------
# log-prob
# --------------------------------------------------------------------------------------
def test_log_prob_and_its_backward_match_reference():
    theirs, layer = make_layer()
    hidden = make_hidden()
    got = ck.adaptive_log_prob(hidden, *params(layer), backend="triton")
    want = ck.adaptive_log_prob(hidden, *params(layer), backend="torch")
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, theirs.log_prob(hidden), **TOL)
    torch.testing.assert_close(got.exp().sum(dim=1), torch.ones(N, device=DEVICE), **TOL)
    grad = torch.randn(N, V, device=DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        for t in (hidden, *layer.parameters()):
            t.grad = None
        (ck.adaptive_log_prob(hidden, *params(layer), backend=backend) * grad).sum().backward()
        grads.append([t.grad.clone() for t in (hidden, *layer.parameters())])
    assert_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------
def check_topk(values, ids, log_probs, k, exclude=None):
    """Best first, k distinct ids whose log-probs are the given values and equal the
    k best of ``log_probs`` (ties aside), none of them excluded."""
    want = ck.reference.mask_excluded(log_probs, exclude) if exclude is not None else log_probs
    want_values, _ = torch.topk(want, k, dim=1)
    assert ids.dtype == torch.int64 and ids.shape == (N, k)
    torch.testing.assert_close(values, want_values, **TOL)
    torch.testing.assert_close(log_probs.gather(1, ids), values, **TOL)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    if exclude is not None:
        assert not (ids.unsqueeze(2) == exclude.unsqueeze(1)).any()


@pytest.mark.parametrize("k", [1, 20])
def test_topk_matches_log_prob_and_torch_topk(k):
    _, layer = make_layer(head_bias=k == 1)
    hidden = make_hidden().detach()
    log_probs = ck.adaptive_log_prob(hidden, *params(layer), backend="torch")
    values, ids = ck.adaptive_topk(hidden, *params(layer), k=k, backend="triton")
    check_topk(values, ids, log_probs, k)


def test_topk_exclude_covers_the_best_items():
    _, layer = make_layer()
    hidden = make_hidden().detach()
    log_probs = ck.adaptive_log_prob(hidden, *params(layer), backend="torch")
    best = torch.topk(log_probs, 6, dim=1).indices
    exclude = torch.cat([best, torch.full((N, 2), -1, device=DEVICE)], dim=1)
    exclude[::3, 4:] = -1  # rows with fewer excluded ids, padded
    values, ids = ck.adaptive_topk(hidden, *params(layer), k=7, exclude=exclude, backend="triton")
    check_topk(values, ids, log_probs, 7, exclude)
    want = ck.adaptive_topk(hidden, *params(layer), k=7, exclude=exclude, backend="torch")
    torch.testing.assert_close(values, want[0], **TOL)
