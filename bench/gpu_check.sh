#!/usr/bin/env bash
# GPU check: one command on a CUDA machine (no network, nothing installed), under
# 10 minutes on one H200. Runs each op's correctness tests on CUDA (one pytest per file,
# so one failing op does not hide the others), builds the cuda backend in place and
# times it, runs the kernel benchmarks at the sizes the issues name, and sets each timed
# row beside the roofline model (bench/roofline.py). Everything goes under $OUT (default
# bench/gpu_out). Run from the repository root:  bash bench/gpu_check.sh
# Exit status: the number of failed steps (0: all passed).
set -uo pipefail
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
failed=0
step() {  # name, command...: runs it, logs to $OUT/<name>.log, counts a failure
    local name=$1; shift
    echo "== $name"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -3 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "!! $name failed (rc $rc, see $OUT/$name.log)"; failed=$((failed + 1)); }
}

python - <<'PY' | tee "$OUT/versions.txt"
import subprocess, torch, triton
print("date", subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown")
PY

# 1. correctness on CUDA (the tests CI runs under the interpreter), one op at a time
for t in test_conv test_embedding test_adaptive_softmax test_triton_precision; do
    step "$t" timeout 240 python -m pytest -q "tests/$t.py"
done

# 2. the cuda backend: build in place (nvcc, ninja), its tests, and its embedding timing
if command -v nvcc >/dev/null 2>&1; then
    step build_cuda timeout 420 python setup.py build_ext --inplace
    step test_cuda_backend timeout 180 python -m pytest -q tests/test_embedding.py -k cuda
    # bench_embedding's own steps (same ids, tables and sync), timed with triton's do_bench
    step time_cuda_embedding timeout 240 python - <<'PY'
import sys
sys.path.insert(0, "bench")
import torch
import triton.testing
from bench_embedding import ids_for, make_step
ids = ids_for(262144, 1_000_000)
for dtype in (torch.bfloat16, torch.float32):
    for backward in (False, True):
        for impl in ("cuda", "triton", "torch"):
            step, _ = make_step(impl, ids, 1_000_000, 256, dtype, backward)
            ms = triton.testing.do_bench(step)
            print(f"embedding N=262144 V=1M d=256 {dtype} {'fwd+bwd' if backward else 'fwd'} {impl}: {ms:.3f} ms")
PY
    cat "$OUT/time_cuda_embedding.log"
else
    echo "!! nvcc not found: the cuda backend is not built or timed"; failed=$((failed + 1))
fi

# 3. benchmarks at the issues' target points (the full grids take longer than one lease)
bench() {  # name, pytest -k expression
    CPREC_BENCH_FULL=1 step "bench_$1" timeout 150 python -m pytest -q "bench/bench_$1.py" -k "$2" \
        --benchmark-json="$OUT/bench_$1.json" --benchmark-min-rounds=5
}
bench conv "32768-256 or 32768-64"
bench embedding "262144-1000000-256"
bench adaptive_softmax "32768-1000000"

# 4. whole models: training step and top-10 serving (V = 10k and 100k; 1M would not fit the lease)
CPREC_BENCH_FULL=1 step models timeout 200 python -m pytest -q -rs bench/bench_models.py -k "not 1000000 and not compile" \
    --benchmark-json="$OUT/models.json"
python bench/make_report.py --from-json "$OUT/models.json" --out-dir "$OUT" || true

python bench/report.py "$OUT"/bench_*.json > "$OUT/table.md" 2>&1
cat "$OUT/table.md"
echo "== measured vs the roofline model (bench/roofline.py)"
python bench/roofline.py --measured "$OUT"/bench_*.json | tee "$OUT/roofline_vs_measured.md"
echo "== $failed failed step(s)"
exit "$failed"
