"""``cprec compare``: train a list of model configs on one dataset with several seeds
and tabulate parameters against accuracy (markdown, CSV and a PNG plot).

A study is a JSON spec::

    {"name": "ml-1m", "data": "../shared/data/ml-1m/ml-1m.inter.gz",
     "split": "leave-one-out", "seeds": [0, 1, 2], "baseline": "NextItNet d=256",
     "metric_k": 10, "common": {"epochs": 3},
     "runs": [{"name": "NextItNet d=256", "model": "nextitnet", "d": 256}, ...]}

Every key of ``common`` and of a run (except ``name`` and ``seeds``) is a ``TrainConfig``
field. A run's own ``seeds``, a subset of the spec's, replace them for that run: an ablation
row can cost one seed where the main rows take three.
Each (run, seed) trains into ``OUT/runs/<run>/seed<k>/`` with a checkpoint per epoch,
so an interrupted study picks up where it stopped; finished runs (``metrics.json``)
are never redone. Runs already started go first, then the rest seed by seed, so a study
cut short has whole seeds and no run left half-trained for longer than it must.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .checkpoint import write_text_atomic
from .metrics import metric_names
from .train import TrainConfig

METRICS = tuple(metric_names())
_SPEC_KEYS = {"name", "data", "format", "split", "seeds", "baseline", "metric_k", "common", "runs", "notes"}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"output", "resume", "seed", "progress",
                                                                       "distributed", "overwrite", "progress_bars"}
_RUN_KEYS = {"name", "seeds"}  # the keys of a run that are not training options


class SpecError(ValueError):
    """A study spec that cannot be run (the message names the file and the key)."""


def slug(name: str) -> str:
    """A directory name for a run name: "CpRec d=128, cross-block" -> "cprec-d-128-cross-block"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def _is_seed_list(value) -> bool:
    """A non-empty list of distinct ints: a repeated seed would train or count one run twice."""
    return (isinstance(value, list) and bool(value) and all(isinstance(s, int) for s in value)
            and len(set(value)) == len(value))


def load_spec(path) -> dict:
    """Read and check a study spec; unknown keys and TrainConfig fields are errors."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: the spec must be a JSON object")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SpecError(f"{path}: 'runs' must be a non-empty list of configs")
    seeds = spec.setdefault("seeds", [0])
    if not _is_seed_list(seeds):
        raise SpecError(f"{path}: 'seeds' must be a non-empty list of distinct ints, got {seeds!r}")
    names = set()
    for i, run in enumerate([spec.get("common", {})] + runs):
        where = "'common'" if i == 0 else f"run {i}"
        if not isinstance(run, dict):
            raise SpecError(f"{path}: {where} must be an object")
        bad = set(run) - _CONFIG_FIELDS - (_RUN_KEYS if i else set())
        if bad:
            raise SpecError(f"{path}: {where} has keys {sorted(bad)} that are not training options")
        if i:
            own = run.get("seeds", seeds)
            if not _is_seed_list(own) or not set(own) <= set(seeds):
                raise SpecError(f"{path}: {where}'s 'seeds' must be a non-empty list of the spec's seeds "
                                f"{seeds}, got {own!r}")
            if not isinstance(run.get("name"), str) or not run["name"]:
                raise SpecError(f"{path}: {where} needs a 'name'")
            if slug(run["name"]) in names:
                raise SpecError(f"{path}: two runs are named like {run['name']!r}")
            names.add(slug(run["name"]))
    if spec.get("baseline") is not None and slug(spec["baseline"]) not in names:
        raise SpecError(f"{path}: baseline {spec['baseline']!r} is not the name of a run")
    spec.setdefault("name", path.parent.name)
    spec.setdefault("metric_k", 10)
    return spec


def run_config(spec: dict, run: dict, seed: int, out_dir: Path) -> TrainConfig:
    """The TrainConfig of one (run, seed): spec data and split, then common, then the run."""
    fields = {"data": spec.get("data"), "format": spec.get("format", "auto"),
              "split": spec.get("split", "leave-one-out")}
    fields.update(spec.get("common", {}))
    fields.update({k: v for k, v in run.items() if k not in _RUN_KEYS})
    fields.update(seed=seed, output=str(run_dir(out_dir, run["name"], seed)), resume=True, progress=False)
    return TrainConfig(**fields)


def run_dir(out_dir: Path, name: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / slug(name) / f"seed{seed}"


def run_seeds(spec: dict, run: dict) -> List[int]:
    """The seeds one run trains: its own list where it has one, else the spec's."""
    return run.get("seeds", spec["seeds"])


