"""Pieces every Triton kernel module shares: the matrix-multiply-accumulate that copes
with float64 and with the interpreter, its mode from the inputs, and block sizing."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, MMA: tl.constexpr):
    """acc + a @ b.  a: [P, R], b: [R, Q], acc: [P, Q]; every dim >= 16 for tl.dot.

    MMA "ieee"/"tf32": tl.dot in a's dtype with that fp32 input precision (ignored for
    half types); "f64": a broadcast product reduced over R (small blocks), since
    tl.dot has no float64; "upcast": tl.dot of fp32 copies, for bfloat16 under the
    interpreter, whose bfloat16 dot multiplies raw bit patterns
    (triton-lang/triton#11584). Products of half types are exact in fp32, so this is
    the GPU's arithmetic.
    """
    if MMA == "f64":
        acc += tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    elif MMA == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=MMA)
    return acc


def mma_mode(t: torch.Tensor) -> str:
    """The ``MMA`` constexpr of ``mma`` for inputs like ``t``."""
    if t.dtype == torch.float64:
        return "f64"
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return "upcast"
    # float32 follows torch's matmul precision (default "highest": IEEE, no TF32).
    if t.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def pow2(n: int, lo: int, hi: int) -> int:
    """Next power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))
