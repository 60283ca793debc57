"""Dropout in the CNN models and the learning-rate warm-up/decay schedule."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cprec.checkpoint import load_checkpoint, save_checkpoint
from cprec.cli import main
from cprec.models import ResidualStack, build_model
from cprec.schedule import lr_factor, make_scheduler, warmup_length
from cprec_kernels.testing import conv_ln_relu_by_modules
from helpers import source_tree_env

TINY = ["--quiet", "--dim", "16", "--dilations", "1,2", "--max-len", "20", "--limit-batches", "3"]


def _stack_reference(stack, x, masks):
    """x * m0, then h + m_b * branch_b(h) per block, the branches by F.conv1d modules."""
    h = x * masks[0]
    for block, mask in zip(stack.blocks, masks[1:]):
        c1, c2 = block.conv1, block.conv2
        a = conv_ln_relu_by_modules(h, c1.weight, c1.bias, block.ln1.weight, block.ln1.bias, block.dilation, block.eps)
        b = conv_ln_relu_by_modules(a, c2.weight, c2.bias, block.ln2.weight, block.ln2.bias, 2 * block.dilation, block.eps)
        h = h + mask * b
    return h


@pytest.mark.parametrize("sharing", ["none", "cross-block"])
def test_stack_dropout_is_on_the_input_and_each_branch(sharing):
    p, B, T, d = 0.3, 3, 11, 6
    stack = ResidualStack(d, [1, 2, 1], sharing, backend="torch", dropout=p).double()
    x = torch.randn(B, T, d, dtype=torch.float64)[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    torch.manual_seed(7)
    got = stack(x)
    # The same draws, in the stack's order: [B, T, d] masks for the input (laid out
    # like it: dropout draws in memory order) and each block's branch.
    torch.manual_seed(7)
    masks = [F.dropout(torch.ones_like(x), p)]
    masks += [F.dropout(torch.ones(B, T, d, dtype=torch.float64), p) for _ in stack.blocks]
    torch.testing.assert_close(got, _stack_reference(stack, x, masks))
    assert any((m == 0).any() for m in masks)
    stack.eval()
    torch.testing.assert_close(stack(x), _stack_reference(stack, x, [torch.ones(B, T, d, dtype=torch.float64)] * 4))


def test_dropout_is_off_at_evaluation_and_cnn_default_is_none():
    cfg = dict(model="cprec", num_items=30, d=8, block_dilations=[1, 2], kernel_size=3, sharing="none",
               cutoffs=[10, 30], div_value=2.0, backend="torch")
    plain, dropped = build_model(cfg), build_model({**cfg, "dropout": 0.5})
    assert plain.middle.drop.p == 0.0 and dropped.middle.drop.p == 0.5
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 30, (4, 7))
    plain.eval(), dropped.eval()
    torch.testing.assert_close(plain.scores(x), dropped.scores(x))
    dropped.train()
    assert not torch.allclose(dropped.hidden(x), plain.hidden(x))


def test_cli_dropout_defaults_by_model(capsys):
    for model, flags, expected in (("nextitnet", [], 0.2), ("cprec", [], 0.2), ("cprec", ["--dropout", "0.1"], 0.1),
                                   ("nextitnet", ["--dropout", "0"], 0.0), ("sasrec", [], 0.2)):
        assert main(["train", "--model", model, *TINY, "--epochs", "1", *flags, "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["model_config"]["dropout"] == expected


def test_run_recorded_without_a_dropout_rate_resumes_with_the_rate_it_trained_with(capsys, tmp_path):
    """Runs from before the CNN default became 0.2 recorded no rate (None) and a model
    config without dropout: they resume with --dropout 0, and without it the error names
    the change from what they trained with."""
    out = tmp_path / "run"
    args = ["train", "--model", "nextitnet", *TINY, "--epochs", "1", "--output", str(out)]
    assert main([*args, "--dropout", "0"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["config"]["dropout"] = None
    del ckpt["model_config"]["dropout"]
    save_checkpoint(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume"]) == 1
    assert "dropout: 0.0 -> 0.2" in capsys.readouterr().err
    assert main([*args, "--epochs", "2", "--resume", "--dropout", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model_config"]["dropout"] == 0.0 and result["epochs_run"] == 2


def test_lr_factor_shapes():
    assert [lr_factor(s, "constant", 0, 10) for s in range(10)] == [1.0] * 10
    assert [lr_factor(s, "constant", 4, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(2, "linear", 2, 10) == 1.0 and lr_factor(6, "linear", 2, 10) == 0.5
    assert lr_factor(10, "linear", 2, 10) == 0.0 and lr_factor(99, "linear", 2, 10) == 0.0
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5) and lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0)
    assert warmup_length(0.25, 40) == 10 and warmup_length(7, 40) == 7 and warmup_length(0, 40) == 0


@pytest.mark.parametrize("kind,warmup", [("step", 0), ("linear", -1), ("linear", 2.5)])
def test_bad_schedules_are_refused(kind, warmup):
    with pytest.raises(ValueError):
        make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), kind, warmup, 10)


def test_scheduler_sets_the_lr_per_step():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = make_scheduler(opt, "linear", 0.2, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, "linear", 2, 10) for s in range(10)])


def test_schedule_resumes_mid_epoch_from_the_checkpoint(tmp_path):
    """Killed at step 4 (checkpointed every step), the resumed run matches an unbroken one."""
    args = ["train", "--model", "cprec", *TINY, "--epochs", "3", "--lr-schedule", "cosine", "--warmup-steps", "2",
            "--dropout", "0.1", "--checkpoint-every", "1", "--json"]
    unbroken = subprocess.run([sys.executable, "-m", "cprec", *args, "--output", str(tmp_path / "a")],
                              capture_output=True, text=True, env=source_tree_env())
    assert unbroken.returncode == 0, unbroken.stderr
    killed = subprocess.run([sys.executable, "-m", "cprec", *args, "--output", str(tmp_path / "b"), "--resume"],
                            capture_output=True, text=True, env=source_tree_env(CPREC_FAIL_AT_STEP="4"))
    assert killed.returncode != 0
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ckpt["scheduler"]["last_epoch"] == 4
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * lr_factor(4, "cosine", 2, 9))
    resumed = subprocess.run([sys.executable, "-m", "cprec", *args, "--output", str(tmp_path / "b"), "--resume"],
                             capture_output=True, text=True, env=source_tree_env())
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (unbroken, resumed))
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert all(math.isclose(a["test"][k], b["test"][k], abs_tol=1e-6) for k in a["test"])
