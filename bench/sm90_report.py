"""What every kernel compiles to on an H200 (sm_90) at the benchmark sizes, without a GPU.

Triton kernels: each backend launcher is called with CPU tensors (``torch.empty``: big
sizes cost no memory traffic) inside ``sm90_compile.compiling_for_sm90``, so each kernel
is compiled as the launcher configures it for those sizes; read from the cubin/PTX:
warps, stages, shared memory, registers, stack (spills), resident blocks per SM, MMA
class. CUDA kernels (``csrc/cuda``): ``nvcc -Xptxas -v`` for sm_90.

Sizes: conv B*T = 32,768 (B = 128, T = 256, K = 3) at d = 64, 256, 1024; embedding
N = 262,144, V = 1M, d = 256 (bench_embedding's 4 blocks); adaptive loss and top-k at
N = 32,768, V = 1M, d = 256 (bench_adaptive_softmax's layout). The log-prob launches
use N = 512 rows: their [N, V] fp32 output at N = 32,768 (128 GB) cannot be allocated
even untouched, and N sets only their grid, not their configuration.

    python bench/sm90_report.py            # writes bench/SM90.md
    python bench/sm90_report.py --check    # exits 1 on a compile error, a spill, shared
                                           # memory over the limit, a half-type tl.dot off tensor cores
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cprec_kernels.nn import block_width  # noqa: E402
from sm90_compile import Compiled, compiling_for_sm90, problems  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONV_B, CONV_T, CONV_K, CONV_WIDTHS = 128, 256, 3, (64, 256, 1024)
EMB_N, EMB_V, EMB_D, EMB_CUTS, EMB_DIV = 262_144, 1_000_000, 256, (0.05, 0.2, 0.5), 4
ASM_N, ASM_V, ASM_D, ASM_CUTS, ASM_DIV, TOPK = 32_768, 1_000_000, 256, (0.02, 0.10, 0.35), 4, 10
LOG_PROB_N = 512

# Why a kernel stays off wgmma in bfloat16/float16 at these sizes (kernel name -> reason).
# (The fused conv+LayerNorm kernels are on wgmma in bfloat16/float16 at d = 64, 256 and
# 1024: 64-row tiles, rows wider than ROW_TILE split with a two-pass LayerNorm.)
WHY = {
    "_table_grad_kernel": "its M tile is CHUNK = 32 sorted positions (runs of equal ids are summed per chunk with "
                          "a [CHUNK, CHUNK] 0/1 product); wgmma needs 64 rows per warp group",
    "_rows_outer_kernel": "its M is the tail's width d_j (16 for the last tail at d = 256, div 4): no 64-row tile",
}
NO_DOT = "no tl.dot: a gather / reduction / carry kernel, bandwidth-bound"


def _dims(fractions: Sequence[float], vocab: int) -> List[int]:
    return [int(vocab * f) for f in fractions] + [vocab]


# --------------------------------------------------------------------------------------
# the launches, op by op (the backends' own functions with CPU tensors)
# --------------------------------------------------------------------------------------
def conv_cases(dtype: torch.dtype) -> List[Tuple[str, Callable[[], object]]]:
    from cprec_kernels.conv import triton as conv

    cases = []
    for d in CONV_WIDTHS:
        x = torch.empty(CONV_B, CONV_T, d, dtype=dtype)
        w = torch.empty(d, d, CONV_K, dtype=dtype)
        vec = torch.empty(d, dtype=dtype)
        mean = torch.empty(CONV_B, CONV_T, dtype=torch.float32)
        cases += [
            (f"conv d={d}", lambda x=x, w=w, vec=vec: (conv.causal_conv1d_forward(x, w, vec, 1),
                                                       conv.causal_conv1d_backward(x, x, w, vec, 1))),
            (f"conv+LN+ReLU d={d}", lambda x=x, w=w, vec=vec, mean=mean: (
                conv.causal_conv1d_ln_relu_forward(x, w, vec, vec, vec, x, 1, 1e-8),
                conv.causal_conv1d_ln_relu_backward(x, x, w, vec, vec, vec, mean, mean, 1, 1e-8))),
        ]
    return cases


def embedding_cases(dtype: torch.dtype) -> List[Tuple[str, Callable[[], object]]]:
    from cprec_kernels.embedding import triton as embedding

    cuts = _dims(EMB_CUTS, EMB_V)
    edges = [0] + cuts
    widths = [block_width(EMB_D, EMB_DIV, j) for j in range(len(cuts))]
    weights = [torch.empty(hi - lo, w, dtype=dtype) for lo, hi, w in zip(edges[:-1], edges[1:], widths)]
    projections = [None] + [torch.empty(EMB_D, w, dtype=dtype) for w in widths[1:]]
    # Zipf-like ids over every block, so each block's launches happen.
    ids = torch.cat([torch.randint(lo, hi, (EMB_N // len(cuts),)) for lo, hi in zip(edges[:-1], edges[1:])])
    grad = torch.empty(ids.numel(), EMB_D, dtype=dtype)
    return [(f"embedding N={EMB_N} V=1M d={EMB_D}", lambda: (
        embedding.blockwise_embedding_forward(ids, weights, projections, cuts, None),
        embedding.blockwise_embedding_backward(grad, ids, weights, projections, cuts, None)))]


def adaptive_cases(dtype: torch.dtype) -> List[Tuple[str, Callable[[], object]]]:
    from cprec_kernels.adaptive_softmax import triton as asm

    cuts = _dims(ASM_CUTS, ASM_V)
    head = torch.empty(cuts[0] + len(cuts) - 1, ASM_D, dtype=dtype)
    sizes = [hi - lo for lo, hi in zip(cuts[:-1], cuts[1:])]
    projs = [torch.empty(block_width(ASM_D, ASM_DIV, j + 1), ASM_D, dtype=dtype) for j in range(len(sizes))]
    tails = [torch.empty(n, p.shape[0], dtype=dtype) for n, p in zip(sizes, projs)]
    hidden = torch.empty(ASM_N, ASM_D, dtype=dtype)
    target = torch.randint(0, ASM_V, (ASM_N,))
    small = torch.empty(LOG_PROB_N, ASM_D, dtype=dtype)
    grad_lp = torch.empty(LOG_PROB_N, ASM_V, dtype=torch.float32)
    label = f"N={ASM_N} V=1M d={ASM_D}"
    return [
        (f"adaptive loss {label}", lambda: asm.adaptive_softmax_loss_backward(
            torch.ones(()), hidden, target, head, None, projs, tails, cuts, -100, "mean",
            *asm.adaptive_softmax_loss_forward(hidden, target, head, None, projs, tails, cuts, -100, "mean")[1:])),
        (f"adaptive log-prob N={LOG_PROB_N} V=1M d={ASM_D}", lambda: (
            asm.adaptive_log_prob_forward(small, head, None, projs, tails, cuts),
            asm.adaptive_log_prob_backward(grad_lp, small, head, None, projs, tails, cuts))),
        (f"adaptive top-{TOPK} {label}", lambda: asm.adaptive_topk_forward(hidden, head, None, projs, tails, cuts,
                                                                          TOPK, None)),
    ]


def triton_rows() -> List[Tuple[str, str, Compiled]]:
    """(op, dtype, row) for every distinct kernel configuration the launchers compile."""
    out, seen = [], set()
    for dtype in DTYPES:
        for op, thunk in conv_cases(dtype) + embedding_cases(dtype) + adaptive_cases(dtype):
            with compiling_for_sm90() as rows:
                try:
                    thunk()
                except ValueError as err:  # a launcher refusing a size (e.g. the fused width cap)
                    rows.append(Compiled(kernel="(launcher)", error=f"ValueError: {err}"))
            for r in rows:
                # The dtype is not a constexpr: bfloat16 and float16 share constexprs.
                key = (op, dtype, r.kernel, tuple(sorted(r.constexprs.items())))
                if key not in seen:
                    seen.add(key)
                    out.append((op, str(dtype).replace("torch.", ""), r))
    return out


# --------------------------------------------------------------------------------------
# CUDA (nvcc)
# --------------------------------------------------------------------------------------
def cuda_rows() -> Optional[List[Dict[str, object]]]:
    """One dict per kernel of csrc/cuda from ``nvcc -Xptxas -v`` for sm_90; None without nvcc."""
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        return None
    src = os.path.join(os.path.dirname(HERE), "csrc")
    rows = []
    for name in sorted(os.listdir(os.path.join(src, "cuda"))):
        if not name.endswith(".cu"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([nvcc, "-c", "-gencode", "arch=compute_90,code=sm_90", "-O3", "-std=c++17",
                                   "-Xptxas", "-v", f"-I{src}", os.path.join(src, "cuda", name),
                                   "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
        rows += parse_ptxas(done.stderr, name)
    return rows


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    text = subprocess.run([tool, "-p"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: d.replace("void ", "").replace("(anonymous namespace)::", "") for n, d in zip(names, text)}


def parse_ptxas(log: str, source: str) -> List[Dict[str, object]]:
    """Kernels in a ``ptxas -v`` log: name, registers, shared memory, stack, spills."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_90", line)
        if m:
            current = {"source": source, "kernel": m.group(1), "regs": 0, "shared": 0, "stack": 0, "spill": 0}
            rows.append(current)
        elif current is not None:
            if "stack frame" in line:
                nums = [int(n) for n in re.findall(r"(\d+) bytes", line)]
                current["stack"], current["spill"] = nums[0], nums[1] + nums[2]
            m = re.search(r"Used (\d+) registers", line)
            if m:
                current["regs"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                current["shared"] = int(s.group(1)) if s else 0
    names = _demangle([r["kernel"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    # cub's sort kernels come with the library, tuned by NVIDIA: only this project's rows.
    return [r for r in rows if "cub::" not in r["kernel"]]


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def why(dtype: str, r: Compiled) -> str:
    """Why a kernel is not on wgmma in a half type at these sizes ('' where it is, or fp32)."""
    if dtype == "float32" or r.error or r.mma == "wgmma":
        return ""
    if not r.calls_dot:
        return NO_DOT
    if not r.half_dot:
        return "its only tl.dot is in fp32 by design (exact 0/1 run sums), IEEE: FMA"
    return WHY.get(r.kernel, "a tl.dot tile under 64 rows (the launcher's choice): wgmma needs 64 rows per warp group")


def _tiles(constexprs: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in constexprs.items()
                    if k.startswith("BLOCK") or k in ("KP", "CHUNK", "SPLIT", "MMA", "PRECISION"))


def markdown(triton_version: str, rows: List[Tuple[str, str, Compiled]], cuda: Optional[List[dict]]) -> str:
    lines = [
        "# sm_90 (H200) compile report",
        "",
        f"Generated by `python bench/sm90_report.py` with triton {triton_version} (no GPU: compiled for target "
        "cuda:90 through the launchers, read from the cubin and PTX). A model of the hardware, not a measurement.",
        "Resident blocks/SM: the minimum of the register file (65,536), shared memory (228 KB, 1 KB reserved per "
        "block), 2,048 threads and 32 blocks. Stack: the stack frame per thread (cuobjdump); spill: "
        "spill stores per thread (ptxas -v on the kernel's PTX, where there is a stack frame). float32 rows compile "
        "as the GPU runs them under torch's default flags, like eager: convolution kernels in TF32 "
        "(`torch.backends.cudnn.allow_tf32`, True by default, which cuDNN's `F.conv1d` follows), matmul-shaped "
        "kernels (embedding, adaptive softmax) in IEEE fp32 (default matmul precision \"highest\": FMA, no tensor "
        "cores). The mode is in the tiles column (MMA/PRECISION); half types ignore it (their dots run in the "
        "half type on tensor cores).",
        "Rows marked with a \"why\" are bfloat16/float16 kernels not on wgmma at these sizes.",
        "",
        "## Triton kernels",
        "",
        "| op | dtype | kernel | tiles | warps | stages | smem B | regs | stack B | spill B | blocks/SM | MMA | why not wgmma |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for op, dtype, r in rows:
        if r.error:
            lines.append(f"| {op} | {dtype} | {r.kernel} | {_tiles(r.constexprs)} | | | | | | | | | "
                         f"**not compiled**: {r.error} |")
            continue
        lines.append(f"| {op} | {dtype} | {r.kernel} | {_tiles(r.constexprs)} | {r.num_warps} | {r.num_stages} | "
                     f"{r.shared:,} | {r.regs} | {r.stack} | {r.spill} | {r.blocks_per_sm} | {r.mma} | {why(dtype, r)} |")
    lines += ["", "## CUDA kernels (csrc/cuda, nvcc -Xptxas -v, sm_90)", ""]
    if cuda is None:
        lines.append("nvcc was not found; no CUDA rows.")
    else:
        lines += ["| source | kernel | regs | static smem B | stack B | spill B |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {c['source']} | `{c['kernel']}` | {c['regs']} | {c['shared']} | {c['stack']} | {c['spill']} |"
                  for c in cuda]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="sm_90 compile report of every kernel at the benchmark sizes")
    parser.add_argument("--out", default=os.path.join(HERE, "SM90.md"))
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 on any problem")
    opts = parser.parse_args(argv)
    import triton

    rows = triton_rows()
    if opts.check:
        bad = [f"[{op} {dtype}] {p}" for op, dtype, r in rows for p in problems([r], check_spills=True)]
        print(f"triton {triton.__version__}: {len(rows)} kernel configurations at the benchmark sizes for sm_90, "
              f"{len(bad)} problems")
        for line in bad:
            print("  " + line)
        return 1 if bad else 0
    _write(opts.out, markdown(triton.__version__, rows, cuda_rows()))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
