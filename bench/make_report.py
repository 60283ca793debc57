"""Run the model benchmarks for this machine's device and write the report.

    python bench/make_report.py            # full grid (~10 min on 2 CPU cores) -> bench/RESULTS.md + PNGs
    python bench/make_report.py --small    # the CI grid, seconds (a smoke test of the pipeline)
    python bench/make_report.py --from-json .benchmarks/report/models.json   # re-render only

It runs ``pytest bench/bench_models.py`` (``CPREC_BENCH_FULL=1`` unless ``--small``)
with ``--benchmark-json``, then writes

- ``bench/RESULTS.md``: date, device, thread count, torch/triton versions, commit,
  machine load, the command and its wall time; the headline ratios; one table for the
  training step and one for serving with medians, ratios against the eager baselines
  of the same run (NextItNet eager and CpRec eager), tokens/s and memory; the rows
  skipped and why;
- ``bench/speedup_vs_vocab.png`` and ``bench/memory_vs_vocab.png`` (matplotlib,
  ``pip install -e .[bench]``).

On CPU it pins ``--threads`` (default 1) through ``CPREC_BENCH_THREADS`` and
``OMP_NUM_THREADS``: on a machine shared with other jobs two OpenMP threads per
process spin against each other and times swing by 10-40x. ``--with-ops`` also runs
the op suites (``bench/bench_cpu.py`` on CPU, the Triton op suites on CUDA) and appends
``bench/report.py``'s table.

The functions (``load_rows``, ``add_ratios``, ``headline``, ``render``, ``plot_*``) take
plain pytest-benchmark JSON, so other runs (a GPU machine's) render the same way.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = "nextitnet_eager"
CPREC_EAGER = "cprec_eager"
FUSED = ("cprec_cpu", "cprec_triton", "cprec_cuda")
# Row order of the tables and legend order of the plots.
IMPL_ORDER = ("nextitnet_eager", "cprec_eager", "cprec_compile", "cprec_cpu", "cprec_triton", "cprec_cuda")
HEADLINE_VOCAB = 100_000
MB = 2**20


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def load_rows(paths: Iterable[str]) -> List[dict]:
    """Flatten pytest-benchmark JSON files into rows: the ``extra_info`` of each
    benchmark plus ``name``, ``median``, ``iqr``, ``mean``, ``rounds`` (seconds).
    Benchmarks without a ``mode`` in their extra_info (op suites) are left out."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            info = dict(bench.get("extra_info") or {})
            if "mode" not in info or "impl" not in info:
                continue
            stats = bench["stats"]
            info.update(name=bench["name"], median=stats["median"], iqr=stats["iqr"], mean=stats["mean"],
                        rounds=stats["rounds"])
            rows.append(info)
    return rows


def _group_key(row: dict) -> tuple:
    return (row["device"], row["mode"], row["vocab"], row["batch"])


def add_ratios(rows: List[dict]) -> List[dict]:
    """Set ``vs_nextitnet`` and ``vs_cprec_eager`` on each row: the baseline's median
    over the row's, within the same device, mode, vocabulary and batch (None where the
    baseline was not measured)."""
    groups: Dict[tuple, Dict[str, dict]] = OrderedDict()
    for row in rows:
        groups.setdefault(_group_key(row), {})[row["impl"]] = row
    for by_impl in groups.values():
        for row in by_impl.values():
            for field, base_impl in (("vs_nextitnet", BASELINE), ("vs_cprec_eager", CPREC_EAGER)):
                base = by_impl.get(base_impl)
                row[field] = base["median"] / row["median"] if base and row["median"] > 0 else None
    return rows


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def sorted_rows(rows: Sequence[dict], mode: str) -> List[dict]:
    chosen = [r for r in rows if r["mode"] == mode]
    return sorted(chosen, key=lambda r: (r["device"], r["vocab"], r["batch"], _impl_rank(r["impl"])))


def headline_vocab(rows: Sequence[dict]) -> Optional[int]:
    """HEADLINE_VOCAB where it was measured, else the largest V measured (small grids)."""
    vocabs = {r["vocab"] for r in rows}
    return HEADLINE_VOCAB if HEADLINE_VOCAB in vocabs else max(vocabs, default=None)


