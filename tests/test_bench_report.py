"""bench/make_report.py on a tiny synthetic pytest-benchmark JSON: rows, ratios,
headline, markdown, skip parsing and the plots (no benchmark is run)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def make_report():
    spec = importlib.util.spec_from_file_location("make_report", os.path.join(ROOT, "bench", "make_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(mode, impl, vocab, batch, median, peak=None):
    model, _, backend = impl.partition("_")
    info = dict(mode=mode, model=model, backend=backend, impl=impl, device="cpu", dtype="float32", threads=1,
                vocab=vocab, d=8, blocks=2, dilations=[1, 2], seq_len=5, batch=batch,
                cutoffs=[vocab // 10, vocab] if model == "cprec" else None, div=4.0 if model == "cprec" else None,
                params=1000, state_bytes=4000, tokens_per_call=batch * 5, peak_memory_bytes=peak)
    return {
        "name": f"test_{mode}[{vocab}-{impl}-{batch}]",
        "params": {"vocab": vocab, "impl": impl},
        "extra_info": info,
        "stats": {"median": median, "iqr": median / 10, "mean": median, "rounds": 3},
    }


@pytest.fixture
def results(tmp_path):
    benches = [
        _bench("train_step", "nextitnet_eager", 100_000, 4, 0.40, peak=8 * 2**20),
        _bench("train_step", "cprec_eager", 100_000, 4, 0.20, peak=2**20),
        _bench("train_step", "cprec_cpu", 100_000, 4, 0.10, peak=2**20),
        _bench("train_step", "cprec_cpu", 1_000_000, 4, 1.0),  # no baseline at this V
        _bench("serve_top10", "nextitnet_eager", 100_000, 1, 0.030),
        _bench("serve_top10", "cprec_cpu", 100_000, 1, 0.010),
        _bench("serve_top10", "cprec_compile", 100_000, 1, 0.020),
        _bench("serve_top10", "cprec_cpu", 1000, 1, 0.001),
    ]
    # an op-suite row (no "mode"): ignored by the model report
    benches.append({"name": "test_op", "params": {}, "extra_info": {"op": "conv"}, "stats": {"median": 1.0}})
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    return str(path)


def test_rows_and_ratios(make_report, results):
    rows = make_report.add_ratios(make_report.load_rows([results]))
    assert len(rows) == 8
    by = {(r["mode"], r["impl"], r["vocab"]): r for r in rows}
    assert by[("train_step", "cprec_cpu", 100_000)]["vs_nextitnet"] == pytest.approx(4.0)
    assert by[("train_step", "cprec_cpu", 100_000)]["vs_cprec_eager"] == pytest.approx(2.0)
    assert by[("train_step", "cprec_cpu", 1_000_000)]["vs_nextitnet"] is None
    assert by[("serve_top10", "cprec_compile", 100_000)]["vs_nextitnet"] == pytest.approx(1.5)


def test_headline_picks_the_fastest_fused_backend_at_100k(make_report, results):
    rows = make_report.load_rows([results])
    heads = make_report.headline(rows)
    assert [(h["mode"], h["impl"], h["batch"]) for h in heads] == [
        ("train_step", "cprec_cpu", 4), ("serve_top10", "cprec_cpu", 1)]
    assert heads[0]["ratio"] == pytest.approx(4.0)
    assert heads[1]["ratio"] == pytest.approx(3.0)
    assert heads[1]["vs_cprec_eager"] is None  # no CpRec eager serving row
    lines = make_report.headline_lines(rows)
    assert "**4.00x**" in lines[0] and "V = 100k" in lines[0]


def test_render_tables_and_skips(make_report, results):
    rows = make_report.load_rows([results])
    output = ("SKIPPED [2] bench/bench_models.py:91: backend 'triton' cannot run CpRec on cpu: no CUDA\n"
              "3 passed, 2 skipped\n")
    skips = make_report.parse_skips(output)
    assert skips == ["2 rows: backend 'triton' cannot run CpRec on cpu: no CUDA"]
    env = dict(date="2026-01-01 00:00 UTC", device="CPU: test", torch="2.x", triton=None, commit="abc1234",
               command="python bench/make_report.py", wall_s=12.0, load="1.00 / 2.00")
    text = make_report.render(rows, env, skips, notes=["shared machine"])
    assert "| torch / triton | 2.x / not installed |" in text
    assert "| commit | abc1234 |" in text
    assert "shared machine" in text and "## Rows not measured" in text
    # one table line per row, baseline ratios filled in, missing ones as "-"
    assert "| cpu | 100k | 4 | cprec_cpu | 100.0 | 10.0 | 3 | 4.00x | 2.00x | 200.0 | 1.0 | 0.0 |" in text
    assert "| cpu | 1M | 4 | cprec_cpu | 1000.0 | 100.0 | 3 | - | - | 20.0 | - | 0.0 |" in text
    assert text.count("| cpu |") == 8


def test_plots_are_written(make_report, results, tmp_path):
    pytest.importorskip("matplotlib")
    rows = make_report.load_rows([results])
    make_report.plot_speedup(rows, str(tmp_path / "speedup.png"))
    make_report.plot_memory(rows, str(tmp_path / "memory.png"))
    for name in ("speedup.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_main_renders_from_json(make_report, results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert make_report.main(["--from-json", results, "--out-dir", str(out), "--note", "a note"]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "a note" in text and "GPU rows: unmeasured" in text
    assert (out / "speedup_vs_vocab.png").exists() and (out / "memory_vs_vocab.png").exists()
    # The hand-recorded op section survives a rerun; the generated part is rewritten.
    (out / "RESULTS.md").write_text(text.replace("a note", "old note") + "\n## Op benchmarks on the cpu backend\nkept\n")
    assert make_report.main(["--from-json", results, "--out-dir", str(out), "--note", "new note"]) == 0
    again = (out / "RESULTS.md").read_text()
    assert "new note" in again and "old note" not in again and again.endswith("## Op benchmarks on the cpu backend\nkept\n")


def test_shown_command_elides_notes(make_report):
    shown = make_report.shown_command(["--note", "a long paragraph", "--threads", "1", "--note=x"])
    assert shown == 'python bench/make_report.py --note "..." --threads 1 --note="..."'


def test_from_json_reuses_the_run_metadata(make_report, results, tmp_path):
    pytest.importorskip("matplotlib")
    env = dict(date="2026-01-02 03:04 UTC", device="CPU: test", torch="2.x", triton=None, commit="abc1234",
               command="python bench/make_report.py", wall_s=99.0, load="1.00 / 2.00")
    make_report.write_meta(results, env, ["1 row: too big"])
    out = tmp_path / "out"
    assert make_report.main(["--from-json", results, "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "on 2026-01-02 03:04 UTC (rendered again by" in text
    assert "| wall time of the run | 99 s |" in text and "- 1 row: too big" in text
