"""The cprec command end to end: train (every model and sharing scheme), output
files, resume, evaluate, params, --help, unsafe checkpoints."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cprec.cli import main
from cprec.sharing import SCHEMES

TINY = ["--quiet", "--dim", "16", "--dilations", "1,2", "--epochs", "2", "--limit-batches", "3", "--max-len", "20"]


def run_json(capsys, *args):
    code = main(list(args) + ["--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _finite(metrics):
    return all(math.isfinite(v) and 0 <= v <= 1 for v in metrics.values())


@pytest.mark.parametrize(
    "model,sharing", [("nextitnet", "none"), ("pop", None)] + [("cprec", s) for s in sorted(SCHEMES)]
)
def test_train_json_every_model(capsys, model, sharing):
    extra = ["--sharing", sharing] if sharing else []
    result = run_json(capsys, "train", "--model", model, *TINY, *extra)
    assert result["model"] == model and result["dataset"] == "ml-latest-small"
    assert _finite(result["test"]) and _finite(result["valid"]) and _finite(result["baseline_test"])
    assert set(result["test"]) == {f"{m}@{k}" for m in ("MRR", "HR", "NDCG") for k in (5, 10, 20)}
    if model != "pop":
        assert result["epochs_run"] == 2 and len(result["history"]) == 2
        assert result["model_config"]["sharing"] == sharing


def test_output_resume_and_evaluate(capsys, tmp_path):
    straight = run_json(capsys, "train", *TINY, "--epochs", "3", "--output", str(tmp_path / "a"))
    run_json(capsys, "train", *TINY, "--epochs", "2", "--output", str(tmp_path / "b"))
    resumed = run_json(capsys, "train", *TINY, "--epochs", "3", "--output", str(tmp_path / "b"), "--resume")
    assert len(resumed["history"]) == 3
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for name, value in straight["test"].items():
        assert resumed["test"][name] == pytest.approx(value, abs=1e-6)
    out = tmp_path / "b"
    assert json.loads((out / "metrics.json").read_text())["test"] == resumed["test"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    evaluated = run_json(capsys, "evaluate", str(out / "checkpoint.pt"))
    for name, value in resumed["test"].items():
        assert evaluated["test"][name] == pytest.approx(value, abs=1e-6)


def test_resume_with_other_flags_is_refused(capsys, tmp_path):
    run_json(capsys, "train", *TINY, "--epochs", "1", "--output", str(tmp_path))
    code = main(["train", *TINY, "--dim", "8", "--output", str(tmp_path), "--resume"])
    assert code == 1 and "cannot resume with other settings" in capsys.readouterr().err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_planted_checkpoint_is_refused(capsys, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "config": {}, "payload": _RunsCode()}, path)
    assert main(["evaluate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "could run code" in err
    path.write_bytes(b"truncated")
    assert main(["evaluate", str(path)]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_params_default_is_4x_smaller(capsys):
    result = run_json(capsys, "params")
    table = result["params"]
    assert result["compression_ratio"] >= 4
    assert table["baseline"]["total"] == sum(table["baseline"][p] for p in ("input", "middle", "output"))
    result = run_json(capsys, "params", "--num-items", "1000", "--cutoffs", "100,400", "--dim", "32")
    assert result["model_config"]["cutoffs"] == [100, 400, 1000]


def test_bad_arguments_exit_cleanly(capsys, tmp_path):
    assert main(["train", *TINY, "--data", str(tmp_path / "missing.csv")]) == 1
    assert "no such data file" in capsys.readouterr().err
    assert main(["params", "--num-items", "100"]) == 1
    assert "--num-items needs --cutoffs" in capsys.readouterr().err
    assert main(["train", *TINY, "--cutoffs", "5000,100"]) == 1
    assert "strictly increasing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dilations", "1,x"])


def test_help_of_every_command():
    for command in ([], ["train"], ["evaluate"], ["params"], ["compare"]):
        out = subprocess.run(
            [sys.executable, "-m", "cprec", *command, "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "usage: cprec" in out
    train_help = subprocess.run([sys.executable, "-m", "cprec", "train", "--help"], capture_output=True, text=True).stdout
    for flag in ("--data", "--model", "--sharing", "--cutoffs", "--epochs", "--output", "--resume", "--json", "--backend",
                 "--objective", "--tie-embeddings"):
        assert flag in train_help


@pytest.mark.slow
def test_default_budget_beats_popularity(capsys):
    """`cprec train` with no flags: CpRec on the shipped data, the README's first command."""
    result = run_json(capsys, "train", "--quiet")
    assert result["model"] == "cprec" and _finite(result["test"])
    for metric in ("NDCG@10", "HR@10", "MRR@10"):
        assert result["test"][metric] > result["baseline_test"][metric]


# --- no silent overwrites (issue 17) -----------------------------------------------------
ONE = [*TINY, "--epochs", "1", "--limit-batches", "2"]


