"""Where one CpRec training step spends its time, per op group, from ``torch.profiler``.

    python bench/profile_train_step.py [--backend cpu] [--vocab 100000] [--batch 16]
        [--steps 5] [--threads 2] [--json]

The model and data are the training-step benchmark's (``bench/bench_models.py``: d = 256,
8 blocks of dilations 1, 2, 4, 8, T = 50, Zipf item ids). A group's time is the inclusive
CPU time of the outermost profiler events of its ops (forward and backward apart), so
nothing is counted twice; "other" is the rest of the step's wall time (autograd engine,
residual adds, copies, Python). Works on any commit whose ops keep their
``torch.ops.cprec`` names, so a before/after table needs only two checkouts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (group, substrings of the profiler event names that belong to it), first match wins.
# Eager calls of the fused conv run as an autograd.Function (_ConvLnReluFunction, see
# cprec_kernels/conv), compiled ones as the custom ops.
GROUPS = [
    ("conv backward", ("cprec::causal_conv1d_ln_relu_backward", "cprec::causal_conv1d_backward",
                       "_ConvLnReluFunctionBackward")),
    ("conv forward", ("cprec::causal_conv1d_ln_relu", "cprec::causal_conv1d", "_ConvLnReluFunction")),
    ("embedding backward", ("cprec::blockwise_embedding_backward",)),
    ("embedding forward", ("cprec::blockwise_embedding",)),
    ("loss backward", ("cprec::adaptive_softmax_loss_backward",)),
    # On the cpu backend the training loss forms its gradients in the forward
    # (cprec::adaptive_softmax_loss_with_grads): its "loss backward" only scales them.
    ("loss forward", ("cprec::adaptive_softmax_loss",)),
    ("optimizer step", ("Optimizer.step",)),
    ("zero_grad", ("Optimizer.zero_grad",)),
]


def group_of(name: str):
    for group, keys in GROUPS:
        if any(name.startswith(k) for k in keys):
            return group
    return None


def profile_step(backend: str, vocab: int, batch: int, steps: int) -> Dict[str, float]:
    """-> {group: ms per step, ..., "other": ms, "step": ms} over ``steps`` profiled steps."""
    from bench_models import D, DILATIONS, DIV, SEQ_LEN, cutoffs_for
    from conftest import zipf_ids

    from cprec.models import CpRec

    torch.manual_seed(0)
    net = CpRec(vocab, cutoffs_for(vocab), d=D, block_dilations=DILATIONS, div_value=DIV, backend=backend).train()
    try:  # `cprec train`'s AdamW (fused where torch fuses it); commits before it had torch's default
        from cprec.optim import make_adamw
    except ImportError:
        def make_adamw(params, lr, weight_decay):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    optimizer = make_adamw(net.parameters(), lr=1e-3, weight_decay=0.01)
    ids = zipf_ids(batch * (SEQ_LEN + 1), vocab, generator=torch.Generator().manual_seed(0)).view(batch, SEQ_LEN + 1)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        optimizer.zero_grad(set_to_none=True)
        net.loss(inputs, targets).backward()
        optimizer.step()

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    totals: Dict[str, float] = {g: 0.0 for g, _ in GROUPS}
    for event in prof.events():
        group = group_of(event.name)
        if group is None:
            continue
        parent = event.cpu_parent
        while parent is not None and group_of(parent.name) is None:
            parent = parent.cpu_parent
        if parent is None:  # outermost event of a group: its inclusive time counts once
            totals[group] += event.cpu_time_total / 1e3
    out = {g: ms / steps for g, ms in totals.items()}
    out["step"] = wall * 1e3 / steps
    out["other"] = out["step"] - sum(totals.values()) / steps
    return out


def table(columns: Dict[str, Dict[str, float]]) -> str:
    """Markdown: one row per group, one column (ms and share of the step) per run."""
    names = list(columns)
    lines = ["| group | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for group in [g for g, _ in GROUPS] + ["other", "step"]:
        cells = []
        for name in names:
            ms, total = columns[name][group], columns[name]["step"]
            cells.append(f"{ms:.1f} ms" if group == "step" else f"{ms:.1f} ms ({100 * ms / total:.0f}%)")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", help="backend(s) to profile (repeatable; default: cpu and torch)")
    p.add_argument("--vocab", type=int, default=100_000, help="V (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps after 2 warm-up steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the per-group figures as JSON instead of a table")
    args = p.parse_args(argv)
    os.environ.setdefault("CPREC_BENCH_FULL", "1")  # bench_models' full sizes (d 256, 8 blocks, T 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    columns = {b: profile_step(b, args.vocab, args.batch, args.steps) for b in args.backend or ["cpu", "torch"]}
    print(json.dumps(columns, indent=1) if args.json else table(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
