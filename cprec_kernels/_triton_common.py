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


def fp32_precision(kind: str) -> str:
    """``input_precision`` of a float32 ``tl.dot`` that matches what eager torch does on
    CUDA for the same op: "tf32" or "ieee".

    kind "conv": cuDNN's flag ``torch.backends.cudnn.allow_tf32`` (True by default), as
    ``F.conv1d`` follows it; kind "matmul": ``torch.get_float32_matmul_precision()``
    (which ``torch.backends.cuda.matmul.allow_tf32`` sets; default "highest": IEEE).
    """
    if kind == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    if kind == "matmul":
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    raise ValueError(f"kind must be 'conv' or 'matmul', got {kind!r}")


def mma_mode(t: torch.Tensor, kind: str = "matmul") -> str:
    """The ``MMA`` constexpr of ``mma`` for inputs like ``t`` of an op of ``kind``
    ("conv" or "matmul", see ``fp32_precision``)."""
    if t.dtype == torch.float64:
        return "f64"
    if t.device.type != "cuda":
        # The interpreter: bfloat16 needs the fp32 dot, and float32 stays exact (IEEE)
        # so CPU checks against the float64 definition keep tight tolerances.
        return "upcast" if t.dtype == torch.bfloat16 else "ieee"
    return fp32_precision(kind) if t.dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int, hi: int) -> int:
    """Next power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))
