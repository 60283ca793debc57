#!/usr/bin/env bash
# GPU check: one command on a CUDA machine (no network, nothing installed), under
# 8 minutes on one H200. Runs every Triton op's correctness tests on CUDA, then the
# kernel benchmarks at the sizes the issues name, and writes everything under $OUT
# (default bench/gpu_out). Run from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

python - <<'PY' | tee "$OUT/versions.txt"
import subprocess, torch, triton
print("date", subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown")
PY

# 1. correctness on CUDA (the same tests CI runs under the interpreter)
timeout 240 python -m pytest -q -x tests/test_triton_conv.py tests/test_triton_embedding.py \
    tests/test_triton_adaptive_softmax.py tests/test_ops_reference.py 2>&1 | tee "$OUT/tests.log"

# 2. benchmarks at the issues' target points (the full grids take longer than one lease)
bench() {  # name, pytest -k expression
    CPREC_BENCH_FULL=1 timeout 150 python -m pytest -q "bench/bench_$1.py" -k "$2" \
        --benchmark-json="$OUT/bench_$1.json" --benchmark-min-rounds=5 2>&1 | tail -3
}
bench conv "32768-256"
bench embedding "262144-1000000-256"
bench adaptive_softmax "32768-1000000"

# 3. whole models: training step and top-10 serving (V = 10k and 100k; 1M would not fit the lease)
CPREC_BENCH_FULL=1 timeout 200 python -m pytest -q -rs bench/bench_models.py -k "not 1000000 and not compile" \
    --benchmark-json="$OUT/models.json" 2>&1 | tail -5
python bench/make_report.py --from-json "$OUT/models.json" --out-dir "$OUT" || true

python bench/report.py "$OUT"/bench_*.json > "$OUT/table.md" 2>&1
cat "$OUT/table.md"
