"""Whole models: one training step and one top-10 serving request, NextItNet vs CpRec.

Rows (``impl``):

- ``nextitnet_eager``: NextItNet (full embedding, full softmax), ``backend="torch"``;
  the baseline of every ratio;
- ``cprec_eager``: CpRec on the eager reference (``backend="torch"``);
- ``cprec_cpu`` / ``cprec_triton`` / ``cprec_cuda``: CpRec on each fused backend the
  device has (cpu on CPU; triton and cuda on CUDA);
- ``cprec_compile``: ``torch.compile`` (mode default) of the eager CpRec: its ``loss``
  for training (the optimizer stays eager), its ``recommend`` for serving. Full grid only.

Modes: ``train_step`` (zero_grad, forward, loss over all T positions, backward, AdamW
step; every row uses ``cprec train``'s AdamW, ``cprec.optim.make_adamw``: fused where torch
fuses it) on a batch of B sequences; ``serve_top10`` (``model.recommend(inputs, 10)`` under
``torch.no_grad``) for a batch of 1 and of many users. Item ids are Zipf-distributed.

    pytest bench/bench_models.py                      # small grid, seconds (CI)
    CPREC_BENCH_FULL=1 pytest bench/bench_models.py   # d 256, 8 blocks, T 50, V 10k..1M
    python bench/make_report.py                       # full grid -> bench/RESULTS.md + plots

``CPREC_BENCH_THREADS=N`` sets ``torch.set_num_threads(N)`` first (make_report uses 1
on a shared CPU: two OpenMP threads competing with another job's spin 10-40x slower).

Each row's ``extra_info`` names model, backend, device, dtype and sizes, and holds
``tokens_per_s`` (B * T / median), ``state_bytes`` (parameters, plus grads and the two
AdamW moments when training) and ``peak_memory_bytes``: on CUDA
``torch.cuda.max_memory_allocated`` over the timed calls (absolute: weights and
optimizer state included); on CPU the growth of the peak resident set during one extra
untimed call over the resident set before it, with glibc's mmap threshold pinned at
64 KiB for that call so that tensors get fresh pages (``cpu_peak_growth``): the
call's working memory (activations, grads, logits), weights and AdamW state excluded;
None where Linux's /proc or glibc cannot be used.
"""
import ctypes
import gc
import math
import os
import time

import pytest
import torch
from conftest import DEVICE, FULL, sizes, sync, zipf_ids

from cprec.models import CpRec, NextItNet
from cprec.optim import make_adamw
from cprec_kernels.adaptive_softmax import ADAPTIVE_SOFTMAX_LOSS, ADAPTIVE_TOPK
from cprec_kernels.conv import CAUSAL_CONV1D_LN_RELU
from cprec_kernels.embedding import BLOCKWISE_EMBEDDING
from cprec_kernels.testing import cutoffs_for as cutoffs_at

if os.environ.get("CPREC_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CPREC_BENCH_THREADS"]))

D = sizes(32, 256)
DILATIONS = sizes([1, 2], [1, 2, 4, 8, 1, 2, 4, 8])
SEQ_LEN = sizes(10, 50)
BATCHES = sizes([4], [128] if DEVICE.type == "cuda" else [16, 64])  # training sequences per step
USERS = sizes([1, 4], [1, 256] if DEVICE.type == "cuda" else [1, 32])
VOCABS = sizes([2000], [10_000, 100_000, 1_000_000])
CUT_FRACTIONS = (0.02, 0.10, 0.35)
DIV = 4.0
TOPK = 10
DTYPE = torch.float32
IMPLS = ["nextitnet_eager", "cprec_eager", "cprec_cpu", "cprec_triton", "cprec_cuda", "cprec_compile"]
# Seconds of timed calls a row aims for (at least MIN_ROUNDS calls, at most MAX_ROUNDS).
ROUND_BUDGET_S = sizes(0.3, 8.0)
MIN_ROUNDS, MAX_ROUNDS = sizes(3, 5), sizes(5, 40)


# The ops CpRec's training step and top-k call on a fused backend.
CPREC_OPS = (CAUSAL_CONV1D_LN_RELU, BLOCKWISE_EMBEDDING, ADAPTIVE_SOFTMAX_LOSS, ADAPTIVE_TOPK)


def cutoffs_for(vocab: int) -> list:
    return cutoffs_at(vocab, CUT_FRACTIONS)


