"""Bad input raises a clear ValueError/TypeError naming the argument."""
import pytest
import torch

import cprec_kernels as ck
from cprec_kernels.testing import adaptive_params


def test_conv_bad_inputs():
    x, w = torch.randn(2, 5, 3), torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*, \*\]"):
        ck.causal_conv1d(torch.randn(5, 3), w)
    with pytest.raises(ValueError, match=r"weight must have shape \[\*, 3, \*\]"):
        ck.causal_conv1d(x, torch.randn(4, 2, 3))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        ck.causal_conv1d(x, w.double())
    with pytest.raises(TypeError, match="x must have dtype"):
        ck.causal_conv1d(x.long(), w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ck.causal_conv1d([[1.0]], w)
    with pytest.raises(ValueError, match="bias must have shape"):
        ck.causal_conv1d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        ck.causal_conv1d(x, w, dilation=0)
    with pytest.raises(ValueError, match="empty batch"):
        ck.causal_conv1d(torch.randn(0, 5, 3), w)
    with pytest.raises(ValueError, match="weight must have kernel size"):
        ck.causal_conv1d(x, torch.randn(4, 3, 0))
    with pytest.raises(ValueError, match="residual must have shape"):
        ck.causal_conv1d_ln_relu(x, w, None, None, None, residual=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        ck.causal_conv1d_ln_relu(x, w, None, torch.randn(3), None)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ck.causal_conv1d_ln_relu(x, w, None, None, None, eps=0.0)


def test_conv_mixed_devices_raise():
    x = torch.randn(2, 5, 3)
    w = torch.randn(4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but the other inputs are on cpu"):
        ck.causal_conv1d(x, w)


def _emb():
    return [torch.randn(4, 6), torch.randn(6, 2)], [None, torch.randn(6, 2)]


def test_embedding_bad_ids():
    w, p = _emb()
    with pytest.raises(ValueError, match=r"ids holds 1 id\(s\) outside \[0, 10\)"):
        ck.blockwise_embedding(torch.tensor([0, 10]), w, p, [4, 10])
    with pytest.raises(ValueError, match="outside"):
        ck.blockwise_embedding(torch.tensor([-1, 3]), w, p, [4, 10])
    # the padding id may lie outside [0, V)
    out = ck.blockwise_embedding(torch.tensor([10, 3]), w, p, [4, 10], padding_idx=10)
    assert out[0].abs().sum() == 0
    # validated callers may skip the check (ids are then trusted)
    ck.blockwise_embedding(torch.tensor([1, 3]), w, p, [4, 10], check_bounds=False)
    with pytest.raises(TypeError, match="ids must have dtype"):
        ck.blockwise_embedding(torch.tensor([0.0]), w, p, [4, 10])
    with pytest.raises(ValueError, match="empty batch"):
        ck.blockwise_embedding(torch.tensor([], dtype=torch.long), w, p, [4, 10])


def test_embedding_bad_layout():
    w, p = _emb()
    ids = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        ck.blockwise_embedding(ids, w, p, [4, 4])
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[7, \*\]"):
        ck.blockwise_embedding(ids, w, p, [4, 11])
    with pytest.raises(ValueError, match="one table and one projection"):
        ck.blockwise_embedding(ids, w[:1], p, [4, 10])
    with pytest.raises(ValueError, match=r"projections\[1\] must have shape \[6, 2\]"):
        ck.blockwise_embedding(ids, w, [None, torch.randn(5, 2)], [4, 10])
    with pytest.raises(ValueError, match=r"projections\[1\] is None \(identity\) but weights\[1\] has width 2"):
        ck.blockwise_embedding(ids, w, [None, None], [4, 10])
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype"):
        ck.blockwise_embedding(ids, [w[0], w[1].double()], p, [4, 10])
    with pytest.raises(TypeError, match="cutoffs must hold ints"):
        ck.blockwise_embedding(ids, w, p, [4, 10.5])
    with pytest.raises(ValueError, match="must not be empty"):
        ck.blockwise_embedding(ids, [], [], [])


def test_adaptive_bad_inputs():
    hw, hb, tp, tw = adaptive_params(torch.nn.AdaptiveLogSoftmaxWithLoss(8, 30, [6, 10, 19], div_value=2.0))
    h = torch.randn(4, 8)
    good = torch.tensor([0, 7, 15, 29])
    with pytest.raises(ValueError, match=r"target holds 1 id\(s\) outside \[0, 30\)"):
        ck.adaptive_softmax_loss(h, torch.tensor([0, 7, 30, 29]), hw, hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(ValueError, match="outside"):
        ck.adaptive_softmax_loss(h, torch.tensor([0, -5, 3, 2]), hw, hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(ValueError, match="target must have shape"):
        ck.adaptive_softmax_loss(h, good[:3], hw, hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(ValueError, match="reduction must be one of"):
        ck.adaptive_softmax_loss(h, good, hw, hb, tp, tw, [6, 10, 19, 30], reduction="avg")
    with pytest.raises(ValueError, match="head_weight must have shape"):
        ck.adaptive_softmax_loss(h, good, hw, hb, tp, tw, [7, 10, 19, 30])
    with pytest.raises(ValueError, match=r"tail_weights\[2\] must have shape"):
        ck.adaptive_log_prob(h, hw, hb, tp, tw, [6, 10, 19, 31])
    with pytest.raises(ValueError, match="define 3 tail clusters"):
        ck.adaptive_log_prob(h, hw, hb, tp[:2], tw, [6, 10, 19, 30])
    with pytest.raises(TypeError, match="hidden must have dtype"):
        ck.adaptive_log_prob(h.long(), hw, hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(TypeError, match="head_weight has dtype"):
        ck.adaptive_log_prob(h, hw.double(), hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(ValueError, match="empty batch"):
        ck.adaptive_log_prob(h[:0], hw, hb, tp, tw, [6, 10, 19, 30])
    with pytest.raises(ValueError, match="k must be an int in"):
        ck.adaptive_topk(h, hw, hb, tp, tw, [6, 10, 19, 30], k=31)
    with pytest.raises(ValueError, match=r"exclude holds 4 id\(s\) outside \[0, 31\)"):  # V = 30 is padding
        ck.adaptive_topk(h, hw, hb, tp, tw, [6, 10, 19, 30], k=2, exclude=torch.tensor([[31]] * 4))
    with pytest.raises(ValueError, match="exclude must have shape"):
        ck.adaptive_topk(h, hw, hb, tp, tw, [6, 10, 19, 30], k=2, exclude=torch.tensor([[1]] * 3))
