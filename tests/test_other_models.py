"""SASRec and GRU4Rec on the same ops: full and compressed forms, the README example,
and torch.compile of the compressed SASRec."""
import json
import re
from pathlib import Path

import pytest
import torch

from cprec.cli import main
from cprec.models import build_model, parameter_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _config(model, input_kind, output_kind, V=60):
    return dict(model=model, num_items=V, d=16, max_len=12, num_layers=2, num_heads=2, dropout=0.1,
                input=input_kind, output=output_kind, cutoffs=[10, 30, V], div_value=2.0)


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("ends", [("full", "full"), ("blockwise", "adaptive"), ("blockwise", "full")])
def test_models_are_causal_with_either_ends(model, ends):
    m = build_model(_config(model, *ends)).eval()
    V = 60
    x = torch.randint(0, V, (3, 12))
    x[:, :4] = V  # left padding
    h = m.hidden(x)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % V
    torch.testing.assert_close(m.hidden(x2)[:, :8], h[:, :8])
    assert torch.isfinite(h).all()
    torch.testing.assert_close(m.scores(x).exp().sum(1), torch.ones(3))
    _, top = m.recommend(x, 5, exclude=x)
    assert not (top.unsqueeze(2) == x.unsqueeze(1)).any()
    assert torch.isfinite(m.loss(x, torch.where(x == V, V, (x + 3) % V)))


def test_compressed_forms_are_smaller():
    for model in ("sasrec", "gru4rec"):
        table = parameter_table(dict(_config(model, None, None, V=5000), cutoffs=[200, 1000, 5000], d=64, div_value=4.0))
        assert table["baseline"]["total"] / table["compressed"]["total"] > 4
        assert table["baseline"]["middle"] == table["compressed"]["middle"]


def test_compressed_sasrec_compiles_fullgraph():
    torch._dynamo.reset()
    m = build_model(_config("sasrec", "blockwise", "adaptive"))
    x = torch.randint(0, 61, (2, 12))
    y = torch.randint(0, 61, (2, 12))
    m.eval()
    eager = m.loss(x, y)
    compiled = torch.compile(m.loss, fullgraph=True)
    loss = compiled(x, y)
    torch.testing.assert_close(loss, eager)
    loss.backward()
    assert m.input_layer.tail_projections[0].grad is not None


def test_readme_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use the ops in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert re.search(r"loss \d+\.\d+, top items of session 0: \[(\d+, ){9}\d+\]", capsys.readouterr().out)


# Enough training on the shipped data to beat popularity, kept to about a minute each.
BUDGET = ["--quiet", "--dim", "32", "--epochs", "4", "--lr", "0.003", "--max-len", "30", "--dropout", "0.1", "--num-layers", "1"]


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("ends", [[], ["--input", "blockwise", "--output-layer", "adaptive"]])
def test_train_beats_popularity(capsys, model, ends):
    assert main(["train", "--model", model, *BUDGET, *ends, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model_config"]["input"] == ("blockwise" if ends else "full")
    for metric in ("NDCG@10", "HR@10"):
        assert result["test"][metric] > result["baseline_test"][metric]
