"""Speed ratios the machine's drift cannot bias: the implementations of one op group
take turns, one call each per round, in an order that rotates from round to round.

    python bench/interleaved.py conv [--batch 16] [--t 50] [--c 256] [--threads 1] [--rounds 40]
    python bench/interleaved.py loss [--n 4096] [--d 256] [--vocab 100000] [--cutoffs 2000 10000 50000]

pytest-benchmark (``bench_cpu.py``) times one implementation after another, so a
machine whose speed drifts over minutes (a shared VM: the same op read 31.8 and 46.2 ms
minutes apart) moves each row differently and with it the ratio. Here every round holds
one call of each, so a round's ratio compares calls made seconds apart. The steps are
``bench_cpu.py``'s (``cpu_steps.py``). Prints, per implementation, the median and the
minimum; per baseline, the median over rounds of baseline / cpu within a round, with a
bootstrap 95% interval of that median.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_steps import CONV_IMPLS, LOSS_IMPLS, adaptive_loss_step, conv_ln_relu_step  # noqa: E402


def rotated(names: Sequence[str], round_index: int) -> List[str]:
    """names starting at position round_index (mod len): each name runs first, second,
    ... equally often, so no implementation always inherits another's cache state."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def time_rounds(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> Dict[str, List[float]]:
    """-> {name: [seconds of its call in round r for r in range(rounds)]}; each step runs
    ``warmup`` untimed calls first (allocation, torch.compile's compilation)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: Dict[str, List[float]] = {name: [0.0] * rounds for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            start = time.perf_counter()
            steps[name]()
            times[name][r] = time.perf_counter() - start
    return times


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> Tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and a percentile-bootstrap
    interval of it at ``level`` (seeded, so a report can be reproduced)."""
    if not values:
        raise ValueError("median_interval: no values")
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1.0 - tail) * (resamples - 1)))]
    return statistics.median(values), low, high


def summarize(times: Dict[str, List[float]], reference: str = "cpu") -> List[dict]:
    """One row per implementation: median and minimum ms, and (for the others) the
    median of baseline / reference per round with its bootstrap interval."""
    rows = []
    for name, seconds in times.items():
        row = {"impl": name, "median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
               "rounds": len(seconds)}
        if name != reference and reference in times:
            ratios = [other / ref for other, ref in zip(seconds, times[reference])]
            row["ratio"], row["ratio_low"], row["ratio_high"] = median_interval(ratios)
        rows.append(row)
    return rows


def markdown(rows: List[dict], reference: str = "cpu") -> str:
    lines = [f"| impl | median ms | min ms | rounds | impl / {reference} per round: median [95% interval] |",
             "|---|---|---|---|---|"]
    for row in rows:
        ratio = (f"{row['ratio']:.2f}x [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}]" if "ratio" in row else "")
        lines.append(f"| {row['impl']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['rounds']} | {ratio} |")
    return "\n".join(lines)


def build_steps(args: argparse.Namespace) -> Dict[str, Callable[[], None]]:
    known = CONV_IMPLS if args.op == "conv" else LOSS_IMPLS
    impls = args.impls or known
    unknown = [i for i in impls if i not in known]
    if unknown:
        raise SystemExit(f"interleaved.py: unknown impl(s) {unknown} for {args.op}; choose from {known}")
    if len(set(impls)) != len(impls):
        raise SystemExit(f"interleaved.py: --impls names an implementation twice: {impls}")
    if "cpu" not in impls:
        raise SystemExit("interleaved.py: the ratios are against 'cpu'; include it in --impls")
    if args.op == "conv":
        return {i: conv_ln_relu_step(i, args.batch, args.t, args.c) for i in impls}
    cuts = args.cutoffs
    if cuts[0] < 1 or any(a >= b for a, b in zip(cuts, cuts[1:])) or cuts[-1] >= args.vocab:
        raise SystemExit(f"interleaved.py: --cutoffs must increase strictly from >= 1 and stay below --vocab {args.vocab}")
    return {i: adaptive_loss_step(i, args.n, args.d, args.vocab, list(args.cutoffs)) for i in impls}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=["conv", "loss"],
                        help="conv: causal_conv1d_ln_relu fwd+bwd, one layer per dilation 1, 2, 4, 8; "
                             "loss: adaptive softmax loss fwd+bwd")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="implementations to alternate (default: all of the op's: cpu eager compile, "
                             "and gemm-floor for the loss); must include cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds, one call of each impl per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each impl before the rounds")
    parser.add_argument("--batch", type=int, default=16, help="conv: batch size B")
    parser.add_argument("--t", type=int, default=50, help="conv: sequence length T")
    parser.add_argument("--c", type=int, default=256, help="conv: channels d")
    parser.add_argument("--n", type=int, default=4096, help="loss: rows N")
    parser.add_argument("--d", type=int, default=256, help="loss: hidden size d")
    parser.add_argument("--vocab", type=int, default=100_000, help="loss: items V")
    parser.add_argument("--cutoffs", type=int, nargs="+", default=[2_000, 10_000, 50_000],
                        help="loss: cluster cutoffs below V, increasing")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("rounds", "batch", "t", "c", "n", "d", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be >= 0 and --threads >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = summarize(time_rounds(build_steps(args), args.rounds, args.warmup))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        sizes = (f"B = {args.batch}, T = {args.t}, d = {args.c}" if args.op == "conv"
                 else f"N = {args.n}, d = {args.d}, V = {args.vocab}, cutoffs {args.cutoffs}")
        print(f"{args.op} fwd+bwd, {sizes}, {torch.get_num_threads()} thread(s), {args.rounds} rounds\n")
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
