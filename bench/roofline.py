"""A roofline MODEL (not a measurement) of each op's forward on one H200 at the benchmark
sizes: HBM bytes and FLOPs of the fused Triton kernels and of the eager baseline's kernel
sequence, and the time each would take at the H200's rates.

Eager: the baseline runs under ``KernelCounter``, a dispatch mode that lists every aten
kernel with the bytes of its input and output tensors (views move nothing) and its
FLOPs from ``torch.utils.flop_counter``'s formulas. Conv rows run on meta tensors at the
full size; the embedding and adaptive-softmax baselines pick rows by id (data-dependent
shapes), so they run on CPU on the first 2,048 and 4,096 of the benchmark's Zipf ids and
each kernel's count is extrapolated linearly in N (these kernels' sizes are affine in N
at fixed cluster fractions; the prefixes' fractions stand in for the full sample's, so
eager and fused FLOPs differ by that sampling, under 1%). Counts are of float32 runs, float elements re-priced at the modelled dtype.
Fused: each kernel's compulsory traffic (inputs read once, outputs written once; tiles
re-read through L2 are free) and its GEMM FLOPs, in closed form.

Time per kernel = max(bytes / 4.3 TB/s, FLOPs / rate); rates: bf16 790 TFLOP/s (dense,
measured H200 matmul), float32 as eager runs it: TF32 494 TFLOP/s for cuDNN convolutions
(``torch.backends.cudnn.allow_tf32`` is True by default), and for the fused conv kernel,
which follows the same flag; FP32 67 TFLOP/s for matmuls (matmul precision "highest") and
for the fused embedding and adaptive-softmax kernels (IEEE, as eager's matmuls). Launch
overheads (~2-5 us per kernel) are left out, which flatters the eager sequences.
Rows wider than the fused conv's row tile (d = 1024 > 256) take its two-pass split: z is
parked in the output and read back by the same program, 2 B*T*d elements of L2 traffic
not counted here (a program's 64 rows are 128-256 KB, and all resident programs together
stay under the H200's 50 MB L2).

    python bench/roofline.py            # prints the markdown table
    python bench/roofline.py --write    # replaces the roofline section of bench/RESULTS.md
    python bench/roofline.py --measured OUT/bench_*.json   # measured (GPU JSON) vs predicted
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

HERE = os.path.dirname(os.path.abspath(__file__))
HBM = 4.3e12
RATES = {"bf16": 790e12, "tf32": 494e12, "fp32": 67e12}
SECTION = ("<!-- roofline:begin -->", "<!-- roofline:end -->")

CONV_B, CONV_T, CONV_K = 128, 256, 3
EMB_N, EMB_V, EMB_D, EMB_FRACTIONS = 262_144, 1_000_000, 256, (0.05, 0.2, 0.5)
ASM_N, ASM_V, ASM_D, ASM_FRACTIONS = 32_768, 1_000_000, 256, (0.02, 0.10, 0.35)
DIV = 4.0
SMALL_N = (2048, 4096)  # the two sizes of the extrapolated counts


@dataclass
class Kernel:
    name: str
    bytes: float
    flops: float
    conv: bool = False  # cuDNN convolution: TF32 in float32

    def seconds(self, dtype: str) -> float:
        rate = RATES["bf16"] if dtype == "bf16" else RATES["tf32" if self.conv else "fp32"]
        return max(self.bytes / HBM, self.flops / rate)


# --------------------------------------------------------------------------------------
# counting an eager function's kernels
# --------------------------------------------------------------------------------------
class KernelCounter(TorchDispatchMode):
    """Lists the aten kernels run inside it: bytes read + written (float elements priced at
    ``float_bytes`` each), FLOPs from torch's flop formulas. Views and metadata ops are free."""

    def __init__(self, float_bytes: int):
        super().__init__()
        self.float_bytes = float_bytes
        self.kernels: List[Kernel] = []

    def _bytes(self, tensors) -> float:
        seen, total = set(), 0.0
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                size = self.float_bytes if t.is_floating_point() else t.element_size()
                total += t.numel() * size
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket in _FREE:
            return out
        flops = 0
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.kernels.append(Kernel(str(packet).replace("aten.", ""), self._bytes(inputs) + self._bytes(outputs),
                                   flops, conv="convolution" in str(packet)))
        return out


# Allocation and metadata ops: no kernel reads or writes memory.
_FREE = {torch.ops.aten.detach, torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.lift_fresh,
         torch.ops.aten._local_scalar_dense, torch.ops.aten.alias}


def count(fn: Callable[[], object], float_bytes: int) -> List[Kernel]:
    with torch.no_grad(), KernelCounter(float_bytes) as counter:
        fn()
    return counter.kernels