def model_and_backend(impl: str):
    """impl -> (model name, backend, compiled)."""
    model, _, kind = impl.partition("_")
    if kind == "eager":
        return model, "torch", False
    if kind == "compile":
        return model, "torch", True
    return model, kind, False


def skip_unless_runnable(impl: str, mode: str, vocab: int, batch: int) -> None:
    model, backend, compiled = model_and_backend(impl)
    if backend in ("triton", "cuda") and DEVICE.type != "cuda":
        why = " (the Triton interpreter is not timed)" if backend == "triton" else ""
        pytest.skip(f"backend {backend!r} needs a CUDA device{why}")
    if backend != "torch":
        for table in CPREC_OPS:
            try:
                table.resolve(backend, DEVICE, DTYPE)
            except RuntimeError as err:
                pytest.skip(f"backend {backend!r} cannot run CpRec on {DEVICE}: {err}")
    if compiled and not FULL:
        pytest.skip("torch.compile rows run in the full grid only (compiling takes longer than the small grid)")
    if model == "nextitnet" and DEVICE.type == "cpu" and mode == "train_step" and vocab >= 1_000_000:
        state = 4 * (2 * vocab * D) * 4  # embedding + output layer: weights, grads, 2 AdamW moments
        logits = 3 * batch * SEQ_LEN * vocab * 4  # [B*T, V] logits, log-softmax, grad
        pytest.skip(f"NextItNet training at V = {vocab} on CPU: ~{state / 2**30:.0f} GiB of weights, grads and "
                    f"AdamW state plus ~{logits / 2**30:.0f} GiB of [B*T, V] logits and grads, and a probe step "
                    "took about a minute on the 2-core machine: beyond the CPU run's budget")
    if model == "nextitnet" and DEVICE.type == "cuda":
        # logits, their log-softmax and grads ([N, V] fp32 each) plus weights and AdamW state
        need = 12 * batch * SEQ_LEN * vocab + 16 * 2 * vocab * D
        if need > 0.8 * torch.cuda.get_device_properties(DEVICE).total_memory:
            pytest.skip(f"NextItNet at V = {vocab} needs ~{need / 2**30:.0f} GiB")


def build(impl: str, vocab: int) -> torch.nn.Module:
    model, backend, _ = model_and_backend(impl)
    torch.manual_seed(0)
    if model == "nextitnet":
        net = NextItNet(vocab, d=D, block_dilations=DILATIONS, backend=backend)
    else:
        net = CpRec(vocab, cutoffs_for(vocab), d=D, block_dilations=DILATIONS, div_value=DIV, backend=backend)
    return net.to(DEVICE, DTYPE)


def sequences(batch: int, vocab: int) -> torch.Tensor:
    """Zipf item ids [batch, T + 1] on DEVICE (inputs: [:, :-1], next items: [:, 1:])."""
    g = torch.Generator().manual_seed(0)
    return zipf_ids(batch * (SEQ_LEN + 1), vocab, device=DEVICE, generator=g).view(batch, SEQ_LEN + 1)


def compiled(fn):
    """torch.compile(fn) (mode default) on a fresh dynamo cache, so rows do not share guards."""
    torch._dynamo.reset()
    return torch.compile(fn)


# --------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------
def _proc_status_kb(field: str):
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _mallopt(value: int) -> bool:
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, value))


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # hand the heap's free pages back to the OS


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one
        return True
    except OSError:
        return False


