"""The ops are real custom ops: a model built on all of them compiles with fullgraph
(opcheck of each op over every backend is in its test module)."""
import pytest
import torch

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, NextItNetBlock
from harness import module_loads


# The conv's fake kernel differs per backend: the cpu forward also returns the saved z
# [B, T, C], the torch reference an empty one.
@pytest.mark.parametrize("conv_backend", [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not module_loads("cprec_kernels.conv.cpu"),
                                                 reason="the C++ extension is not built")),
])
def test_model_compiles_fullgraph(conv_backend):
    torch._dynamo.reset()
    emb = BlockwiseEmbedding([10, 40], 16, padding_idx=40)
    block = NextItNetBlock(16, dilation=2, backend=conv_backend)
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
