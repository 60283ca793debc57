"""Compile Triton kernel launches for an H200 (target cuda:90) on a machine without a GPU,
and read what they compile to.

Two ways in, both through ``JITFunction.run``, so every kernel is compiled exactly as a
launcher configures it (constexprs, num_warps, num_stages, pointer alignment):
  ``compiling_for_sm90()``: a context in which Triton's active driver is a stand-in
    that reports target cuda:90, and a kernel call ``kernel[grid](...)`` compiles and
    returns without launching. Call the backends' launchers with CPU tensors
    (``torch.empty`` for big sizes: pages never touched) and collect ``Compiled`` rows.
  ``record_launches(path)`` / ``replay(path)``: under the interpreter (the test suite),
    every launch's spec (kernel, argument dtypes/alignment/values, constexprs) is
    recorded; ``replay`` recompiles each distinct spec for cuda:90 in a process without
    ``TRITON_INTERPRET``.

``mma_mode`` (``_triton_common``) answers for the CPU tensors what it answers for CUDA
ones under torch's flags (float32 conv: TF32 while ``cudnn.allow_tf32``, its default;
float32 matmul: IEEE at the default precision "highest"), so launchers choose the tiles
of the GPU's mode. Replayed specs carry the interpreter's mode: its bfloat16-only
``"upcast"`` is swapped for the CUDA one; float32 specs keep IEEE (what the GPU runs
with TF32 switched off). Kernel launches do not run: launchers that read a result back between
launches see uninitialised memory, which only matters if they index with it.

Works with triton 3.6 (the H200 machine) and 3.9. CLI:
    python bench/sm90_compile.py replay LAUNCHES.jsonl [--max-shared BYTES]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional

import torch

# H200 (sm_90) per-SM limits; the shared-memory figure per block is the opt-in maximum.
H200 = dict(regs_per_sm=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, threads_per_sm=2048,
            blocks_per_sm=32, reg_unit=256, smem_reserved_per_block=1024)
RECORD_ENV = "CPREC_RECORD_LAUNCHES"
_UPCAST = "upcast"  # _common.mma_mode's interpreter-only bfloat16 mode


@dataclasses.dataclass
class Compiled:
    """What one kernel launch compiled to for sm_90."""
    kernel: str
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0  # bytes of shared memory per block
    regs: int = 0  # registers per thread
    stack: int = 0  # bytes of stack frame per thread (cuobjdump)
    spill: int = 0  # bytes of spill stores per thread (ptxas -v), checked only where stack > 0
    mma: str = "none"  # wgmma | mma.sync | none
    calls_dot: bool = False  # the Triton IR has a tt.dot
    half_dot: bool = False  # ... with bfloat16/float16 operands (must reach tensor cores)
    constexprs: Dict[str, object] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM on an H200 (registers, shared memory, threads, block cap)."""
        threads = self.num_warps * 32
        by_threads = H200["threads_per_sm"] // max(threads, 1)
        regs_per_warp = -(-max(self.regs, 1) * 32 // H200["reg_unit"]) * H200["reg_unit"]
        by_regs = (H200["regs_per_sm"] // regs_per_warp) // max(self.num_warps, 1)
        by_smem = H200["smem_per_sm"] // (self.shared + H200["smem_reserved_per_block"])
        return min(by_threads, by_regs, by_smem, H200["blocks_per_sm"])


# --------------------------------------------------------------------------------------
# reading a compiled kernel
# --------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    """A CUDA binary shipped in the imported Triton's wheel (so 3.6 reads its own cubins)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def mma_class(ptx: str) -> str:
    """The tensor-core instruction family in a PTX listing."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """{"regs", "stack", "local"} of the (single) function in a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(f.name)
    found = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return {"regs": found.get("reg", 0), "stack": max(found.get("stack", 0), found.get("local", 0))}


def spill_bytes(ptx: str, arch: int = 90) -> int:
    """Spill stores per thread that ptxas -v reports for a PTX listing, with the ptxas and
    the register-allocation flag Triton itself uses for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas, get_ptxas_version

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    # Triton >= 3.7 passes this to ptxas 13 (a register-allocation bug workaround).
    extra = ["--regAllocOptLevel=2"] if "release 13" in get_ptxas_version(arch) else []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "-lineinfo", *extra, f"--gpu-name={target}", src, "-o",
                              os.path.join(tmp, "k.cubin")], check=True, capture_output=True, text=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def describe(name: str, kernel, constexprs: Dict[str, object]) -> Compiled:
    """A ``Compiled`` row from Triton's CompiledKernel."""
    usage = resource_usage(kernel.asm["cubin"])
    # A stack frame is where spills go; ptxas -v (slow, so only then) says how much is spill.
    spill = spill_bytes(kernel.asm["ptx"]) if usage["stack"] else 0
    return Compiled(
        kernel=name, num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
        shared=kernel.metadata.shared, regs=usage["regs"], stack=usage["stack"], spill=spill,
        mma=mma_class(kernel.asm["ptx"]),
        calls_dot=bool(re.search(r"\btt\.dot\b", kernel.asm["ttir"])),
        half_dot=bool(re.search(r"\btt\.dot\b.*: tensor<[0-9x]+x(bf16|f16)>", kernel.asm["ttir"])),
        constexprs=constexprs,
    )


# --------------------------------------------------------------------------------------
# the stand-in driver
# --------------------------------------------------------------------------------------
class _StandInDriver:
    """Triton's driver interface as JITFunction.run uses it, for a device that is never touched."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


def _device_mode(value):
    """The constexpr a CUDA tensor would get where the interpreter got ``"upcast"``
    (replayed specs; the report's launchers already choose the CUDA mode, see below)."""
    if value != _UPCAST:
        return value
    from cprec_kernels._triton_common import mma_mode
    return mma_mode(SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda")))


@contextlib.contextmanager
def _modes_as_on_cuda() -> Iterator[None]:
    """Within: every kernel module's ``mma_mode`` answers for CPU tensors what it answers
    for CUDA ones under torch's current flags (by default conv float32 -> TF32, matmul
    float32 -> IEEE, half types -> tensor cores), so a launcher picks the tiles of that
    mode too, as it would on the GPU. Modules bind it by name at import: rebind each."""
    from cprec_kernels import _triton_common

    original = _triton_common.mma_mode

    def on_cuda(t, kind: str = "matmul") -> str:
        return original(SimpleNamespace(dtype=t.dtype, device=torch.device("cuda")), kind)

    bound = [(m, name) for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("cprec_kernels")
             for name, value in vars(m).items() if value is original]
    for m, name in bound:
        setattr(m, name, on_cuda)
    try:
        yield
    finally:
        for m, name in bound:
            setattr(m, name, original)


@contextlib.contextmanager
def compiling_for_sm90(arch: int = 90) -> Iterator[List[Compiled]]:
    """Within: Triton kernel calls compile for cuda:<arch> and return without launching;
    the yielded list gets one ``Compiled`` per call (compile errors are recorded, not raised)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for sm_90 needs a process without TRITON_INTERPRET=1")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    rows: List[Compiled] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kwargs = {k: _device_mode(v) for k, v in kwargs.items()}
        constexprs = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
        try:
            # warmup=True: JITFunction.run compiles (or finds the cached kernel) and stops
            # before the launch, so no launcher or device handle is ever needed.
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            rows.append(describe(self.fn.__name__, kernel, constexprs))
        except Exception as err:  # noqa: BLE001 - a compile failure is a result here
            rows.append(Compiled(kernel=self.fn.__name__, constexprs=constexprs,
                                 error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"))
        return None

    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run
    try:
        with _modes_as_on_cuda():
            yield rows
    finally:
        JITFunction.run = original
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)


# --------------------------------------------------------------------------------------
# recording (under the interpreter) and replay (compiled)
# --------------------------------------------------------------------------------------
def _arg_spec(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # Recording must never break a test: replay reports this spec as not compilable.
    return {"unsupported": type(value).__name__}


def _spec(fn, args, kwargs) -> str:
    names = list(inspect.signature(fn).parameters)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return json.dumps({"module": fn.__module__, "kernel": fn.__name__,
                       "args": {k: _arg_spec(v) for k, v in bound.items()}}, sort_keys=True)


def record_launches(path: str) -> None:
    """Record every distinct interpreted Triton launch of this process into ``path``
    (JSON lines, appended at exit, so several processes can share one file)."""
    from triton.runtime.interpreter import InterpretedFunction

    specs = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        specs.add(_spec(self.fn, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    def flush():
        # One append of whole lines: concurrent writers' lines never interleave mid-line.
        with open(path, "a") as f:
            f.write("".join(s + "\n" for s in sorted(specs)))

    InterpretedFunction.run = run
    atexit.register(flush)


def _rebuild(spec):
    if isinstance(spec, dict) and "unsupported" in spec:
        raise TypeError(f"the recorder cannot rebuild a {spec['unsupported']} argument")
    if isinstance(spec, dict):
        t = torch.empty(64, dtype=getattr(torch, spec["tensor"]))
        # Only alignment (multiple of 16 bytes or not) specialises a pointer argument.
        return t if spec["aligned"] else t[1:]
    return spec


def replay(path: str) -> List[Compiled]:
    """Compile every distinct spec recorded in ``path`` for sm_90."""
    with open(path) as f:
        specs = sorted({line.strip() for line in f if line.strip()})
    with compiling_for_sm90() as rows:
        for line in specs:
            spec = json.loads(line)
            try:
                kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
                args = {k: _rebuild(v) for k, v in spec["args"].items()}
            except (ImportError, AttributeError, TypeError) as err:  # a kernel renamed or moved since
                rows.append(Compiled(kernel=spec["kernel"], error=f"cannot replay: {err}"))
                continue
            kernel[(1,)](**args)
    return rows


def problems(rows: List[Compiled], check_spills: bool) -> List[str]:
    """Why each row would fail on an H200: compile error, shared memory over the limit,
    a spill (when asked), a bfloat16/float16 tl.dot not on tensor cores."""
    found = []
    for r in rows:
        where = f"{r.kernel} {_short(r.constexprs)}"
        if r.error:
            found.append(f"{where}: compile error: {r.error}")
            continue
        if r.shared > H200["smem_per_block"]:
            found.append(f"{where}: {r.shared} B shared memory > {H200['smem_per_block']} B per block on H200")
        if check_spills and r.spill:
            found.append(f"{where}: spills {r.spill} B per thread ({r.regs} registers, {r.stack} B stack)")
        if r.half_dot and r.mma == "none":
            found.append(f"{where}: a bfloat16/float16 tl.dot lowers to FMA, not tensor-core MMA")
    return found


def _short(constexprs) -> str:
    # Constexprs are upper case by this project's convention; replayed specs also hold runtime ints.
    return " ".join(f"{k}={v}" for k, v in constexprs.items() if k.upper() == k)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["replay"])
    parser.add_argument("launches")
    opts = parser.parse_args(argv)
    import triton
    rows = replay(opts.launches)
    bad = problems(rows, check_spills=False)
    print(f"triton {triton.__version__}: {len(rows)} recorded launch specs compiled for sm_90, {len(bad)} problems")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main())
