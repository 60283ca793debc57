"""Every op on the ``torch`` backend against an independent formulation, float64,
values and gradients, odd sizes and non-contiguous inputs."""
import pytest
import torch

import cprec_kernels as ck
from helpers import (
    assert_all_close,
    conv_by_padding,
    conv_ln_relu_by_modules,
    embedding_by_loop,
    grads,
    make_adaptive,
    noncontiguous,
)

f64 = torch.float64


@pytest.mark.parametrize("B,T,C_in,C_out,K,dil", [(2, 7, 5, 3, 3, 1), (1, 1, 4, 4, 3, 2), (3, 5, 3, 6, 2, 8), (2, 9, 7, 7, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_matches_padded_conv(B, T, C_in, C_out, K, dil, with_bias):
    x = torch.randn(B, T, C_in, dtype=f64, requires_grad=True)
    w = torch.randn(C_out, C_in, K, dtype=f64, requires_grad=True)
    b = torch.randn(C_out, dtype=f64, requires_grad=True) if with_bias else None
    y = ck.causal_conv1d(noncontiguous(x), w, b, dil, backend="torch")
    y_ref = conv_by_padding(x, w, b, dil)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    assert_all_close(grads((y * g).sum(), [x, w, b]), grads((y_ref * g).sum(), [x, w, b]))


def test_causal_conv1d_is_causal():
    x = torch.randn(1, 12, 4, dtype=f64)
    w = torch.randn(4, 4, 3, dtype=f64)
    y = ck.causal_conv1d(x, w, None, 2)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the future only
    y2 = ck.causal_conv1d(x2, w, None, 2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


@pytest.mark.parametrize("T,dil", [(1, 1), (3, 4), (11, 2)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_ln_relu_matches_modules(T, dil, with_residual, affine):
    C_in, C_out = 5, 7
    x = torch.randn(2, T, C_in, dtype=f64, requires_grad=True)
    w = torch.randn(C_out, C_in, 3, dtype=f64, requires_grad=True)
    b = torch.randn(C_out, dtype=f64, requires_grad=True)
    lw = torch.randn(C_out, dtype=f64, requires_grad=True) if affine else None
    lb = torch.randn(C_out, dtype=f64, requires_grad=True) if affine else None
    r = torch.randn(2, T, C_out, dtype=f64, requires_grad=True) if with_residual else None
    y = ck.causal_conv1d_ln_relu(noncontiguous(x), w, b, lw, lb, dil, 1e-5, residual=r, backend="torch")
    y_ref = conv_ln_relu_by_modules(x, w, b, lw, lb, dil, 1e-5, r)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    inputs = [x, w, b, lw, lb, r]
    assert_all_close(grads((y * g).sum(), inputs), grads((y_ref * g).sum(), inputs))


def test_conv_ops_gradcheck():
    x = torch.randn(2, 4, 3, dtype=f64, requires_grad=True)
    w = torch.randn(3, 3, 3, dtype=f64, requires_grad=True)
    b, lw, lb = (torch.randn(3, dtype=f64, requires_grad=True) for _ in range(3))
    r = torch.randn(2, 4, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ck.causal_conv1d(*a, dilation=2), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda *a: ck.causal_conv1d_ln_relu(*a[:5], dilation=1, eps=1e-5, residual=a[5]), (x, w, b, lw, lb, r)
    )


def _embedding_params(cutoffs, d, widths, head_projection, dtype=f64):
    edges = [0] + cutoffs
    weights = [torch.randn(hi - lo, w, dtype=dtype, requires_grad=True) for lo, hi, w in zip(edges, edges[1:], widths)]
    projections = [
        torch.randn(d, w, dtype=dtype, requires_grad=True) if (j > 0 or head_projection) else None
        for j, w in enumerate(widths)
    ]
    return weights, projections


@pytest.mark.parametrize("head_projection", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3, 23])
@pytest.mark.parametrize("shape", [(17,), (2, 3, 5)])
def test_blockwise_embedding_matches_loop(head_projection, padding_idx, shape):
    cutoffs, d = [5, 12, 23], 6
    weights, projections = _embedding_params(cutoffs, d, [6, 3, 1], head_projection)
    # every block boundary appears, plus random ids
    boundary = torch.tensor([0, 4, 5, 11, 12, 22])
    ids = torch.cat([boundary, torch.randint(0, 23, (max(0, torch.Size(shape).numel() - 6),))])
    ids = ids[: torch.Size(shape).numel()].reshape(shape)
    if padding_idx is not None:
        ids.view(-1)[1] = padding_idx
    ids_nc = noncontiguous(ids)
    out = ck.blockwise_embedding(ids_nc, weights, projections, cutoffs, padding_idx, backend="torch")
    ref = embedding_by_loop(ids, weights, projections, cutoffs, padding_idx)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    inputs = weights + projections
    got, want = grads((out * g).sum(), inputs), grads((ref * g).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a if a is not None else torch.zeros(()), b if b is not None else torch.zeros(()))
    if padding_idx is not None:
        assert out.reshape(-1, d)[1].abs().sum() == 0


def test_blockwise_embedding_empty_block_and_single_block():
    weights, projections = _embedding_params([4, 9, 15], 4, [4, 2, 1], False)
    ids = torch.tensor([0, 3, 10, 14])  # block 1 gets no ids
    out = ck.blockwise_embedding(ids, weights, projections, [4, 9, 15])
    out.sum().backward()
    assert weights[1].grad.abs().sum() == 0 and projections[1].grad.abs().sum() == 0
    torch.testing.assert_close(out, embedding_by_loop(ids, weights, projections, [4, 9, 15]))
    table = torch.randn(7, 3, dtype=f64, requires_grad=True)
    ids = torch.tensor([[6, 0], [2, 2]])
    torch.testing.assert_close(ck.blockwise_embedding(ids, [table], [None], [7]), table[ids])
    assert torch.autograd.gradcheck(lambda t: ck.blockwise_embedding(ids, [t], [None], [7]), (table,))


def test_blockwise_embedding_gradcheck():
    weights, projections = _embedding_params([3, 7], 4, [4, 2], True)
    ids = torch.tensor([0, 2, 3, 6, 6, 1])
    assert torch.autograd.gradcheck(
        lambda w0, w1, p0, p1: ck.blockwise_embedding(ids, [w0, w1], [p0, p1], [3, 7], padding_idx=1),
        (*weights, *projections),
    )


CUTOFFS = [6, 10, 19, 30]


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_adaptive_loss_matches_torch_module(head_bias, reduction):
    module, (hw, hb, tp, tw) = make_adaptive(8, CUTOFFS, head_bias=head_bias)
    N = 23
    hidden = torch.randn(N, 8, dtype=f64, requires_grad=True)
    # targets on every cluster boundary, then random
    target = torch.cat([torch.tensor([0, 5, 6, 9, 10, 18, 19, 29]), torch.randint(0, 30, (N - 8,))])
    ignored = torch.tensor([2, 11])
    target_ign = target.clone()
    target_ign[ignored] = -100
    loss = ck.adaptive_softmax_loss(noncontiguous(hidden), target_ign, hw, hb, tp, tw, CUTOFFS, reduction=reduction, backend="torch")
    keep = target_ign != -100
    per_row = torch.zeros(N, dtype=f64)
    per_row[keep] = -module(hidden[keep], target[keep]).output
    ref = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / keep.sum()}[reduction]
    torch.testing.assert_close(loss, ref)
    g = torch.randn_like(loss)
    inputs = [hidden, hw, hb, *tp, *tw]
    assert_all_close(grads((loss * g).sum(), inputs), grads((ref * g).sum(), inputs))


def test_adaptive_loss_empty_tail_all_ignored_and_int32():
    module, (hw, hb, tp, tw) = make_adaptive(8, CUTOFFS)
    hidden = torch.randn(5, 8, dtype=f64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 25, 29], dtype=torch.int32)  # tails 0 and 1 get no rows
    loss = ck.adaptive_softmax_loss(hidden, target, hw, hb, tp, tw, CUTOFFS)
    torch.testing.assert_close(loss, module(hidden, target.long()).loss)
    loss.backward()
    assert tw[0].grad.abs().sum() == 0 and tw[2].grad.abs().sum() > 0
    all_ignored = torch.full((5,), 7)
    zero = ck.adaptive_softmax_loss(hidden, all_ignored, hw, hb, tp, tw, CUTOFFS, ignore_index=7)
    assert zero.item() == 0.0
    (g,) = torch.autograd.grad(zero, hidden)
    assert g.abs().sum() == 0


def test_adaptive_log_prob_and_topk():
    module, (hw, hb, tp, tw) = make_adaptive(8, CUTOFFS, head_bias=True)
    hidden = torch.randn(9, 8, dtype=f64)
    lp = ck.adaptive_log_prob(hidden, hw, hb, tp, tw, CUTOFFS)
    torch.testing.assert_close(lp, module.log_prob(hidden))
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(9, dtype=f64))
    values, ids = ck.adaptive_topk(hidden, hw, hb, tp, tw, CUTOFFS, k=4)
    ref = lp.topk(4, dim=1)
    torch.testing.assert_close(values, ref.values)
    torch.testing.assert_close(lp.gather(1, ids), values)
    # exclude a row's best items; -1 entries are padding
    exclude = torch.cat([ref.indices[:, :2], torch.full((9, 1), -1)], dim=1)
    values_x, ids_x = ck.adaptive_topk(hidden, hw, hb, tp, tw, CUTOFFS, k=4, exclude=exclude)
    masked = lp.clone().scatter_(1, ref.indices[:, :2], float("-inf"))
    torch.testing.assert_close(values_x, masked.topk(4, dim=1).values)
    assert not (ids_x.unsqueeze(2) == ref.indices[:, None, :2]).any()


def test_adaptive_gradcheck():
    _, (hw, hb, tp, tw) = make_adaptive(4, [3, 5, 9], head_bias=True)
    hidden = torch.randn(6, 4, dtype=f64, requires_grad=True)
    target = torch.tensor([0, 3, 4, 8, 2, -100])
    params = (hidden, hw, hb, *tp, *tw)

    def unpack(h, hw, hb, p0, p1, w0, w1):
        return h, hw, hb, [p0, p1], [w0, w1]

    assert torch.autograd.gradcheck(
        lambda *a: ck.adaptive_softmax_loss(unpack(*a)[0], target, *unpack(*a)[1:], [3, 5, 9], reduction="none"), params
    )
    assert torch.autograd.gradcheck(lambda *a: ck.adaptive_log_prob(*unpack(*a), [3, 5, 9]), params)
    assert torch.autograd.gradcheck(lambda *a: ck.adaptive_topk(*unpack(*a), [3, 5, 9], k=3)[0], params)
