"""The ops are real custom ops: a model built on all of them compiles with fullgraph
(opcheck of each op over every backend is in its test module)."""
import torch

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, NextItNetBlock


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
