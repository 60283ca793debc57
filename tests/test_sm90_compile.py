"""The sm_90 compile tooling (bench/sm90_compile.py): occupancy and listing parsers, and,
in subprocesses without the interpreter, compiling launches for cuda:90 on this CPU
machine with Triton's own ptxas: through a launcher, and by recording then replaying.
.ci/run does the full check (every launch of the suite, triton 3.6 and this one)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import source_tree_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON36 = os.path.join(ROOT, ".ci", "triton36")
spec = importlib.util.spec_from_file_location("sm90_compile", os.path.join(ROOT, "bench", "sm90_compile.py"))
sm90 = sys.modules["sm90_compile"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(sm90)

# A two-block embedding forward (the launch triton 3.6 once failed to compile), bfloat16,
# through the triton backend's launcher; prints the Compiled rows as JSON.
COMPILE_EMBEDDING = """
import dataclasses, json, sys, torch
sys.path.insert(0, "bench")
from sm90_compile import compiling_for_sm90
from cprec_kernels.embedding import triton as embedding
dt = torch.bfloat16
weights = [torch.empty(70, 48, dtype=dt), torch.empty(130, 16, dtype=dt), torch.empty(300, 16, dtype=dt)]
projections = [None, torch.empty(48, 16, dtype=dt), torch.empty(48, 16, dtype=dt)]
with compiling_for_sm90() as rows:
    embedding.blockwise_embedding_forward(torch.randint(0, 500, (300,)), weights, projections, [70, 200, 500], None)
print(json.dumps([dataclasses.asdict(r) for r in rows]))
"""


def _python(code_or_args, triton_dir=None, interpret=False):
    """Run python from the repository root; compiling needs TRITON_INTERPRET off."""
    env = source_tree_env()
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join([triton_dir, env["PYTHONPATH"]])
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_blocks_per_sm_takes_the_tightest_h200_limit():
    # 4 warps x 128 registers: 16 KB of registers per block -> 4 blocks of the 64 K.
    assert sm90.Compiled("k", num_warps=4, regs=128).blocks_per_sm == 4
    # 255 registers round up to 256 per thread: 8 warps fill the register file.
    assert sm90.Compiled("k", num_warps=8, regs=255).blocks_per_sm == 1
    # Shared memory: 228 KB / (100 KB + 1 KB reserved) -> 2.
    assert sm90.Compiled("k", num_warps=4, regs=32, shared=100 * 1024).blocks_per_sm == 2
    # Threads: 2048 / 32 = 64 blocks of one warp, capped at 32 blocks.
    assert sm90.Compiled("k", num_warps=1, regs=16).blocks_per_sm == 32


def test_mma_class_reads_the_instruction_family():
    assert sm90.mma_class("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert sm90.mma_class("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma.sync"
    assert sm90.mma_class("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_problems_name_the_kernel():
    rows = [sm90.Compiled("_ok", num_warps=4, regs=64, mma="wgmma", half_dot=True, constexprs={"BLOCK": 64}),
            sm90.Compiled("_spills", num_warps=8, regs=255, stack=760, spill=728),
            sm90.Compiled("_fma", num_warps=4, regs=64, half_dot=True),
            sm90.Compiled("_big", num_warps=4, regs=64, shared=240 * 1024),
            sm90.Compiled("_broken", error="RuntimeError: PassManager::run failed")]
    found = sm90.problems(rows, check_spills=True)
    assert [line.split()[0] for line in found] == ["_spills", "_fma", "_big", "_broken"]
    assert not any(line.startswith("_spills") for line in sm90.problems(rows, check_spills=False))


@pytest.mark.parametrize("triton_dir", [None, TRITON36], ids=["this_triton", "triton36"])
def test_embedding_forward_compiles_for_sm90_through_its_launcher(triton_dir):
    if triton_dir and not os.path.isdir(os.path.join(triton_dir, "triton")):
        pytest.skip(".ci/triton36 is absent (.ci/run installs it)")
    rows = json.loads(_python(COMPILE_EMBEDDING, triton_dir).strip().splitlines()[-1])
    assert len(rows) == 1 and rows[0]["kernel"] == "_forward_kernel"
    row = rows[0]
    assert row["error"] is None
    assert row["constexprs"]["NUM_BLOCKS"] == 3 and row["constexprs"]["H1"] is True
    assert row["half_dot"] and row["mma"] in ("wgmma", "mma.sync")
    assert row["regs"] > 0 and row["shared"] > 0


def test_recorded_launches_replay_for_sm90(tmp_path):
    launches = tmp_path / "launches.jsonl"
    run_op = ("import torch, cprec_kernels as ck\n"
              "x = torch.randn(2, 5, 16, dtype=torch.bfloat16)\n"
              "w = torch.randn(16, 16, 3, dtype=torch.bfloat16)\n"
              "import runpy; runpy.run_path('bench/sm90_compile.py')['record_launches']('%s')\n"
              "ck.causal_conv1d(x, w, None, dilation=2, backend='triton')\n" % launches)
    _python(run_op, interpret=True)
    recorded = [json.loads(line) for line in launches.read_text().splitlines()]
    assert [r["kernel"] for r in recorded] == ["_shifted_gemm_kernel"]
    assert recorded[0]["args"]["MMA"] == "upcast"  # the interpreter's bfloat16 mode...
    out = _python(["bench/sm90_compile.py", "replay", str(launches)])
    assert "1 recorded launch specs compiled for sm_90, 0 problems" in out  # ...compiled as CUDA's


def test_launchers_choose_the_cuda_precision_mode_when_compiling():
    # Compiling for sm_90 from CPU tensors, a launcher must pick the mode (and so the
    # tiles) a CUDA tensor gets under torch's flags: conv float32 follows cudnn.allow_tf32.
    import torch
    from cprec_kernels.adaptive_softmax import triton as asm
    from cprec_kernels.conv import triton as conv

    x32, xbf = torch.empty(2, dtype=torch.float32), torch.empty(2, dtype=torch.bfloat16)
    saved = torch.backends.cudnn.allow_tf32
    try:
        for allow in (True, False):
            torch.backends.cudnn.allow_tf32 = allow
            with sm90._modes_as_on_cuda():
                assert conv._mma_mode(x32, "conv") == ("tf32" if allow else "ieee")
                assert asm._mma_mode(x32) == "ieee"  # matmul precision "highest"
                assert conv._mma_mode(xbf, "conv") != "upcast"
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert conv._mma_mode(x32, "conv") == "ieee" and conv._mma_mode(xbf, "conv") == "upcast"  # restored