def extrapolate(make: Callable[[torch.Tensor], Callable[[], object]], ids: torch.Tensor,
                float_bytes: int) -> List[Kernel]:
    """Kernels at len(ids) rows from counts on the first SMALL_N ids (same kernel sequence,
    affine in N; the prefixes' cluster fractions stand for the full sample's)."""
    n = ids.numel()
    (n1, n2), runs = SMALL_N, [count(make(ids[:m]), float_bytes) for m in SMALL_N]
    names = [[k.name for k in r] for r in runs]
    if names[0] != names[1]:
        raise RuntimeError("the eager kernel sequence changed with N; cannot extrapolate")
    scale = (n - n1) / (n2 - n1)
    return [Kernel(a.name, a.bytes + (b.bytes - a.bytes) * scale, a.flops + (b.flops - a.flops) * scale, a.conv)
            for a, b in zip(*runs)]


# --------------------------------------------------------------------------------------
# the ops: eager baseline and fused kernels
# --------------------------------------------------------------------------------------
def _zipf(n: int, vocab: int) -> torch.Tensor:
    sys.path.insert(0, HERE)
    from conftest import zipf_ids  # the benchmarks' id distribution
    return zipf_ids(n, vocab, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))


def _block_counts(ids: torch.Tensor, cutoffs: Sequence[int]) -> List[int]:
    edges = torch.tensor([0] + list(cutoffs))
    return torch.bucketize(ids, edges[1:], right=True).bincount(minlength=len(cutoffs)).tolist()


def conv_ln_relu(B: int, T: int, d: int, s: int) -> Tuple[Callable[[], object], List[Kernel]]:
    """Eager conv1d + LayerNorm + ReLU + residual (bench_conv's baseline) on meta tensors; fused: one kernel."""
    x, res = torch.empty(B, T, d, device="meta"), torch.empty(B, T, d, device="meta")
    w, vec = torch.empty(d, d, CONV_K, device="meta"), torch.empty(d, device="meta")

    def eager():
        z = F.conv1d(F.pad(x.transpose(1, 2), ((CONV_K - 1), 0)), w, vec).transpose(1, 2)
        return torch.relu(F.layer_norm(z, (d,), vec, vec, 1e-8)) + res

    flops = 2 * B * T * d * d * CONV_K
    fused = Kernel("_conv_ln_relu_fwd_kernel", (3 * B * T * d + d * d * CONV_K + 3 * d) * s + 2 * B * T * 4, flops,
                   conv=True)
    return eager, [fused]


def embedding(ids: torch.Tensor, s: int):
    """ids: [N]. Eager: the reference block loop (the benchmark's ``torch`` row); fused: one kernel."""
    from cprec_kernels import reference
    from cprec_kernels.nn import block_width

    cuts = [int(EMB_V * f) for f in EMB_FRACTIONS] + [EMB_V]
    edges = [0] + cuts
    widths = [block_width(EMB_D, DIV, j) for j in range(len(cuts))]
    n = ids.numel()
    tables = [torch.zeros(hi - lo, w) for lo, hi, w in zip(edges[:-1], edges[1:], widths)]
    projs = [None] + [torch.zeros(EMB_D, w) for w in widths[1:]]
    counts = _block_counts(ids, cuts)
    flops = sum(2 * c * EMB_D * w for c, w, p in zip(counts, widths, projs) if p is not None)
    read = sum(c * w for c, w in zip(counts, widths)) + sum(EMB_D * w for w, p in zip(widths, projs) if p is not None)
    fused = Kernel("_forward_kernel", n * 8 + (read + n * EMB_D) * s, flops)
    return (lambda: reference.blockwise_embedding_forward(ids, tables, projs, cuts, None)), [fused]