def cpu_peak_growth(step):
    """Peak resident-set growth of one untimed call of ``step``, in bytes (None where
    Linux's /proc or glibc's mallopt is missing).

    Before the call ``malloc_trim(0)`` returns the heap's free pages to the OS and
    glibc's mmap threshold is pinned at 64 KiB, so the tensors the call allocates get
    fresh pages, whether from the heap or from mmap; the growth of VmHWM over VmRSS
    then counts what is live at the peak (to within partly used heap pages). The
    threshold is left at glibc's 32 MiB maximum afterwards, where its dynamic rule
    settles anyway once large blocks have been freed."""
    if not _mallopt(64 * 1024):
        return None
    try:
        gc.collect()
        _malloc_trim()
        if not _reset_peak_rss():
            return None
        base = _proc_status_kb("VmRSS")
        step()
        peak = _proc_status_kb("VmHWM")
    finally:
        _mallopt(32 * 2**20)
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def warm_up(step, impl: str) -> float:
    """Run ``step`` twice (compilation, first-call allocation; once for an uncompiled row
    slower than ROUND_BUDGET_S) -> seconds of the last call. A compile row whose
    compilation fails is skipped with the error."""
    is_compiled = model_and_backend(impl)[2]
    t0 = time.perf_counter()
    try:
        step()
    except Exception as err:  # noqa: BLE001 - any compile failure skips the row, with why
        if is_compiled:
            pytest.skip(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        raise
    first = time.perf_counter() - t0
    if first > ROUND_BUDGET_S and not is_compiled:
        return first  # a slow row: one warm-up call is enough
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def run(benchmark, step, impl: str) -> dict:
    seconds = warm_up(step, impl)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(ROUND_BUDGET_S / max(seconds, 1e-6)))))
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if DEVICE.type == "cuda":
        return {"rounds": rounds, "peak_memory_bytes": torch.cuda.max_memory_allocated(),
                "peak_memory_kind": "torch.cuda.max_memory_allocated over the timed calls"}
    peak = cpu_peak_growth(step)
    return {"rounds": rounds, "peak_memory_bytes": peak,
            "peak_memory_kind": "unmeasured" if peak is None else "peak RSS growth of one extra call"}


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def record(benchmark, impl: str, mode: str, vocab: int, batch: int, net: torch.nn.Module, measured: dict,
           state_copies: int) -> None:
    model, backend, is_compiled = model_and_backend(impl)
    params = sum(p.numel() for p in net.parameters())
    tokens = batch * SEQ_LEN
    info = dict(
        mode=mode, model=model, backend=backend, compiled=is_compiled, impl=impl,
        device=device_name(), dtype=str(DTYPE).replace("torch.", ""), threads=torch.get_num_threads(),
        vocab=vocab, d=D, blocks=len(DILATIONS), dilations=DILATIONS, seq_len=SEQ_LEN, batch=batch,
        cutoffs=cutoffs_for(vocab) if model == "cprec" else None, div=DIV if model == "cprec" else None,
        sharing="cross-block" if model == "cprec" else "none",
        params=params, state_bytes=params * state_copies * torch.finfo(DTYPE).bits // 8,
        tokens_per_call=tokens, **measured,
    )
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    if median:
        info["tokens_per_s"] = tokens / median
        if mode == "serve_top10":
            info["users_per_s"] = batch / median
    benchmark.extra_info.update(info)


# Serving models are built once per (impl, vocab) and reused for every batch of users.
_serving: dict = {}


def serving_model(impl: str, vocab: int):
    key = (impl, vocab)
    if key not in _serving:
        _serving.clear()  # one model at a time: V = 1M NextItNet weighs a GB
        net = build(impl, vocab).eval()
        fn = compiled(net.recommend) if model_and_backend(impl)[2] else net.recommend
        _serving[key] = (net, fn)
    return _serving[key]


# (vocab, impl) in that order, so the grid reads as one block of rows per vocabulary.
TRAIN_GRID = [(v, b, i) for v in VOCABS for b in BATCHES for i in IMPLS]
SERVE_GRID = [(v, i, u) for v in VOCABS for i in IMPLS for u in USERS]


@pytest.mark.parametrize("vocab,batch,impl", TRAIN_GRID)
def test_train_step(benchmark, vocab, batch, impl):
    skip_unless_runnable(impl, "train_step", vocab, batch)
    net = build(impl, vocab).train()
    optimizer = make_adamw(net.parameters(), lr=1e-3, weight_decay=0.01)  # every row: `cprec train`'s AdamW
    ids = sequences(batch, vocab)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    loss_fn = compiled(net.loss) if model_and_backend(impl)[2] else net.loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(inputs, targets).backward()
        optimizer.step()
        sync()

    benchmark.group = f"train_step V={vocab} B={batch}"
    measured = run(benchmark, step, impl)
    record(benchmark, impl, "train_step", vocab, batch, net, measured, state_copies=4)


@pytest.mark.parametrize("vocab,impl,users", SERVE_GRID)
def test_serve_top10(benchmark, vocab, impl, users):
    skip_unless_runnable(impl, "serve_top10", vocab, users)
    net, recommend = serving_model(impl, vocab)
    inputs = sequences(users, vocab)[:, :-1].contiguous()

    def step():
        with torch.no_grad():
            recommend(inputs, TOPK)
        sync()

    benchmark.group = f"serve_top10 V={vocab} users={users}"
    measured = run(benchmark, step, impl)
    record(benchmark, impl, "serve_top10", vocab, users, net, measured, state_copies=1)