def headline(rows: Sequence[dict], vocab: Optional[int] = None) -> List[dict]:
    """Per device, mode and batch at ``vocab`` (default ``headline_vocab``): the fastest
    fused CpRec backend against NextItNet eager (and CpRec eager). -> dicts with device,
    mode, batch, vocab, impl, ms, baseline_ms, ratio, vs_cprec_eager."""
    vocab = headline_vocab(rows) if vocab is None else vocab
    out = []
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for row in rows:
        if row["vocab"] == vocab:
            groups.setdefault(_group_key(row), []).append(row)
    for (device, mode, _, batch), group in groups.items():
        base = next((r for r in group if r["impl"] == BASELINE), None)
        fused = [r for r in group if r["impl"] in FUSED]
        if base is None or not fused:
            continue
        best = min(fused, key=lambda r: r["median"])
        eager = next((r for r in group if r["impl"] == CPREC_EAGER), None)
        out.append(dict(
            device=device, mode=mode, batch=batch, vocab=vocab, impl=best["impl"], ms=best["median"] * 1e3,
            baseline_ms=base["median"] * 1e3, ratio=base["median"] / best["median"],
            vs_cprec_eager=eager["median"] / best["median"] if eager else None,
        ))
    out.sort(key=lambda h: (h["device"], h["mode"] != "train_step", h["batch"]))
    return out


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / MB:.1f}"


def _rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


def _vocab(v: int) -> str:
    return f"{v // 1_000_000}M" if v % 1_000_000 == 0 else f"{v // 1000}k" if v % 1000 == 0 else str(v)


def headline_lines(rows: Sequence[dict], vocab: Optional[int] = None) -> List[str]:
    """One markdown bullet per headline ratio (what README quotes)."""
    lines = []
    for h in headline(rows, vocab):
        vocab = h["vocab"]
        what = ("training step (B = %d)" % h["batch"]) if h["mode"] == "train_step" else (
            "top-10 serving, %d user%s" % (h["batch"], "" if h["batch"] == 1 else "s"))
        extra = f"; {_ratio(h['vs_cprec_eager'])} vs CpRec eager" if h["vs_cprec_eager"] else ""
        lines.append(
            f"- {h['device']}, V = {_vocab(vocab)}, {what}: CpRec `{h['impl']}` {h['ms']:.1f} ms vs NextItNet eager "
            f"{h['baseline_ms']:.1f} ms: **{h['ratio']:.2f}x**{extra}"
        )
    return lines


