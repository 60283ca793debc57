"""Sharing schemes, parameter counts, compression ratio, causality of the models."""
import pytest
import torch

from cprec.models import CpRec, NextItNet, PopularityModel, build_model, parameter_table
from cprec.sharing import SCHEMES, layer_map

DILATIONS = [1, 2, 1, 2]


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("none", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("cross-layer", [0] * 8),
        ("cross-block", [0, 1] * 4),
        ("adjacent-layer", [0, 0, 1, 1, 2, 2, 3, 3]),
        ("adjacent-block", [0, 1, 0, 1, 2, 3, 2, 3]),
    ],
)
def test_layer_maps(scheme, expected):
    assert layer_map(scheme, 4) == expected


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="sharing scheme must be one of"):
        layer_map("half", 4)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_middle_parameters_follow_the_scheme(scheme):
    d = 8
    model = CpRec(30, [10, 20, 30], d=d, block_dilations=DILATIONS, sharing=scheme)
    distinct = len(set(layer_map(scheme, len(DILATIONS))))
    conv = d * d * 3 + d
    layer_norms = 2 * len(DILATIONS) * 2 * d
    assert model.num_parameters()["middle"] == distinct * conv + layer_norms
    # shared convs are the same tensors in every block that uses them
    blocks = model.middle.blocks
    if scheme == "cross-layer":
        assert all(b.conv1.weight is blocks[0].conv1.weight and b.conv2.weight is blocks[0].conv1.weight for b in blocks)


def test_parameter_counts_are_exact():
    V, d = 50, 16
    nxt = NextItNet(V, d=d, block_dilations=[1, 2]).num_parameters()
    assert nxt["input"] == (V + 1) * d
    assert nxt["output"] == V * d + V
    assert nxt["middle"] == 4 * (d * d * 3 + d) + 4 * 2 * d
    assert nxt["total"] == sum(p.numel() for p in NextItNet(V, d=d, block_dilations=[1, 2]).parameters())
    cp = CpRec(V, [10, 30, 50], d=d, block_dilations=[1, 2], div_value=4, sharing="none").num_parameters()
    assert cp["input"] == 10 * 16 + 20 * 4 + 20 * 1 + 16 * 4 + 16 * 1
    assert cp["output"] == (10 + 2) * 16 + (16 * 4 + 20 * 4) + (16 * 1 + 20 * 1)


def test_default_config_is_at_least_4x_smaller():
    cfg = dict(model="cprec", num_items=9724, d=64, block_dilations=[1, 4, 1, 4], kernel_size=3,
               sharing="cross-block", cutoffs=[658, 2222, 5473, 9724], div_value=4.0)
    table = parameter_table(cfg)
    assert table["baseline"]["total"] / table["compressed"]["total"] >= 4


@pytest.mark.parametrize("kind", ["nextitnet", "cprec"])
def test_models_are_causal_and_rank_all_items(kind):
    V = 40
    model = build_model(dict(model=kind, num_items=V, d=8, block_dilations=[1, 2], kernel_size=3,
                             sharing="none", cutoffs=[10, 25, 40], div_value=2.0))
    x = torch.randint(0, V, (2, 9))
    x[:, :3] = V  # left padding
    h = model.hidden(x)
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % V
    torch.testing.assert_close(model.hidden(x2)[:, :6], h[:, :6])
    scores = model.scores(x)
    assert scores.shape == (2, V)
    torch.testing.assert_close(scores.exp().sum(1), torch.ones(2))
    values, ids = model.recommend(x, 5, exclude=x)
    assert not (ids.unsqueeze(2) == x.unsqueeze(1)).any()
    loss = model.loss(x, torch.where(x == V, V, (x + 1) % V))
    assert torch.isfinite(loss)


def test_popularity_model_ranks_by_count():
    pop = PopularityModel(4, [1, 10, 3, 0])
    ranks = pop.scores(torch.zeros(2, 3, dtype=torch.long)).argsort(dim=1, descending=True)
    assert ranks[0].tolist() == [1, 2, 0, 3] and pop.num_parameters()["total"] == 0
