"""The two training objectives (every position vs the last position of every prefix)
and tied input/output embeddings."""
import numpy as np
import pytest
import torch

from cprec.data import build_dataset
from cprec.models import NextItNet, build_model
from cprec.train import TrainConfig, train


def _sequences(rng, n, V, lo=2, hi=30):
    return [[f"i{x}" for x in rng.integers(0, V, size=rng.integers(lo, hi))] for _ in range(n)]


def _prefix_by_definition(seq, t, max_len, pad):
    """Input that predicts seq[t]: the last max_len items before it, left-padded."""
    hist = seq[max(0, t - max_len) : t]
    return [pad] * (max_len - len(hist)) + list(hist)


@pytest.mark.parametrize("max_len", [1, 4, 7])
def test_prefixes_are_every_history_of_every_training_sequence(max_len):
    rng = np.random.default_rng(max_len)
    data = build_dataset(_sequences(rng, 23, 17), split="leave-one-out", max_len=max_len)
    pre = data.prefixes
    index = {t: i for i, t in enumerate(data.item_tokens)}
    # Rebuild the training parts (leave-one-out: the last two items are held out).
    expected = []
    for s in _sequences(np.random.default_rng(max_len), 23, 17):
        part = [index[t] for t in (s[:-2] if len(s) >= 3 else s)]
        expected += [(_prefix_by_definition(part, t, max_len, data.pad), part[t]) for t in range(1, len(part))]
    order = rng.permutation(len(pre))
    x, y = pre.batch(order)
    got = sorted((tuple(a), b) for a, b in zip(x.tolist(), y.tolist()))
    assert got == sorted((tuple(a), b) for a, b in expected)
    # As many targets as the every-position windows hold: each item once.
    assert len(pre) == int((data.train.targets != data.pad).sum())


def test_last_position_loss_is_the_every_position_loss_at_the_last_position():
    torch.manual_seed(0)
    model = NextItNet(13, d=8, block_dilations=[1, 2]).double()
    x = torch.randint(0, 14, (5, 9))
    y = torch.randint(0, 13, (5, 9))
    masked = torch.full_like(y, 13)
    masked[:, -1] = y[:, -1]
    assert torch.allclose(model.loss(x, y[:, -1]), model.loss(x, masked))


def test_tied_embeddings_share_the_item_vectors():
    cfg = {"model": "nextitnet", "num_items": 20, "d": 8, "block_dilations": [1, 2], "kernel_size": 3,
           "sharing": "none", "tie_embeddings": True}
    tied, untied = build_model(cfg), build_model({**cfg, "tie_embeddings": False})
    p, q = tied.num_parameters(), untied.num_parameters()
    assert p["output"] == 20 and q["output"] == 20 * 8 + 20
    assert p["input"] == q["input"] and p["total"] == sum(x.numel() for x in tied.parameters())
    x = torch.randint(0, 21, (3, 6))
    tied.loss(x, torch.randint(0, 20, (3, 6))).backward()
    emb = tied.input_layer.weight
    with torch.no_grad():
        emb[:20] += 1.0  # moving the input vectors moves the output logits too
    assert torch.allclose(tied.output_layer(torch.eye(8))[:, :20] - tied.output_layer.bias, emb[:20].T)
    with pytest.raises(ValueError, match="tied embeddings need full"):
        build_model({**cfg, "input": "blockwise", "cutoffs": [10, 20]})


@pytest.mark.parametrize("objective,tie", [("last", False), ("every", True), ("last", True)])
def test_training_with_each_objective_lowers_the_loss(objective, tie):
    cfg = TrainConfig(model="nextitnet", d=16, block_dilations=[1, 2], max_len=10, epochs=3, limit_batches=25,
                      objective=objective, tie_embeddings=tie, lr=3e-3, progress=False, batch_size=64)
    result = train(cfg, say=lambda m: None)
    assert result["objective"] == objective
    assert result["model_config"].get("tie_embeddings", False) == tie
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[2] < losses[0] - 0.1, losses


def test_cli_flags_reach_the_run(capsys):
    from cprec.cli import main

    assert main(["train", "--model", "nextitnet", "--quiet", "--dim", "8", "--dilations", "1", "--epochs", "1",
                 "--limit-batches", "2", "--max-len", "8", "--objective", "last", "--tie-embeddings", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "last" and result["model_config"]["tie_embeddings"] is True
    assert result["params"]["output"] == result["model_config"]["num_items"]


def test_unknown_objective_raises():
    with pytest.raises(ValueError, match="objective must be one of"):
        train(TrainConfig(objective="middle", progress=False), say=lambda m: None)
