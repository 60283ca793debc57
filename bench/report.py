"""Turn pytest-benchmark JSON files into markdown tables with speedups.

    python bench/report.py out/*.json > table.md

Rows that differ only in the implementation (the ``impl`` parameter) form a group;
each row's speedup is the baseline's median over its own, the baseline being the
eager PyTorch form of that group (see BASELINES).
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict

# Eager forms the fused ops are measured against, in order of preference.
BASELINES = ("eager", "nn_adaptive", "nn_adaptive_log_prob_topk", "torch_log_prob_topk", "torch")


def _group_key(bench: dict) -> tuple:
    params = {k: v for k, v in (bench.get("params") or {}).items() if k != "impl"}
    return (bench["name"].split("[")[0], tuple(sorted((k, str(v)) for k, v in params.items())))


def rows(paths):
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            groups.setdefault(_group_key(bench), []).append(bench)
    return groups


def _impl(bench: dict) -> str:
    return str((bench.get("params") or {}).get("impl", bench["extra_info"].get("backend", "?")))


def render(groups) -> str:
    out = ["| benchmark | sizes | impl | median ms | speedup vs eager | peak MB | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for (name, params), benches in groups.items():
        by_impl = {_impl(b): b for b in benches}
        base = next((by_impl[i] for i in BASELINES if i in by_impl), None)
        sizes = ", ".join(f"{k}={v}" for k, v in params)
        for impl, b in by_impl.items():
            median = b["stats"]["median"]
            speedup = f"{base['stats']['median'] / median:.2f}x" if base is not None else "-"
            peak = b["extra_info"].get("peak_memory_bytes")
            flops = b["extra_info"].get("gemm_flops")
            out.append(
                f"| {name} | {sizes} | {impl} | {median * 1e3:.3f} | {speedup} | "
                f"{peak / 2**20:.1f} | " if peak else f"| {name} | {sizes} | {impl} | {median * 1e3:.3f} | {speedup} | - | "
            )
            out[-1] += f"{flops / median / 1e12:.1f} |" if flops else "- |"
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/report.py RESULTS.json [...]")
    print(render(rows(sys.argv[1:])))