def tasks(spec: dict, out_dir: Path) -> List[TrainConfig]:
    """The (run, seed) configs still to train: those with a checkpoint first, then seed by seed."""
    todo = []
    for seed in spec["seeds"]:
        for run in spec["runs"]:
            held = run_dir(out_dir, run["name"], seed)
            if seed in run_seeds(spec, run) and not (held / "metrics.json").is_file():
                todo.append((not (held / "checkpoint.pt").is_file(), run_config(spec, run, seed, out_dir)))
    return [cfg for _, cfg in sorted(todo, key=lambda t: t[0])]  # stable: seed order within each group


def _train_one(args):
    """-> (ok, message). A failed run is reported, not raised, so the others go on."""
    cfg, threads = args
    import torch

    from .train import train

    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        train(cfg, say=lambda msg: None)
    except Exception as err:  # noqa: BLE001 - reported with the run's name by the caller
        return False, f"{cfg.output}: FAILED ({type(err).__name__}: {err})"
    return True, f"{cfg.output}: done in {time.perf_counter() - started:.0f} s"


def run_study(spec: dict, out_dir: Path, workers: int = 1, threads: Optional[int] = None, say=print) -> List[str]:
    """Train every missing (run, seed), ``workers`` at a time in separate processes.
    -> the messages of the runs that failed."""
    todo = tasks(spec, out_dir)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    total = sum(len(run_seeds(spec, run)) for run in spec["runs"])
    say(f"{len(todo)} of {total} runs to train, {workers} at a time, "
        f"{threads} thread(s) each")
    jobs = [(c, threads) for c in todo]
    if workers == 1 or len(todo) <= 1:
        results = map(_train_one, jobs)
        return _report_progress(results, len(todo), say)
    # spawn: a fresh interpreter per worker (no forked OpenMP pools); one task per child
    # so memory goes back between runs.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=1) as pool, _sigterm_raises():
        return _report_progress(pool.imap_unordered(_train_one, jobs), len(todo), say)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises SystemExit while the pool runs, so ``with Pool`` terminates the workers:
    killed outright, the parent would leave them training on, and a rerun would then train
    the same run directory twice at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_progress(results, total: int, say) -> List[str]:
    failed = []
    for i, (ok, line) in enumerate(results, 1):
        say(f"[{i}/{total}] {line}")
        if not ok:
            failed.append(line)
    return failed


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]):
    """(mean, sample std) over seeds; std 0 for one seed, NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(spec: dict, out_dir: Path) -> List[dict]:
    """One row per run: its config, parameters, metric means/stds over finished seeds."""
    rows = []
    for run in spec["runs"]:
        results = []
        for seed in run_seeds(spec, run):
            path = run_dir(out_dir, run["name"], seed) / "metrics.json"
            if path.is_file():
                results.append(json.loads(path.read_text(encoding="utf-8")))
        row = {"name": run["name"], "seeds": len(results)}
        if results:
            mcfg = results[0]["model_config"]
            row.update(
                model=mcfg["model"], d=mcfg["d"], input=mcfg.get("input"), output=mcfg.get("output"),
                sharing=mcfg.get("sharing"), cutoffs=mcfg.get("cutoffs"), div=mcfg.get("div_value"),
                objective=results[0].get("objective", "every"), tied=bool(mcfg.get("tie_embeddings")),
                params=results[0]["params"],
            )
            for name in METRICS:
                row[name] = _mean_std([r["test"][name] for r in results])
            # Wall seconds: a median, so that epochs stopped (SIGSTOP while a benchmark runs) or
            # resumed across sessions do not count as slow ones.
            epoch_seconds = [h["seconds"] for r in results for h in r["history"]]
            row["epoch_seconds"] = statistics.median(epoch_seconds) if epoch_seconds else math.nan
            row["epochs"] = _mean_std([r["epochs_run"] for r in results])[0]
            row["pop"] = results[0]["baseline_test"]
        rows.append(row)
    base = next((r for r in rows if spec.get("baseline") and r["name"] == spec["baseline"] and r["seeds"]), None)
    for row in rows:
        row["ratio"] = base["params"]["total"] / row["params"]["total"] if base and row["seeds"] else math.nan
    return rows


def _ends(row: dict) -> str:
    ends = f"{row['input']}/{row['output']}"
    if row["tied"]:
        ends += " tied"
    if row["input"] == "blockwise" or row["output"] == "adaptive":
        ends += f", cutoffs {row['cutoffs']}, div {row['div']:g}"
    return ends


def _columns(spec: dict) -> List[str]:
    k = spec["metric_k"]
    order = [f"{m}@{k}" for m in ("NDCG", "HR", "MRR")]
    return order + [m for m in METRICS if m not in order]


def markdown_table(spec: dict, rows: List[dict]) -> str:
    metrics = _columns(spec)
    head = ["run", "model", "sharing", "ends (input/output)", "objective", "params input / middle / output",
            "params total", "compression", *metrics, "s / epoch", "epochs", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["seeds"]:
            lines.append(f"| {r['name']} | " + " | ".join(["not run"] + [""] * (len(head) - 2)) + " |")
            continue
        p = r["params"]
        cells = [
            r["name"], r["model"], r["sharing"] or "", _ends(r), r["objective"],
            f"{p['input']:,} / {p['middle']:,} / {p['output']:,}", f"{p['total']:,}",
            "" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}x",
            *[f"{r[m][0]:.4f} ± {r[m][1]:.4f}" for m in metrics],
            f"{r['epoch_seconds']:.0f}", f"{r['epochs']:.3g}", str(r["seeds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(spec: dict, rows: List[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "model", "d", "sharing", "input", "output", "tied", "cutoffs", "div", "objective",
                     "params_input", "params_middle", "params_output", "params_total", "compression_ratio",
                     *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")], "seconds_per_epoch", "epochs",
                     "seeds"])
    for r in rows:
        if not r["seeds"]:
            writer.writerow([r["name"]] + [""] * 14 + [""] * (2 * len(METRICS)) + ["", "", 0])
            continue
        p = r["params"]
        writer.writerow([
            r["name"], r["model"], r["d"], r["sharing"], r["input"], r["output"], r["tied"],
            " ".join(map(str, r["cutoffs"] or [])), r["div"], r["objective"], p["input"], p["middle"],
            p["output"], p["total"], "" if math.isnan(r["ratio"]) else f"{r['ratio']:.4f}",
            *[f"{v:.6f}" for m in METRICS for v in r[m]], f"{r['epoch_seconds']:.2f}", f"{r['epochs']:g}",
            r["seeds"],
        ])
    return buf.getvalue()


def plot(spec: dict, rows: List[dict], path: Path) -> None:
    """NDCG@k (mean ± std over seeds) against total parameters, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"NDCG@{spec['metric_k']}"
    done = [r for r in rows if r["seeds"]]
    # Names beside the points overlap when configs have similar sizes and scores, so each
    # point gets a number and the names are listed beside the axes.
    fig, ax = plt.subplots(figsize=(11, 5.5))
    styles = {"nextitnet": ("o", "tab:blue"), "cprec": ("s", "tab:red")}
    names = []
    for i, r in enumerate(done, 1):
        marker, color = styles.get(r["model"], ("^", "tab:gray"))
        if r["model"] == "nextitnet" and (r["input"] != "full" or r["sharing"] != "none"):
            color = "tab:purple"  # a partly compressed NextItNet
        ax.errorbar(r["params"]["total"], r[metric][0], yerr=r[metric][1], fmt=marker, color=color, capsize=3)
        ax.annotate(str(i), (r["params"]["total"], r[metric][0]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8, color=color)
        names.append(f"{i}. {r['name']}")
    if done:
        pop = done[0]["pop"][metric]
        low = min(r[metric][0] - r[metric][1] for r in done)
        if pop >= low - 0.5 * (max(r[metric][0] for r in done) - low):
            ax.axhline(pop, color="gray", linestyle=":", label="popularity")
            ax.legend(loc="lower right", fontsize=8)
        else:  # far below every run: a line there would squash the points together
            names.append(f"popularity: {metric} {pop:.4f}")
        fig.text(0.63, 0.9, "\n".join(names), fontsize=8, va="top", family="monospace")
        fig.subplots_adjust(left=0.08, right=0.61)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(f"{spec['name']}\n{metric} against model size", fontsize=9)
    ax.grid(True, alpha=0.3)
    # The names list is placed in figure coordinates: long run names would run off a fixed
    # canvas, so the saved image grows to hold them.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _ranked_items(spec: dict) -> str:
    """What the tables' full ranking is over: the spec's ``exclude_seen`` (TrainConfig's)."""
    if spec.get("common", {}).get("exclude_seen") or any(r.get("exclude_seen") for r in spec["runs"]):
        return "the items each user had not interacted with before the target (exclude_seen)"
    return "all items"


def _own_seeds(spec: dict) -> str:
    """' (only seeds [0]: 'a', 'b')' for the runs that train fewer seeds than the spec's; '' if none."""
    own = {}
    for run in spec["runs"]:
        seeds = run_seeds(spec, run)
        if seeds != spec["seeds"]:
            own.setdefault(str(seeds), []).append(repr(run["name"]))
    return "".join(f" (only seeds {k}: {', '.join(v)})" for k, v in own.items())


def write_report(spec: dict, out_dir: Path, produced_by: str) -> List[dict]:
    """results.md, results.csv and ndcg_vs_params.png in ``out_dir`` from the finished runs."""
    rows = collect(spec, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r["seeds"]]
    k = spec["metric_k"]
    lines = [
        f"# {spec['name']}: parameters against accuracy",
        "",
        produced_by,
        f"Data `{spec.get('data') or 'shipped ml-latest-small'}`, split {spec.get('split', 'leave-one-out')}, "
        f"full ranking over {_ranked_items(spec)}, seeds {spec['seeds']}{_own_seeds(spec)}; mean ± std over the seeds "
        "finished (column 'seeds'). Compression is the parameter count of "
        f"'{spec.get('baseline')}' divided by the run's. 's / epoch' is the median epoch's wall time, validation included. Rows with "
        "fewer seeds than their run lists, or 'not run', had not finished when the table was written; the same spec "
        "without --report-only trains only those.",
    ]
    if spec.get("notes"):
        lines += ["", spec["notes"]]
    if done:
        pop = done[0]["pop"]
        lines += ["", "Popularity baseline: " + ", ".join(f"{m} {pop[m]:.4f}" for m in _columns(spec)[:3]) + "."]
    figure = f"![NDCG@{k} against parameters](ndcg_vs_params.png)"
    if done:
        try:
            plot(spec, rows, out_dir / "ndcg_vs_params.png")
        except ImportError:
            figure = "(no plot: matplotlib is not installed; `pip install matplotlib` and rerun with --report-only)"
            print(f"cprec compare: {figure}", file=sys.stderr)
    lines += ["", markdown_table(spec, rows), "", figure, ""]
    write_text_atomic(out_dir / "results.md", "\n".join(lines))
    write_text_atomic(out_dir / "results.csv", csv_table(spec, rows))
    return rows


def main_compare(args) -> dict:
    spec = load_spec(args.spec)
    if args.data:
        spec["data"] = args.data
    out_dir = Path(args.output or Path(args.spec).parent)
    command = "cprec compare " + " ".join(shlex.quote(a) for a in args.argv)
    produced_by = f"Produced by `{command}` from `{args.spec}`."
    if args.report_only:  # name the command that trained the runs, not just the one that tabled them
        train = "cprec compare " + " ".join(shlex.quote(a) for a in args.argv if a != "--report-only")
        produced_by = f"Tables written by `{command}` from the runs that `{train}` trains from `{args.spec}`."
    failed = []
    if not args.report_only:
        failed = run_study(spec, out_dir, args.workers, args.threads,
                           say=lambda m: print(m, file=sys.stderr, flush=True))
    rows = write_report(spec, out_dir, produced_by)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the tables hold the others):\n" + "\n".join(failed))
    # NaN (no baseline yet) is not JSON: None instead.
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {"output": str(out_dir), "rows": [{k: clean(v) for k, v in r.items() if k != "pop"} for r in rows]}
