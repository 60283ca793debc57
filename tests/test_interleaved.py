"""bench/interleaved.py: the rotation, the per-round ratios and their bootstrap
interval, argument errors, and a tiny run of both op groups on the cpu backend."""
import importlib.util
import os
import statistics
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def interleaved():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("interleaved", os.path.join(ROOT, "bench", "interleaved.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def test_rotation_puts_each_impl_at_each_position(interleaved):
    names = ["cpu", "eager", "compile"]
    orders = [interleaved.rotated(names, r) for r in range(6)]
    assert all(sorted(o) == sorted(names) for o in orders)
    for position in range(3):
        firsts = [o[position] for o in orders]
        assert all(firsts.count(n) == 2 for n in names)


def test_ratios_pair_calls_of_the_same_round(interleaved):
    # eager is exactly 1.5x cpu in every round while both drift 4x over the run:
    # the paired ratio sees 1.5x, a ratio of medians of unpaired halves would not.
    cpu = [0.010 * (1 + 3 * r / 9) for r in range(10)]
    times = {"cpu": cpu, "eager": [1.5 * t for t in cpu]}
    rows = {row["impl"]: row for row in interleaved.summarize(times)}
    assert rows["eager"]["ratio"] == pytest.approx(1.5)
    assert rows["eager"]["ratio_low"] == pytest.approx(1.5) and rows["eager"]["ratio_high"] == pytest.approx(1.5)
    assert rows["cpu"]["median_ms"] == pytest.approx(statistics.median(cpu) * 1e3)
    assert "ratio" not in rows["cpu"]
    assert "1.50x [1.50, 1.50]" in interleaved.markdown(list(rows.values()))


def test_bootstrap_interval_holds_the_median_and_is_seeded(interleaved):
    values = [1.0, 1.2, 1.4, 1.5, 1.6, 1.7, 2.5, 1.45, 1.55, 1.3, 1.8]
    median, low, high = interleaved.median_interval(values)
    assert median == statistics.median(values)
    assert min(values) <= low <= median <= high <= max(values) and low < high
    assert interleaved.median_interval(values) == (median, low, high)
    with pytest.raises(ValueError, match="no values"):
        interleaved.median_interval([])


def test_time_rounds_calls_each_step_warmup_plus_rounds_times(interleaved):
    calls = {"cpu": 0, "eager": 0}

    def step(name):
        def run():
            calls[name] += 1
        return run

    times = interleaved.time_rounds({n: step(n) for n in calls}, rounds=4, warmup=2)
    assert calls == {"cpu": 6, "eager": 6}
    assert all(len(t) == 4 and all(s >= 0 for s in t) for t in times.values())
    with pytest.raises(ValueError, match="rounds"):
        interleaved.time_rounds({"cpu": step("cpu")}, rounds=0)


@pytest.mark.parametrize("argv, message", [
    (["conv", "--impls", "eager"], "include it"),
    (["conv", "--impls", "cpu", "triton"], "unknown impl"),
    (["loss", "--vocab", "100", "--cutoffs", "50", "20"], "increase"),
    (["loss", "--vocab", "100", "--cutoffs", "20", "100"], "below --vocab"),
    (["loss", "--vocab", "100", "--cutoffs", "20", "20"], "increase strictly"),
    (["loss", "--vocab", "100", "--cutoffs", "0", "20"], ">= 1"),
    (["conv", "--impls", "cpu", "cpu"], "twice"),
])
def test_bad_arguments_are_refused(interleaved, argv, message):
    with pytest.raises(SystemExit, match=message):
        interleaved.main(argv + ["--rounds", "1", "--warmup", "0"])


def test_bad_counts_are_refused(interleaved, capsys):
    with pytest.raises(SystemExit):
        interleaved.main(["conv", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["conv", "--batch", "2", "--t", "9", "--c", "8"],
    ["loss", "--n", "64", "--d", "16", "--vocab", "50", "--cutoffs", "10", "30", "--impls", "cpu", "eager", "gemm-floor"],
])
def test_tiny_run_prints_a_table(interleaved, capsys, argv):
    pytest.importorskip("cprec_kernels._core.cpu_extension", reason="the C++ extension is not built")
    if "--impls" not in argv:
        argv = argv + ["--impls", "cpu", "eager"]
    threads = torch.get_num_threads()
    try:
        rows = interleaved.main(argv + ["--rounds", "3", "--warmup", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's count: leave the suite's as it was
    assert [r["impl"] for r in rows][0] == "cpu" and all(r["rounds"] == 3 and r["median_ms"] > 0 for r in rows)
    assert all(r["ratio_low"] <= r["ratio"] <= r["ratio_high"] for r in rows[1:])
    out = capsys.readouterr().out
    assert "| cpu |" in out and "| eager |" in out
