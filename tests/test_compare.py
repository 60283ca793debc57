"""cprec compare: spec checks, resumable runs, the markdown/CSV tables and the plot."""
import csv
import json

import pytest

from cprec.cli import main
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
    assert main(["compare", str(path), "--output", str(tmp_path / "o"), "--report-only"]) == 0
    assert "| NextItNet | not run |" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.parametrize("over,message", [
    ({"runs": []}, "non-empty list"),
    ({"runs": [{"name": "a", "dim": 8}]}, "not training options"),
    ({"runs": [{"model": "nextitnet"}]}, "needs a 'name'"),
    ({"runs": [{"name": "a b"}, {"name": "A-B"}]}, "two runs are named"),
    ({"baseline": "nobody", "runs": [{"name": "a"}]}, "baseline 'nobody'"),
    ({"seeds": "0"}, "'seeds' must be"),
    ({"colour": 1}, "unknown keys"),
])
def test_bad_specs_name_the_problem(tmp_path, over, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, **over))


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
