"""Tied adaptive ends: the adaptive softmax reuses the block-wise embedding's tables
(and optionally projections); checked against an untied model set equal, in float64."""
import pytest
import torch

from cprec.models import build_model, parameter_table
from cprec.tied import TiedAdaptiveSoftmax

V, D, CUTOFFS = 37, 12, [7, 19, 30, 37]


def _config(**over):
    cfg = dict(model="cprec", num_items=V, d=D, block_dilations=[1, 2], kernel_size=3, sharing="cross-block",
               cutoffs=CUTOFFS, div_value=2.0, backend="torch", dropout=0.0)
    cfg.update(over)
    return cfg


def _untied_twin(tied):
    """An untied model holding the tied model's values (tables set equal), on the torch backend."""
    twin = build_model(_config()).to(next(tied.parameters()).dtype)
    state = {k: v for k, v in tied.state_dict().items() if not k.startswith("output_layer.")}
    state.update({f"output_layer.{k}": v for k, v in tied.output_layer.untied().state_dict().items()})
    twin.load_state_dict(state)
    return twin


def _batch(B=5, T=9):
    inputs = torch.randint(0, V, (B, T))
    inputs[0, :3] = V  # left padding
    targets = torch.randint(0, V, (B, T))
    targets[1, 4] = V
    return inputs, targets


@pytest.mark.parametrize("tie_projections", [False, True])
def test_tied_tables_are_the_embeddings(tie_projections):
    model = build_model(_config(tie_embeddings=True, tie_projections=tie_projections))
    emb, out = model.input_layer, model.output_layer
    assert isinstance(out, TiedAdaptiveSoftmax)
    assert all(f is e for f, e in zip(out.tail_weights, emb.weights[1:]))
    assert len(out.tail_weights) == len(CUTOFFS) - 1
    proj = out._projections()
    if tie_projections:
        assert all(q.data_ptr() == p.data_ptr() and q.shape == p.shape[::-1] for q, p in zip(proj, emb.tail_projections))
    else:
        assert all(q.data_ptr() != p.data_ptr() for q, p in zip(proj, emb.tail_projections))
    # each tensor once among the model's parameters and in its state_dict
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert not [k for k in model.state_dict() if k.startswith("output_layer.") and "cluster" not in k
                and not (k.startswith("output_layer.tail_projections") and not tie_projections)]


@pytest.mark.parametrize("tie_projections", [False, True])
def test_parameter_counts_show_the_saving(tie_projections):
    cfg = _config(tie_embeddings=True, tie_projections=tie_projections)
    untied, tied = build_model(_config()).num_parameters(), build_model(cfg).num_parameters()
    widths = [D // 2 ** j for j in range(1, len(CUTOFFS))]  # div 2
    sizes = [b - a for a, b in zip(CUTOFFS[:-1], CUTOFFS[1:])]
    n_tails = len(CUTOFFS) - 1
    own_projections = 0 if tie_projections else sum(w * D for w in widths)
    assert tied["output"] == n_tails * D + own_projections
    assert untied["output"] == (CUTOFFS[0] + n_tails) * D + sum(w * D for w in widths) + sum(s * w for s, w in zip(sizes, widths))
    assert tied["input"] == untied["input"] and tied["middle"] == untied["middle"]
    assert tied["total"] == sum(p.numel() for p in build_model(cfg).parameters())
    table = parameter_table(cfg)
    assert table["compressed"] == tied and table["baseline"]["output"] == V * D + V


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("tie_projections", [False, True])
def test_tied_log_probs_and_grads_equal_an_untied_twin(tie_projections, backend):
    tied = build_model(_config(tie_embeddings=True, tie_projections=tie_projections, backend=backend)).double()
    for p in tied.parameters():  # move off the init so every part matters
        torch.nn.init.normal_(p, std=0.3)
    twin = _untied_twin(tied)
    inputs, targets = _batch()
    tied.eval(), twin.eval()
    torch.testing.assert_close(tied.scores(inputs), twin.scores(inputs), rtol=1e-12, atol=1e-12)
    vals, ids = tied.recommend(inputs, 5)
    torch.testing.assert_close(vals, twin.recommend(inputs, 5)[0], rtol=1e-12, atol=1e-12)
    tied.train(), twin.train()
    loss, twin_loss = tied.loss(inputs, targets), twin.loss(inputs, targets)
    torch.testing.assert_close(loss, twin_loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    twin_loss.backward()
    # a tied tensor's gradient is the sum of what both ends send it
    emb, out, t_emb, t_out = tied.input_layer, tied.output_layer, twin.input_layer, twin.output_layer
    c1 = CUTOFFS[0]
    torch.testing.assert_close(emb.weights[0].grad, t_emb.weights[0].grad + t_out.head_weight.grad[:c1])
    torch.testing.assert_close(out.cluster_weight.grad, t_out.head_weight.grad[c1:])
    for j in range(1, len(CUTOFFS)):
        torch.testing.assert_close(emb.weights[j].grad, t_emb.weights[j].grad + t_out.tail_weights[j - 1].grad)
        assert emb.weights[j].grad.abs().sum() > 0
        p_in, q_out = t_emb.tail_projections[j - 1].grad, t_out.tail_projections[j - 1].grad
        if tie_projections:
            torch.testing.assert_close(emb.tail_projections[j - 1].grad, p_in + q_out.t())
        else:
            torch.testing.assert_close(emb.tail_projections[j - 1].grad, p_in)
            torch.testing.assert_close(out.tail_projections[j - 1].grad, q_out)


def test_tied_model_checkpoint_round_trip(tmp_path):
    cfg = _config(tie_embeddings=True, tie_projections=True)
    model = build_model(cfg)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = build_model(cfg)
    again.load_state_dict(torch.load(tmp_path / "m.pt"))
    inputs, _ = _batch()
    model.eval(), again.eval()
    torch.testing.assert_close(model.scores(inputs), again.scores(inputs))
    assert again.output_layer.tail_weights[0] is again.input_layer.weights[1]


@pytest.mark.parametrize("over,message", [
    (dict(tie_embeddings=True, output="full"), "tied embeddings need"),
    (dict(tie_projections=True), "tie_projections needs tie_embeddings"),
    (dict(model="nextitnet", input="full", output="full", tie_embeddings=True, tie_projections=True),
     "tie_projections needs"),
])
def test_bad_tying_is_refused(over, message):
    with pytest.raises(ValueError, match=message):
        build_model(_config(**over))
