"""torchrun/DDP training, crash-safe resume after SIGKILL, and torchrun restarts."""
import json
import signal
import subprocess
import sys
import time

import pytest

from cprec.checkpoint import load_checkpoint
from helpers import source_tree_env

TINY = ["--quiet", "--json", "--dim", "16", "--dilations", "1,2", "--max-len", "20", "--batch-size", "16"]


def _cprec(args, torchrun=None, env=None, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", *torchrun] if torchrun else [sys.executable]
    cmd = [*launcher, "-m", "cprec", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or source_tree_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _same_run(a, b, tol):
    assert list(a["test"]) == list(b["test"]) == list(a["history"][0]["valid"])  # one column order everywhere
    assert len(a["history"]) == len(b["history"])
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=tol)
    for name, value in a["test"].items():
        assert b["test"][name] == pytest.approx(value, abs=tol)


# Shared convs are used several times per forward: DDP must still reduce them once.
# Dropout is off because each rank draws masks for its half of the batch from its own
# stream, so no two-process run can draw the one-process run's masks.
@pytest.mark.parametrize("sharing,backend", [("cross-layer", "auto"), ("adjacent-block", "torch"), ("none", "auto")])
def test_two_gloo_processes_match_one(sharing, backend):
    args = [*TINY, "--epochs", "2", "--limit-batches", "8", "--sharing", sharing, "--backend", backend, "--dropout", "0"]
    single, _ = _cprec(args)
    double, _ = _cprec([*args, "--distributed"], torchrun=["--nproc_per_node", "2"])
    _same_run(single, double, 1e-4)


def test_sigkill_mid_epoch_then_resume_matches_unbroken_run(tmp_path):
    args = [*TINY, "--epochs", "2", "--limit-batches", "60", "--checkpoint-every", "7"]
    unbroken, _ = _cprec([*args, "--output", str(tmp_path / "a")])
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "cprec", "train", *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=source_tree_env())
    ckpt, killed_at = out / "checkpoint.pt", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            progress = load_checkpoint(ckpt)["progress"]
            if progress["step"] > 0:  # a mid-epoch checkpoint: kill the run now
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = progress
                break
        time.sleep(0.02)
    assert killed_at is not None, "the run finished before a mid-epoch checkpoint could be caught"
    assert proc.returncode == -signal.SIGKILL
    resumed, err = _cprec([*args, "--output", str(out), "--resume"])
    assert "resumed from" in err
    _same_run(unbroken, resumed, 1e-6)


def test_torchrun_restarts_a_dead_worker_which_resumes(tmp_path):
    args = [*TINY, "--epochs", "2", "--limit-batches", "30", "--checkpoint-every", "10", "--distributed"]
    unbroken, _ = _cprec([*args, "--output", str(tmp_path / "a")], torchrun=["--nproc_per_node", "1"])
    # The worker kills itself at step 25 on its first attempt; torchrun starts it again
    # and --resume picks up the step-20 checkpoint.
    restarted, err = _cprec(
        [*args, "--output", str(tmp_path / "b"), "--resume"],
        torchrun=["--nproc_per_node", "1", "--max-restarts", "1"],
        env=source_tree_env(CPREC_FAIL_AT_STEP="25"),
    )
    assert "resumed from" in err and "step 20" in err
    _same_run(unbroken, restarted, 1e-6)