def adaptive_loss(target: torch.Tensor, s: int):
    """target: [N]. Eager: torch.nn.AdaptiveLogSoftmaxWithLoss (the benchmark's ``nn_adaptive`` row);
    fused: the head and each tail's projection and log-sum-exp kernels."""
    from cprec_kernels.nn import AdaptiveSoftmax

    cuts = [int(ASM_V * f) for f in ASM_FRACTIONS] + [ASM_V]
    torch.manual_seed(0)
    module = AdaptiveSoftmax(ASM_D, cuts, DIV).to_torch()
    n = target.numel()
    hidden = torch.zeros(n, ASM_D)
    counts = _block_counts(target, cuts)
    head = cuts[0] + len(cuts) - 1
    kernels = [Kernel("_lse_kernel head", (n * ASM_D + head * ASM_D) * s + n * 8, 2 * n * ASM_D * head)]
    for j, (c, lo, hi) in enumerate(zip(counts[1:], cuts[:-1], cuts[1:]), start=1):
        w = int(ASM_D // DIV**j)
        kernels += [Kernel(f"_rows_matmul_kernel tail {j}", (c * ASM_D + w * ASM_D) * s + c * w * 4 + c * 8,
                           2 * c * ASM_D * w),
                    Kernel(f"_lse_kernel tail {j}", c * w * 4 + (hi - lo) * w * s + c * 8 * 2, 2 * c * w * (hi - lo))]
    return (lambda: module(hidden, target)), kernels


def rows() -> List[Dict[str, object]]:
    """One dict per (op, dtype): fused and eager kernels at the benchmark sizes."""
    out = []
    for dtype, s in (("bf16", 2), ("fp32", 4)):
        for d in (64, 256, 1024):
            eager, fused = conv_ln_relu(CONV_B, CONV_T, d, s)
            out.append(dict(op="conv+LN+ReLU fwd", sizes=f"B*T={CONV_B * CONV_T} d={d} K={CONV_K}", dtype=dtype,
                            fused=fused, eager=count(eager, s),
                            bench=dict(op="causal_conv1d_ln_relu", passes="fwd", tokens=CONV_B * CONV_T, d=d)))
        ids = _zipf(EMB_N, EMB_V)
        out.append(dict(op="block-wise embedding fwd", sizes=f"N={EMB_N} V=1M d={EMB_D}", dtype=dtype,
                        fused=embedding(ids, s)[1], eager=extrapolate(lambda i: embedding(i, s)[0], ids, s),
                        bench=dict(op="blockwise_embedding", mode="forward", tokens=EMB_N, vocab=EMB_V, d=EMB_D)))
        # The loss benchmark times forward+backward; this forward-only row has no measured twin.
        target = _zipf(ASM_N, ASM_V)
        out.append(dict(op="adaptive softmax loss fwd", sizes=f"N={ASM_N} V=1M d={ASM_D}", dtype=dtype,
                        fused=adaptive_loss(target, s)[1],
                        eager=extrapolate(lambda t: adaptive_loss(t, s)[0], target, s),
                        bench=dict(op="adaptive_softmax_loss", mode="forward", rows=ASM_N, vocab=ASM_V)))
    return out


def _total(kernels: List[Kernel], dtype: str) -> Tuple[float, float, float]:
    return (sum(k.bytes for k in kernels), sum(k.flops for k in kernels), sum(k.seconds(dtype) for k in kernels))


def table(model: List[Dict[str, object]]) -> str:
    lines = [
        "### Roofline model of the H200 (a MODEL, not a measurement)",
        "",
        "Written by `python bench/roofline.py --write`; see its docstring for the counting. Per kernel "
        "max(bytes / 4.3 TB/s, FLOPs / rate), bf16 790 TFLOP/s, float32 TF32 494 (cuDNN conv and the "
        "fused conv, both following `cudnn.allow_tf32`) or FP32 67 TFLOP/s; launch overheads left out.",
        "",
        "| op | sizes | dtype | fused MB | fused GFLOP | fused us | eager kernels | eager MB | eager GFLOP | "
        "eager us | predicted speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in model:
        fb, ff, ft = _total(r["fused"], r["dtype"])
        eb, ef, et = _total(r["eager"], r["dtype"])
        lines.append(f"| {r['op']} | {r['sizes']} | {r['dtype']} | {fb / 1e6:,.1f} | {ff / 1e9:,.1f} | "
                     f"{ft * 1e6:,.1f} | {len(r['eager'])} | {eb / 1e6:,.1f} | {ef / 1e9:,.1f} | {et * 1e6:,.1f} | "
                     f"{et / ft:.2f}x |")
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """Replace (or append) the marked roofline section of RESULTS.md, atomically."""
    with open(path) as f:
        doc = f.read()
    block = f"{SECTION[0]}\n{text}{SECTION[1]}\n"
    if SECTION[0] in doc:
        head, rest = doc.split(SECTION[0], 1)
        doc = head + block + rest.split(SECTION[1], 1)[1].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    with open(path + ".tmp", "w") as f:
        f.write(doc)
    os.replace(path + ".tmp", path)


def measured_vs_predicted(paths: Sequence[str], model: List[Dict[str, object]]) -> str:
    """Triton rows of GPU benchmark JSON files beside the model's fused time for the same op."""
    dtypes = {"bfloat16": "bf16", "float32": "fp32"}
    lines = ["| benchmark | backend | measured us | model us (fused if triton/cuda, else eager) | measured / model |",
             "|---|---|---:|---:|---:|"]
    for path in paths:
        with open(path) as f:
            benches = json.load(f)["benchmarks"]
        for b in benches:
            info = b.get("extra_info", {})
            r = next((r for r in model if r["dtype"] == dtypes.get(info.get("dtype"))
                      and all(info.get(k) == v for k, v in r["bench"].items())), None)
            if r is None:
                continue
            kernels = r["fused"] if info.get("backend") in ("triton", "cuda") else r["eager"]
            got, pred = b["stats"]["median"] * 1e6, _total(kernels, r["dtype"])[2] * 1e6
            lines.append(f"| {b['name']} | {info.get('backend')} | {got:,.1f} | {pred:,.1f} | {got / pred:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="roofline model of the H200 (a model, not a measurement)")
    parser.add_argument("--write", action="store_true", help="replace the roofline section of bench/RESULTS.md")
    parser.add_argument("--measured", nargs="*", help="GPU benchmark JSON files to set beside the model")
    opts = parser.parse_args(argv)
    model = rows()
    if opts.measured:
        print(measured_vs_predicted(opts.measured, model))
        return 0
    text = table(model)
    if opts.write:
        write_section(os.path.join(HERE, "RESULTS.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