def table(rows: Sequence[dict], mode: str) -> str:
    rate = "tokens/s" if mode == "train_step" else "users/s"
    head = [
        f"| device | V | {'batch' if mode == 'train_step' else 'users'} | impl | median ms | IQR ms | rounds | "
        f"vs NextItNet eager | vs CpRec eager | {rate} | peak MB | state MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted_rows(rows, mode):
        speed = r.get("tokens_per_s") if mode == "train_step" else r.get("users_per_s")
        if speed is None and r["median"] > 0:
            speed = (r["tokens_per_call"] if mode == "train_step" else r["batch"]) / r["median"]
        head.append(
            f"| {r['device']} | {_vocab(r['vocab'])} | {r['batch']} | {r['impl']} | {r['median'] * 1e3:.1f} | "
            f"{r['iqr'] * 1e3:.1f} | {r['rounds']} | {_ratio(r.get('vs_nextitnet'))} | "
            f"{_ratio(r.get('vs_cprec_eager'))} | {_rate(speed)} | {_mb(r.get('peak_memory_bytes'))} | "
            f"{_mb(r.get('state_bytes'))} |"
        )
    return "\n".join(head)


def _config_line(rows: Sequence[dict]) -> str:
    r = next((r for r in rows if r["mode"] == "train_step"), rows[0])
    cut = next((x for x in rows if x.get("cutoffs")), None)
    cut_text = ""
    if cut:
        fractions = ", ".join(f"{c / cut['vocab']:.0%}" for c in cut["cutoffs"][:-1])
        cut_text = f"; CpRec cutoffs at {fractions} of V, div {cut['div']:g}, cross-block sharing"
    return (f"d = {r['d']}, {r['blocks']} residual blocks (dilations {','.join(map(str, r['dilations']))}), "
            f"T = {r['seq_len']}, {r['dtype']}, {r['threads']} thread(s){cut_text}; Zipf item ids")


def render(rows: List[dict], env: dict, skips: Sequence[str] = (), notes: Sequence[str] = (),
           extra_sections: Sequence[str] = ()) -> str:
    """The markdown of RESULTS.md. ``env``: date, device, torch, triton, commit, command,
    wall_s, load (strings or None)."""
    add_ratios(rows)
    devices = sorted({r["device"] for r in rows})
    out = [
        "# Model benchmarks: NextItNet vs CpRec, training step and top-10 serving",
        "",
        f"Measured by `{env.get('command', 'python bench/make_report.py')}` on {env.get('date', '?')}"
        + (f" (rendered again by `{env['rendered']}`)." if env.get("rendered") else "."),
        "",
        "| | |",
        "|---|---|",
        f"| device | {env.get('device', ', '.join(devices))} |",
        f"| torch / triton | {env.get('torch', '?')} / {env.get('triton') or 'not installed'} |",
        f"| commit | {env.get('commit', '?')} |",
        f"| config | {_config_line(rows) if rows else '-'} |",
    ]
    if env.get("wall_s") is not None:
        out.append(f"| wall time of the run | {float(env['wall_s']):.0f} s |")
    if env.get("load"):
        out.append(f"| load average (1 min) at start / end | {env['load']} |")
    out.append("")
    for note in notes:
        out += [note, ""]
    out += ["## Headline", ""]
    lines = headline_lines(rows)
    out += lines if lines else ["- no row pairs CpRec on a fused backend with NextItNet eager at one V"]
    out += [
        "",
        "Ratios are the baseline's median over the row's, both from this run (> 1: faster than the baseline).",
        "`peak MB`: on CUDA `torch.cuda.max_memory_allocated` over the timed calls (weights and optimizer "
        "state included); on CPU the growth of the peak resident set (VmHWM) during one extra untimed call "
        "over the resident set before it, after `malloc_trim(0)` and with glibc's mmap threshold at 64 KiB, "
        "so it counts the call's working memory (activations, grads, logits) but not weights or AdamW state; "
        "small values are within a few heap pages. `state MB`: parameters, plus their grads and the two AdamW "
        "moments for training (4 copies), parameters only for serving.",
        "",
        "## Training step (zero_grad, forward, loss on all T positions, backward, AdamW step)",
        "",
        table(rows, "train_step"),
        "",
        "## Serving: `model.recommend(inputs, 10)` under `torch.no_grad`",
        "",
        table(rows, "serve_top10"),
        "",
        "![speedup vs vocabulary size](speedup_vs_vocab.png)",
        "",
        "![memory vs vocabulary size](memory_vs_vocab.png)",
        "",
    ]
    if skips:
        out += ["## Rows not measured", ""] + [f"- {s}" for s in skips] + [""]
    out += list(extra_sections)
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(rows: Sequence[dict]) -> List[tuple]:
    """(device, mode, batch) of every panel, training first."""
    keys = sorted({(r["device"], r["mode"], r["batch"]) for r in rows},
                  key=lambda k: (k[0], k[1] != "train_step", k[2]))
    return keys


def _title(device: str, mode: str, batch: int) -> str:
    return f"{device}: train step, B={batch}" if mode == "train_step" else f"{device}: top-10, {batch} user(s)"


def _series(rows: Sequence[dict], device: str, mode: str, batch: int, value) -> Dict[str, tuple]:
    series: Dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["vocab"]):
        if (r["device"], r["mode"], r["batch"]) == (device, mode, batch):
            y = value(r)
            if y is not None:
                series.setdefault(r["impl"], []).append((r["vocab"], y))
    return {k: tuple(zip(*v)) for k, v in sorted(series.items(), key=lambda kv: _impl_rank(kv[0]))}


def _xlim(rows: Sequence[dict]) -> tuple:
    vocabs = [r["vocab"] for r in rows]
    return min(vocabs) / 1.5, max(vocabs) * 1.5


def _ratio_formatter(minor: bool = False):
    from matplotlib.ticker import FuncFormatter

    def fmt(y, _):
        if minor and round(y, 6) not in (0.2, 0.3, 0.5, 2, 3, 5, 20, 30, 50):
            return ""
        return f"{y:g}x"

    return FuncFormatter(fmt)


