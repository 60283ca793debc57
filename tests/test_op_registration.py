"""The ops are real custom ops: opcheck passes and a model compiles with fullgraph."""
import torch

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, NextItNetBlock
from helpers import make_adaptive

f64 = torch.float64
ops = torch.ops.cprec


def _conv_args():
    x = torch.randn(2, 5, 3, dtype=f64, requires_grad=True)
    w = torch.randn(4, 3, 3, dtype=f64, requires_grad=True)
    b, lw, lb = (torch.randn(4, dtype=f64, requires_grad=True) for _ in range(3))
    r = torch.randn(2, 5, 4, dtype=f64, requires_grad=True)
    return x, w, b, lw, lb, r


def test_opcheck_conv_ops():
    x, w, b, lw, lb, r = _conv_args()
    torch.library.opcheck(ops.causal_conv1d.default, (x, w, b, 2, "torch"))
    torch.library.opcheck(ops.causal_conv1d_ln_relu.default, (x, w, b, lw, lb, r, 1, 1e-5, "torch"))
    torch.library.opcheck(ops.causal_conv1d_ln_relu.default, (x, w, None, None, None, None, 3, 1e-8, "torch"))
    g = torch.randn(2, 5, 4, dtype=f64)
    torch.library.opcheck(ops.causal_conv1d_backward.default, (g, x.detach(), w.detach(), None, 1, "torch"))


def test_opcheck_embedding_op():
    w0 = torch.randn(3, 4, dtype=f64, requires_grad=True)
    w1 = torch.randn(5, 2, dtype=f64, requires_grad=True)
    p1 = torch.randn(4, 2, dtype=f64, requires_grad=True)
    ids = torch.tensor([[0, 7], [3, 8]])
    identity = w0.new_empty(0)
    torch.library.opcheck(ops.blockwise_embedding.default, (ids, [w0, w1], [identity, p1], [3, 8], 8, True, "torch"))


def test_opcheck_adaptive_ops():
    _, (hw, hb, tp, tw) = make_adaptive(4, [3, 5, 9], head_bias=True)
    h = torch.randn(6, 4, dtype=f64, requires_grad=True)
    t = torch.tensor([0, 3, 4, 8, 2, -100])
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(ops.adaptive_softmax_loss.default, (h, t, hw, hb, tp, tw, [3, 5, 9], -100, reduction, "torch"))
    torch.library.opcheck(ops.adaptive_log_prob.default, (h, hw, None, tp, tw, [3, 5, 9], "torch"))
    ex = torch.tensor([[0, -1]] * 6)
    torch.library.opcheck(ops.adaptive_topk.default, (h, hw, hb, tp, tw, [3, 5, 9], 3, ex, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_model_compiles_fullgraph():
    torch._dynamo.reset()
    emb = BlockwiseEmbedding([10, 40], 16, padding_idx=40)
    block = NextItNetBlock(16, dilation=2)
    head = AdaptiveSoftmax(16, [10, 25, 40])

    def step(ids, target):
        h = block(emb(ids)).reshape(-1, 16)
        return head(h, target.reshape(-1), ignore_index=40), head.topk(h, 3)[1]

    ids = torch.randint(0, 41, (2, 6))
    target = torch.randint(0, 41, (2, 6))
    loss_eager, top_eager = step(ids, target)
    compiled = torch.compile(step, fullgraph=True)
    loss, top = compiled(ids, target)
    torch.testing.assert_close(loss, loss_eager)
    assert torch.equal(top, top_eager)
    loss.backward()
    assert block.conv1.weight.grad is not None and emb.tail_projections[0].grad is not None
