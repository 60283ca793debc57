"""nn modules: PyTorch interop of AdaptiveSoftmax, the NextItNet block, sharing."""
import pytest
import torch
from torch import nn

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, CausalConv1d, NextItNetBlock
from cprec_kernels.testing import conv_by_padding, embedding_by_loop


def test_adaptive_softmax_round_trips_torch_module():
    torch_module = nn.AdaptiveLogSoftmaxWithLoss(12, 40, [5, 13, 27], div_value=2.0, head_bias=True)
    ours = AdaptiveSoftmax.from_torch(torch_module)
    assert ours.cutoffs == [5, 13, 27, 40] and ours.div_value == 2.0
    h = torch.randn(9, 12)
    torch.testing.assert_close(ours.log_prob(h), torch_module.log_prob(h), atol=1e-5, rtol=1e-5)
    back = ours.to_torch()
    torch.testing.assert_close(back.log_prob(h), torch_module.log_prob(h), atol=1e-5, rtol=1e-5)
    target = torch.randint(0, 40, (9,))
    torch.testing.assert_close(ours(h, target), torch_module(h, target).loss, atol=1e-5, rtol=1e-5)
    fresh = AdaptiveSoftmax(12, [5, 13, 27, 40], div_value=2.0)
    assert [tuple(p.shape) for p in fresh.to_torch().parameters()] == [
        tuple(p.shape) for p in nn.AdaptiveLogSoftmaxWithLoss(12, 40, [5, 13, 27], div_value=2.0).parameters()
    ]


def test_causal_conv_module_matches_conv1d():
    conv = CausalConv1d(5, 6, kernel_size=3, dilation=2)
    x = torch.randn(2, 9, 5)
    torch.testing.assert_close(conv(x), conv_by_padding(x, conv.weight, conv.bias, 2))


def test_nextitnet_block_formula():
    block = NextItNetBlock(6, dilation=2, eps=1e-8)
    with torch.no_grad():
        for ln in (block.ln1, block.ln2):
            ln.weight.normal_()
            ln.bias.normal_()
    x = torch.randn(3, 10, 6)
    h = torch.relu(block.ln1(conv_by_padding(x, block.conv1.weight, block.conv1.bias, 2)))
    ref = x + torch.relu(block.ln2(conv_by_padding(h, block.conv2.weight, block.conv2.bias, 4)))
    torch.testing.assert_close(block(x), ref)


def test_shared_convs_stay_out_of_block_state():
    c1, c2 = CausalConv1d(4, 4), CausalConv1d(4, 4)
    a, b = NextItNetBlock(4, 1, c1, c2), NextItNetBlock(4, 2, c1, c2)
    owner = nn.ModuleList([c1, c2, a, b])
    n = sum(p.numel() for p in owner.parameters())
    assert n == 2 * (4 * 4 * 3 + 4) + 2 * 4 * 4  # two convs, four LayerNorms
    assert not any("conv" in k for k in a.state_dict())
    out = b(a(torch.randn(1, 5, 4)))
    out.sum().backward()
    assert c1.weight.grad is not None


def test_blockwise_embedding_module_widths_and_padding():
    emb = BlockwiseEmbedding([4, 10, 30], 16, div_value=4.0, padding_idx=30)
    assert [tuple(w.shape) for w in emb.weights] == [(4, 16), (6, 4), (20, 1)]
    assert emb.head_projection is None and [tuple(p.shape) for p in emb.tail_projections] == [(16, 4), (16, 1)]
    ids = torch.tensor([[30, 0, 29], [4, 3, 10]])
    out = emb(ids)
    assert out.shape == (2, 3, 16) and out[0, 0].abs().sum() == 0
    projections = [emb.head_projection, *emb.tail_projections]
    torch.testing.assert_close(out, embedding_by_loop(ids, list(emb.weights), projections, [4, 10, 30], padding_idx=30))


# --------------------------------------------------------------------------------------
# last_position: the serving path evaluates only the positions the last one depends on
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dilations,T", [([1, 2, 4, 8], 50), ([1, 4, 1, 4], 23), ([3, 6], 17), ([2], 1), ([8, 1], 9)])
def test_last_position_is_the_full_stack_at_the_last_position(dilations, T):
    from cprec_kernels.nn import NextItNetBlock, last_position

    torch.manual_seed(T)
    C = 6
    shared = NextItNetBlock(C, 1).double()
    blocks = [NextItNetBlock(C, d, conv1=shared.conv1, conv2=shared.conv2).double() for d in dilations]
    for b in blocks:  # LayerNorm affine params away from 1 / 0, so a wrong row shows
        torch.nn.init.normal_(b.ln1.weight), torch.nn.init.normal_(b.ln2.bias)
    x = torch.randn(3, T, C, dtype=torch.float64)
    x[1, : T // 2] = 0  # a left-padded history
    full = x
    for b in blocks:
        full = b(full)
    torch.testing.assert_close(last_position(blocks, x), full[:, -1], rtol=1e-12, atol=1e-12)


def test_last_position_evaluates_fewer_positions(monkeypatch):
    from cprec_kernels import nn as cnn

    seen = []
    real = cnn.causal_conv1d_ln_relu
    monkeypatch.setattr(cnn, "causal_conv1d_ln_relu", lambda x, *a, **k: seen.append(x.shape[1]) or real(x, *a, **k))
    blocks = [cnn.NextItNetBlock(4, d) for d in (1, 2, 4, 8)]
    with torch.no_grad():
        cnn.last_position(blocks, torch.randn(1, 50, 4))
    assert sum(seen) == 144 and len(seen) == 8  # against 8 * 50 = 400 for the whole history


def test_model_scores_use_the_last_position_path():
    from cprec.models import CpRec

    torch.manual_seed(0)
    model = CpRec(40, [10, 25, 40], d=8, block_dilations=[1, 4, 1, 4]).double().eval()
    ids = torch.randint(0, 41, (4, 30))
    with torch.no_grad():
        full = model.output_layer.log_prob(model.hidden(ids)[:, -1])
        torch.testing.assert_close(model.scores(ids), full)
        torch.testing.assert_close(model.recommend(ids, 5)[1], torch.topk(full, 5)[1])