def _style_panel(ax, rows: List[dict], panel: tuple, ylabel: str, legend_size: int) -> None:
    """Log-log axes over the vocabulary sizes of the run, labels, title, legend, grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*_xlim(rows))
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(*panel), fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(True, which="both", alpha=0.3)


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(rows: List[dict], path: str) -> None:
    """Speedup over NextItNet eager vs V, one panel per (device, mode, batch)."""
    plt = _pyplot()
    add_ratios(rows)
    panels = _panels(rows)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (device, mode, batch) in zip(axes[0], panels):
        for impl, (xs, ys) in _series(rows, device, mode, batch, lambda r: r.get("vs_nextitnet")).items():
            ax.plot(xs, ys, marker="o", color=f"C{_impl_rank(impl)}", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        panel = [r for r in rows if (r["device"], r["mode"], r["batch"]) == (device, mode, batch)]
        unpaired = sorted({r["vocab"] for r in panel} - {r["vocab"] for r in panel if r["impl"] == BASELINE})
        if unpaired:
            ax.text(0.02, 0.98, "no NextItNet row at V = " + ", ".join(map(_vocab, unpaired)),
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color="grey")
        ax.yaxis.set_major_formatter(_ratio_formatter())
        ax.yaxis.set_minor_formatter(_ratio_formatter(minor=True))
        _style_panel(ax, rows, (device, mode, batch), "speedup vs NextItNet eager", legend_size=7)
    _save(plt, fig, path)


def plot_memory(rows: List[dict], path: str) -> None:
    """Per (device, mode, batch) panel, in MB vs V: the measured peak of each impl
    (solid; zero growth left out, the log axis cannot show it) and the state bytes of
    each model (dashed: parameters, plus grads and AdamW moments when training)."""
    plt = _pyplot()
    panels = _panels(rows)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (device, mode, batch) in zip(axes[0], panels):
        peak = _series(rows, device, mode, batch, lambda r: (r.get("peak_memory_bytes") or 0) / MB or None)
        for impl in sorted(peak, key=_impl_rank):
            ax.plot(*peak[impl], marker="o", color=f"C{_impl_rank(impl)}", label=f"{impl} peak")
        state = _series(rows, device, mode, batch, lambda r: (r.get("state_bytes") or 0) / MB or None)
        for model, color in (("nextitnet", "black"), ("cprec", "grey")):
            points = sorted({xy for impl, (xs, ys) in state.items() if impl.startswith(model) for xy in zip(xs, ys)})
            if points:
                ax.plot(*zip(*points), marker="x", ls="--", color=color, label=f"{model} state")
        _style_panel(ax, rows, (device, mode, batch), "MB", legend_size=6)
    _save(plt, fig, path)


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] ([^:]+):\d+: (.*)$")


def parse_skips(pytest_output: str) -> List[str]:
    """'N row(s): reason' for each ``SKIPPED [N] file:line: reason`` line of ``pytest -rs``."""
    out = []
    for line in pytest_output.splitlines():
        m = SKIP_LINE.match(line.strip())
        if m:
            n = int(m.group(1))
            out.append(f"{n} row{'s' if n > 1 else ''}: {m.group(3)}")
    return out


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_description(threads: Optional[int]) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    used = f", {threads} thread(s) used" if threads else ""
    return f"CPU: {name}, {os.cpu_count()} logical cores{used}"


def environment(command: str, wall_s: Optional[float], threads: Optional[int], load: Optional[str]) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=_device_description(threads), torch=torch.__version__, triton=triton_version,
        commit=_git_commit(), command=command, wall_s=wall_s, load=load,
    )


def run_pytest(suite: str, json_path: str, full: bool, threads: Optional[int], extra: Sequence[str] = ()):
    """Run one benchmark suite -> (return code, combined output, wall seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)
    if full:
        env["CPREC_BENCH_FULL"] = "1"
    else:
        env.pop("CPREC_BENCH_FULL", None)
    if threads:
        env["CPREC_BENCH_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", suite,
           f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds", *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:], flush=True)
    return proc.returncode, proc.stdout, wall


def _load_text() -> Optional[str]:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return None


def meta_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".meta.json"


def write_meta(json_path: str, env: dict, skips: Sequence[str]) -> None:
    """Keep what pytest-benchmark's JSON lacks (the environment of the run and its
    skipped rows) beside it, so ``--from-json`` renders the same report later."""
    with open(meta_path(json_path), "w", encoding="utf-8") as f:
        json.dump({"env": env, "skips": list(skips)}, f, indent=1)


def read_meta(json_path: str) -> dict:
    try:
        with open(meta_path(json_path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def shown_command(argv: List[str]) -> str:
    """The command line for the report header, ``--note`` texts elided (they are printed below it)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            shown.append('"..."')
            skip = False
            continue
        skip = arg == "--note"
        shown.append(arg.split("=", 1)[0] + '="..."' if arg.startswith("--note=") else shlex.quote(arg))
    return " ".join(["python bench/make_report.py", *shown])


HAND_SECTION = "## Op benchmarks on the cpu backend"


def _hand_recorded(path: str) -> str:
    """The hand-recorded op section of an existing RESULTS.md (kept across reruns)."""
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        return ""
    at = old.find(HAND_SECTION)
    return "" if at < 0 else "\n" + old[at:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the CI grid instead of CPREC_BENCH_FULL=1")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads (default: 1 on CPU, torch's default on CUDA; 0: torch's default)")
    parser.add_argument("--json", default=os.path.join(ROOT, ".benchmarks", "report", "models.json"),
                        help="where the pytest-benchmark JSON goes")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="render these pytest-benchmark JSON files instead of running")
    parser.add_argument("--out-dir", default=HERE, help="where RESULTS.md and the PNGs go (default bench/)")
    parser.add_argument("--note", action="append", default=[], help="a paragraph to put under the header")
    parser.add_argument("--with-ops", action="store_true", help="also run the op suites and append their table")
    parser.add_argument("-k", default=None, help="pytest -k expression for the model suite")
    args = parser.parse_args(argv)

    import torch

    threads = args.threads
    if threads is None:
        threads = None if torch.cuda.is_available() else 1
    threads = threads or None
    command = shown_command(list(argv if argv is not None else sys.argv[1:]))
    sections: List[str] = []
    if args.from_json:
        paths = args.from_json
        meta = read_meta(paths[0])
        env = meta.get("env") or environment(command, None, threads, None)
        env["rendered"] = command
        skips = meta.get("skips", [])
    else:
        load_start = _load_text()
        extra = ["-k", args.k] if args.k else []
        code, output, wall = run_pytest("bench/bench_models.py", args.json, not args.small, threads, extra)
        load = f"{load_start} / {_load_text()}"
        if code not in (0, 5) and not os.path.exists(args.json):
            print(f"pytest failed ({code}) and wrote no JSON", file=sys.stderr)
            return code
        skips = parse_skips(output)
        env = environment(command, wall, threads, load)
        write_meta(args.json, env, skips)
        paths = [args.json]
        if args.with_ops:
            sections.append(_op_section(args, threads))
    rows = load_rows(paths)
    if not rows:
        print("no model benchmark rows in " + ", ".join(paths), file=sys.stderr)
        return 1
    notes = list(args.note)
    if not any(r["device"] != "cpu" for r in rows):
        notes.append("GPU rows: unmeasured (no GPU was lent for this run); `bench/bench_models.py` runs them on a CUDA "
                     "machine (triton/cuda backends, batch 128, 256 users) and this script renders them.")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "RESULTS.md")
    text = render(rows, env, skips, notes, sections) + _hand_recorded(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        plot_speedup(rows, os.path.join(args.out_dir, "speedup_vs_vocab.png"))
        plot_memory(rows, os.path.join(args.out_dir, "memory_vs_vocab.png"))
        print(f"wrote {os.path.join(args.out_dir, 'RESULTS.md')} and two PNGs")
    except ImportError:
        print(f"wrote {os.path.join(args.out_dir, 'RESULTS.md')}; no PNGs: matplotlib is not installed "
              "(pip install -e .[bench])", file=sys.stderr)
    for line in headline_lines(rows):
        print(line)
    return 0


def _op_section(args, threads: Optional[int]) -> str:
    """Run the op suites of this device and render them with bench/report.py."""
    import torch

    sys.path.insert(0, HERE)
    import report  # bench/report.py

    suites = (["bench_conv", "bench_embedding", "bench_adaptive_softmax"] if torch.cuda.is_available()
              else ["bench_cpu"])
    paths = []
    for suite in suites:
        path = os.path.join(os.path.dirname(args.json), f"{suite}.json")
        code, _, _ = run_pytest(f"bench/{suite}.py", path, not args.small, threads)
        if os.path.exists(path):
            paths.append(path)
    body = report.render(report.rows(paths)) if paths else "(no op rows)"
    return "## Op suites (`bench/report.py`)\n\n" + body + "\n"


if __name__ == "__main__":
    sys.exit(main())
