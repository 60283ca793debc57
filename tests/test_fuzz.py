"""Property tests: every public op and module, driven with random shapes, dtypes and
values (invalid ones included), either matches the eager reference or raises a clear
ValueError/TypeError. Never a crash, a hang or another exception type."""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cprec_kernels as ck
from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, NextItNetBlock

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ValueError, TypeError)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPES = st.sampled_from(FLOATS * 3 + [torch.int64])
# Mostly valid block layouts (sorted distinct positive cutoffs), sometimes anything.
CUTOFFS = st.one_of(
    st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True).map(sorted),
    st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True).map(sorted),
    st.lists(st.integers(-2, 30), min_size=0, max_size=4),
)
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _close(a, b, dtype):
    tol = TOL.get(dtype, 1e-4)
    torch.testing.assert_close(a.double(), b.double(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol)


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-3, 10, shape, generator=g, dtype=dtype)


def _agree(call):
    """Run ``call(backend)`` on the default backend and the reference: both raise a
    clear error, or both return the same values."""
    try:
        got = call(None)
    except CLEAR:
        event("refused with a clear error")
        with pytest.raises(CLEAR):
            call("torch")
        return None
    event("computed, compared with the reference")
    want = call("torch")
    return got, want


@FUZZ
@given(B=st.sampled_from([1, 2, 3, 0]), T=st.sampled_from([1, 2, 5, 6, 0]), cin=st.integers(1, 5), cout=st.integers(1, 5),
       cin_off=st.sampled_from([0] * 6 + [1]), K=st.sampled_from([1, 2, 3, 3, 0]),
       dilation=st.sampled_from([1, 2, 3, 8, 1, 2, 0, -1]),
       dtype=DTYPES, wdtype=st.sampled_from([None] * 8 + [torch.float64, torch.int64]),
       bias=st.sampled_from(["none", "ok", "ok", "wrong"]), fused=st.booleans(), seed=st.integers(0, 99))
def test_conv_ops(B, T, cin, cout, cin_off, K, dilation, dtype, wdtype, bias, fused, seed):
    wdtype = wdtype or dtype
    x = _tensor((B, T, cin), dtype, seed)
    w = _tensor((cout, cin + cin_off, K), wdtype, seed + 1)
    b = None if bias == "none" else _tensor((cout if bias == "ok" else cout + 1,), wdtype, seed + 2)

    def call(backend):
        if fused:
            return ck.causal_conv1d_ln_relu(x, w, b, None, b, dilation, 1e-5, residual=None, backend=backend)
        return ck.causal_conv1d(x, w, b, dilation, backend=backend)

    pair = _agree(call)
    if pair:
        _close(*pair, dtype)


@FUZZ
@given(cutoffs=CUTOFFS, d=st.integers(1, 6), n=st.integers(0, 12), low=st.sampled_from([0, 0, 0, -2]),
       high=st.integers(1, 33), dtype=DTYPES,
       padding=st.sampled_from([None, 0, 3, 40]), head_projection=st.booleans(), seed=st.integers(0, 99))
def test_blockwise_embedding(cutoffs, d, n, low, high, dtype, padding, head_projection, seed):
    edges = [0] + cutoffs
    high = min(high, max(cutoffs + [1])) if high % 4 else high  # mostly ids in range
    weights = [_tensor((max(hi - lo, 0), max(1, d >> j)), dtype, seed + j) for j, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    projections = [
        _tensor((d, w.shape[1]), dtype, seed + 10 + j) if (j > 0 or head_projection) else None
        for j, w in enumerate(weights)
    ]
    ids = torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed))
    pair = _agree(lambda backend: ck.blockwise_embedding(ids, weights, projections, cutoffs, padding, backend=backend))
    if pair:
        _close(*pair, dtype)


@FUZZ
@given(n=st.integers(0, 9), d=st.integers(1, 8), cutoffs=CUTOFFS,
       dtype=DTYPES, head_bias=st.booleans(), target_high=st.integers(1, 33), k=st.integers(-1, 6),
       op=st.sampled_from(["loss-mean", "loss-sum", "loss-none", "log_prob", "topk", "topk-exclude"]),
       seed=st.integers(0, 99))
def test_adaptive_ops(n, d, cutoffs, dtype, head_bias, target_high, k, op, seed):
    n_tails = max(len(cutoffs) - 1, 0)
    target_high = min(target_high, max(cutoffs + [1])) if target_high % 4 else target_high  # mostly valid
    head = _tensor((max(cutoffs[0] if cutoffs else 0, 0) + n_tails, d), dtype, seed)
    bias = _tensor((head.shape[0],), dtype, seed + 1) if head_bias else None
    widths = [max(1, d >> (i + 1)) for i in range(n_tails)]
    projections = [_tensor((w, d), dtype, seed + 2 + i) for i, w in enumerate(widths)]
    tails = [_tensor((max(hi - lo, 0), w), dtype, seed + 9 + i) for i, (lo, hi, w) in enumerate(zip(cutoffs, cutoffs[1:], widths))]
    hidden = _tensor((n, d), dtype, seed + 20)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(-1, target_high, (n,), generator=g)
    exclude = torch.randint(-1, target_high, (n, 2), generator=g)

    def call(backend):
        if op.startswith("loss"):
            return ck.adaptive_softmax_loss(hidden, target, head, bias, projections, tails, cutoffs,
                                            ignore_index=-1, reduction=op[5:], backend=backend)
        if op == "log_prob":
            return ck.adaptive_log_prob(hidden, head, bias, projections, tails, cutoffs, backend=backend)
        ex = exclude if op == "topk-exclude" else None
        return ck.adaptive_topk(hidden, head, bias, projections, tails, cutoffs, k, exclude=ex, backend=backend)[0]

    pair = _agree(call)
    if pair:
        _close(*pair, dtype)


@FUZZ
@given(B=st.integers(1, 3), T=st.integers(1, 6), d=st.integers(2, 8), V=st.integers(3, 30), seed=st.integers(0, 99),
       ids_high=st.integers(1, 35))
def test_modules_end_to_end(B, T, d, V, seed, ids_high):
    torch.manual_seed(seed)
    cutoffs = sorted({max(1, V // 3), V})
    emb = BlockwiseEmbedding(cutoffs, d, padding_idx=V)
    block = NextItNetBlock(d, dilation=1 + seed % 3)
    head = AdaptiveSoftmax(d, cutoffs, div_value=2.0)
    ids = torch.randint(0, ids_high, (B, T))
    event("ids past the padding id" if (ids > V).any() else "valid ids")
    try:
        h = block(emb(ids)).reshape(-1, d)
        loss = head(h, ids.reshape(-1), ignore_index=V)
    except CLEAR:
        assert (ids > V).any(), "only ids past the padding id may be refused"
        return
    assert not (ids > V).any()
    ref = head.to_torch()
    keep = ids.reshape(-1) != V
    if keep.any():
        want = ref(h[keep], ids.reshape(-1)[keep]).loss
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    loss.backward()
