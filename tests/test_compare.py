"""cprec compare: spec checks, resumable runs, the markdown/CSV tables and the plot."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cprec.cli import main
from helpers import source_tree_env
from cprec.compare import SpecError, load_spec

SMALL = {"epochs": 1, "limit_batches": 2, "d": 8, "block_dilations": [1, 2], "max_len": 10}


def _spec(tmp_path, **over):
    spec = {"name": "tiny", "seeds": [0, 1], "baseline": "NextItNet", "common": SMALL,
            "runs": [{"name": "NextItNet", "model": "nextitnet"},
                     {"name": "CpRec cross-layer", "model": "cprec", "sharing": "cross-layer", "d": 16}]}
    spec.update(over)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_compare_writes_tables_and_skips_finished_runs(tmp_path, capsys):
    path = _spec(tmp_path)
    assert main(["compare", str(path), "--output", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["NextItNet"]["seeds"] == 2 and rows["CpRec cross-layer"]["seeds"] == 2
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert "| NextItNet | nextitnet | none | full/full |" in table and "cprec compare" in table
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    cp = next(r for r in lines if r["run"] == "CpRec cross-layer")
    nx = next(r for r in lines if r["run"] == "NextItNet")
    assert float(cp["compression_ratio"]) == pytest.approx(int(nx["params_total"]) / int(cp["params_total"]), rel=1e-3)
    assert cp["sharing"] == "cross-layer" and cp["seeds"] == "2"
    ndcg = [json.loads((out / "runs" / "nextitnet" / f"seed{s}" / "metrics.json").read_text())["test"]["NDCG@10"]
            for s in (0, 1)]
    assert float(nx["NDCG@10_mean"]) == pytest.approx(sum(ndcg) / 2, abs=1e-6)
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the plot is optional: the tables say how to get it
        assert "no plot: matplotlib is not installed" in table
    else:
        assert (out / "ndcg_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    # A second call trains nothing new: every (run, seed) has its metrics.json.
    stamp = (out / "runs" / "nextitnet" / "seed0" / "metrics.json").stat().st_mtime_ns
    assert main(["compare", str(path), "--output", str(out)]) == 0
    assert "0 of 4 runs to train" in capsys.readouterr().err
    assert (out / "runs" / "nextitnet" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp


def test_report_only_marks_runs_not_run(tmp_path, capsys):
    path = _spec(tmp_path)
    assert main(["compare", str(path), "--output", str(tmp_path / "o"), "--report-only", "--workers", "2"]) == 0
    table = (tmp_path / "o" / "results.md").read_text()
    assert "| NextItNet | not run |" in table
    # The header names the command that trains the runs, not only the one that tabled them.
    assert f"the runs that `cprec compare {path} --output {tmp_path / 'o'} --workers 2` trains" in table


@pytest.mark.parametrize("over,message", [
    ({"runs": []}, "non-empty list"),
    ({"runs": [{"name": "a", "dim": 8}]}, "not training options"),
    ({"runs": [{"model": "nextitnet"}]}, "needs a 'name'"),
    ({"runs": [{"name": "a b"}, {"name": "A-B"}]}, "two runs are named"),
    ({"baseline": "nobody", "runs": [{"name": "a"}]}, "baseline 'nobody'"),
    ({"seeds": "0"}, "'seeds' must be"),
    ({"colour": 1}, "unknown keys"),
    ({"runs": [{"name": "a", "seeds": [2]}]}, "list of the spec's seeds"),
    ({"runs": [{"name": "a", "seeds": []}]}, "list of the spec's seeds"),
    ({"runs": [{"name": "a", "seeds": [0, 0]}]}, "list of the spec's seeds"),
    ({"seeds": [1, 1]}, "distinct ints"),
    ({"common": {"seeds": [0]}}, "not training options"),
])
def test_bad_specs_name_the_problem(tmp_path, over, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, **over))


def test_a_run_with_its_own_seeds_trains_only_those_and_started_runs_go_first(tmp_path, capsys):
    from cprec.compare import tasks

    path = _spec(tmp_path, seeds=[0, 1, 2], runs=[{"name": "NextItNet", "model": "nextitnet"},
                                                   {"name": "ablation", "model": "nextitnet", "seeds": [1]}])
    spec, out = load_spec(path), tmp_path / "out"
    order = lambda: [Path(c.output).relative_to(out / "runs").as_posix() for c in tasks(spec, out)]  # noqa: E731
    assert order() == ["nextitnet/seed0", "nextitnet/seed1", "ablation/seed1", "nextitnet/seed2"]
    assert all(c.seed == int(c.output[-1]) for c in tasks(spec, out))
    # A run with a checkpoint (cut short last time) resumes before any run that has not started;
    # a finished one (metrics.json) is not trained again.
    for name, run_file in (("ablation/seed1", "checkpoint.pt"), ("nextitnet/seed2", "checkpoint.pt"),
                           ("nextitnet/seed0", "metrics.json")):
        (out / "runs" / name).mkdir(parents=True)
        (out / "runs" / name / run_file).write_bytes(b"")
    assert order() == ["ablation/seed1", "nextitnet/seed2", "nextitnet/seed1"]
    assert main(["compare", str(path), "--output", str(tmp_path / "report"), "--report-only"]) == 0
    assert "seeds [0, 1, 2] (only seeds [1]: 'ablation');" in (tmp_path / "report" / "results.md").read_text()


def test_malformed_spec_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text('{"runs": [\n  {"name": "a",}\n]}')
    assert main(["compare", str(path)]) == 1
    assert f"{path}:2" in capsys.readouterr().err


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, capsys):
    path = _spec(tmp_path, seeds=[0], runs=[{"name": "bad", "model": "cprec", "cutoffs": [99999]},
                                            {"name": "NextItNet", "model": "nextitnet"}])
    assert main(["compare", str(path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and "bad/seed0: FAILED" in err
    assert (tmp_path / "o" / "runs" / "nextitnet" / "seed0" / "metrics.json").is_file()


def _children(pid: int) -> list:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_to_compare_stops_its_workers(tmp_path):
    # Killed outright, a pool parent leaves its workers training; a rerun would then train
    # the same run directories twice at once.
    path = _spec(tmp_path, common={**SMALL, "epochs": 1000, "limit_batches": 1, "patience": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "cprec", "compare", str(path), "--workers", "2",
                             "--output", str(tmp_path / "o")], env=source_tree_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "o" / "runs").glob("*/seed*/checkpoint.pt")):
            assert proc.poll() is None, "compare ended before its workers trained an epoch"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "expected the pool's worker processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_new_training_options_pass_through_to_the_runs(tmp_path):
    from cprec.compare import run_config

    extra = {"tie_embeddings": True, "tie_projections": True, "dropout": 0.1, "lr_schedule": "cosine",
             "warmup_steps": 0.1, "min_item_count": 5, "min_user_count": 2}
    path = _spec(tmp_path, baseline=None, runs=[{"name": "CpRec tied", "model": "cprec", **extra}])
    spec = load_spec(path)
    cfg = run_config(spec, spec["runs"][0], 0, tmp_path / "out")
    assert all(getattr(cfg, k) == v for k, v in extra.items())


@pytest.mark.parametrize("name", ["ml-1m-converged", "ml-100k"])
def test_committed_specs_load(name):
    from cprec.compare import run_config

    path = Path(__file__).resolve().parent.parent / "docs" / "results" / name / "spec.json"
    spec = load_spec(path)
    for run in spec["runs"]:
        run_config(spec, run, spec["seeds"][0], path.parent)