def _run_files(out):
    return {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.json", "train_log.jsonl")}


def test_pop_resume_over_a_trained_run_is_refused(capsys, tmp_path):
    run_json(capsys, "train", "--model", "nextitnet", *ONE, "--output", str(tmp_path))
    before = _run_files(tmp_path)
    assert main(["train", "--model", "pop", *ONE, "--output", str(tmp_path), "--resume"]) == 1
    assert "model: 'nextitnet' -> 'pop'" in capsys.readouterr().err
    assert _run_files(tmp_path) == before


def test_resume_refuses_changed_training_flags_naming_only_them(capsys, tmp_path):
    run_json(capsys, "train", *ONE, "--output", str(tmp_path))
    before = _run_files(tmp_path)
    code = main(["train", *ONE, "--lr", "0.01", "--batch-size", "16", "--objective", "last",
                 "--output", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert code == 1
    assert "lr: 0.003 -> 0.01" in err and "batch_size: 32 -> 16" in err and "objective: 'every' -> 'last'" in err
    assert "epochs" not in err and "{" not in err  # only the keys that differ, not whole configs
    assert _run_files(tmp_path) == before


def test_resume_refuses_changed_data(capsys, tmp_path):
    data = tmp_path / "sessions.csv"
    data.write_text("".join(f"{i % 7},{(i * 3) % 11},{i % 5},{(i + 2) % 13}\n" for i in range(60)) + "1,2\n")
    args = ["train", *ONE, "--data", str(data), "--max-len", "5", "--output", str(tmp_path / "run")]
    run_json(capsys, *args)
    data.write_text(data.read_text().replace("1,2\n", "1,3\n"))  # same items, other frequencies
    assert main([*args, "--resume"]) == 1
    assert "data: '" in capsys.readouterr().err


def test_resume_compares_keys_missing_from_old_checkpoints_with_their_defaults():
    from cprec.train import TrainConfig, config_changes

    recorded = TrainConfig(lr=0.5).to_dict()
    del recorded["weight_decay"]  # an option that did not exist when the run started
    assert config_changes(recorded, TrainConfig(lr=0.5, epochs=99)) == {}
    assert config_changes(recorded, TrainConfig(lr=0.5, weight_decay=0.1)) == {"weight_decay": (0.0, 0.1)}
    assert config_changes({**recorded, "gone": 1}, TrainConfig(lr=0.5)) == {"gone": (1, "(no such option)")}


def test_output_onto_a_run_needs_resume_or_overwrite(capsys, tmp_path):
    run_json(capsys, "train", *TINY, "--output", str(tmp_path))
    before = _run_files(tmp_path)
    assert main(["train", *ONE, "--output", str(tmp_path)]) == 1
    assert "holds a run" in capsys.readouterr().err and _run_files(tmp_path) == before
    fresh = run_json(capsys, "train", *ONE, "--output", str(tmp_path), "--overwrite")
    log = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == fresh["history"] and len(log) == 1
    assert main(["train", *ONE, "--output", str(tmp_path), "--overwrite", "--resume"]) == 1


def test_train_seconds_accumulate_over_resumes(capsys, tmp_path):
    from cprec.checkpoint import load_checkpoint

    run_json(capsys, "train", *ONE, "--output", str(tmp_path))
    first = load_checkpoint(tmp_path / "checkpoint.pt")["progress"]["train_seconds"]
    resumed = run_json(capsys, "train", *ONE, "--epochs", "2", "--output", str(tmp_path), "--resume")
    assert first > 0 and resumed["train_seconds"] >= first + resumed["history"][1]["seconds"] - 0.01


def test_progress_bars_only_on_a_terminal_or_when_asked(capsys):
    args = ["train", *[a for a in ONE if a != "--quiet"]]
    assert main(args) == 0  # capsys' stderr is no terminal
    err = capsys.readouterr().err
    assert "epoch 1: loss" in err and "epoch 1/1" not in err
    assert main([*args, "--progress"]) == 0
    assert "epoch 1/1" in capsys.readouterr().err


def test_params_help_names_the_output_layer_flag():
    out = subprocess.run([sys.executable, "-m", "cprec", "params", "--help"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, COLUMNS="1000")).stdout
    assert "--input-layer/--output-layer" in out


def test_tied_cprec_with_filter_trains_saves_and_evaluates(capsys, tmp_path):
    out = tmp_path / "tied"
    code = main(["train", "--model", "cprec", *TINY, "--tie-embeddings", "--tie-projections", "--min-item-count", "3",
                 "--min-user-count", "5", "--lr-schedule", "linear", "--warmup-steps", "0.5", "--output", str(out),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "after the min count filter (items >= 3, users >= 5)" in captured.err
    stats = json.loads((out / "metrics.json").read_text())["data_stats"]["filter"]
    assert stats["after"]["items"] == result["model_config"]["num_items"] < stats["before"]["items"]
    assert result["model_config"]["tie_embeddings"] and result["model_config"]["tie_projections"]
    evaluated = run_json(capsys, "evaluate", str(out / "checkpoint.pt"))
    for name, value in result["test"].items():
        assert evaluated["test"][name] == pytest.approx(value, abs=1e-6)
    assert evaluated["params"] == result["params"]
    untied = run_json(capsys, "params", "--min-item-count", "3", "--min-user-count", "5")
    tied = run_json(capsys, "params", "--min-item-count", "3", "--min-user-count", "5", "--tie-embeddings")
    assert tied["params"]["compressed"]["output"] < untied["params"]["compressed"]["output"]
    assert tied["compression_ratio"] > untied["compression_ratio"]


def test_exclude_seen_flag_reaches_every_evaluation(capsys, tmp_path):
    """--exclude-seen ranks only unseen items in validation (early stopping), test, the
    popularity baseline and `cprec evaluate` of the checkpoint; it can only lift a rank."""
    pop = run_json(capsys, "train", "--model", "pop", "--quiet", "--max-len", "20")
    pop_unseen = run_json(capsys, "train", "--model", "pop", "--quiet", "--max-len", "20", "--exclude-seen")
    assert pop_unseen["test"]["HR@10"] > pop["test"]["HR@10"]
    assert pop_unseen["baseline_test"] == pop_unseen["test"]
    out = tmp_path / "run"
    result = run_json(capsys, "train", *TINY, "--exclude-seen", "--output", str(out))
    assert result["exclude_seen"] is True and pop["exclude_seen"] is False
    evaluated = run_json(capsys, "evaluate", str(out / "checkpoint.pt"))
    for name, value in result["test"].items():
        assert evaluated["test"][name] == pytest.approx(value, abs=1e-6)
