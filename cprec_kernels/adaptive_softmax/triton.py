"""Triton backend of the tail-cluster adaptive softmax: loss, full log-probs and top-k.

Formula (``cprec_kernels.adaptive_softmax.reference`` is the definition). With head logits
``a = h @ W^T + b`` over ``H = c1 + n_tails`` columns and, for tail i, the code
``z_i = h @ Q_i^T`` and logits ``t_i = z_i @ F_i^T``:

    log p(v) = a[v] - lse(a)                                             v < c1
    log p(v) = a[c1 + i] - lse(a) + t_i[v - c_{i+1}] - lse(t_i)          v in tail i

Shapes: hidden h [N, d]; W [H, d]; b [H] or None; Q_i [d_i, d]; F_i [V_i, d_i];
target [N]. Every op here is built from one primitive: stream the columns of a
weight matrix in tiles of BLOCK_V, form the logit tile ``x @ W_tile^T`` in fp32 with
tl.dot, and fold it into a running logsumexp, a gradient, a written log-prob or a
running top-k. No [N, H] or [N, V_i] logit matrix is ever stored.

Memory traffic it is designed for (N rows, loss):
- forward: a GEMM whose output is reduced on the fly: each program holds BLOCK_N rows
  and sweeps the weight tiles, so W is read cdiv(N, BLOCK_N) times (L2 absorbs most)
  and the h block is re-read from cache per tile; writes O(N) (lse, target logit).
- tails: rows are grouped by cluster on the device (stable argsort of the cluster id,
  counts and starts stay device tensors, so no host sync); every tail kernel is
  launched over the fixed grid cdiv(N, BLOCK_N) and programs past the cluster's row
  count (read from device memory) exit at once. z_i is a [N_i, d_i] scratch buffer,
  a fraction of [N, d]; tail work is proportional to the rows of that tail only.
- backward: the logit tiles are recomputed (once for lse, once in the kernel that
  forms the hidden/code gradient row-block by row-block, once in the kernel that
  forms the weight gradient tile by tile). The two-kernel split keeps it free of
  atomics and deterministic; weight gradients are accumulated in fp32 registers
  over all rows and written once.
- log_prob writes [N, V] exactly once.
- top-k: one pass over the items (head, then each tail) keeping per row the best KP
  = next_pow2(k) items as packed int64 (value, id) keys; a tile's items replace the
  worst kept ones while they beat them (rare once the set is full), the set is carried
  in an [N, KP] buffer between the head launch and each tail launch and sorted once at
  the end: O(N * k) memory, no per-tile sort.

Dtypes: float32, float16 and bfloat16 hidden/weights; dot operands in the weight
dtype (float32 dots follow torch's float32 matmul precision: IEEE by default),
accumulation, lse and outputs in float32. float64 is not run (DTYPES; backend="triton"
raises RuntimeError): tl.dot has no float64 on GPUs (use backend="torch").
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._core.tensors import block_bounds
from .._core.tensors import row_weights as _row_weights
from .._triton_common import mma as _mma
from .._triton_common import mma_mode as _mma_mode
from .._triton_common import pow2 as _pow2

Tensor = torch.Tensor

# Sort key of "no item yet": below every packed (value, id) key, -inf included.
_NO_ITEM: tl.constexpr = tl.constexpr(-(2**63) + 1)
_MAX_TOPK = 1024


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _group_block(perm_ptr, start_ptr, count_ptr, pid, BLOCK_N: tl.constexpr):
    """Rows (int64) of block ``pid`` of a row group, their mask, and the group size."""
    count = tl.load(count_ptr)
    idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = idx < count
    rows = tl.load(perm_ptr + tl.load(start_ptr) + idx, mask=mask, other=0).to(tl.int64)
    return rows, mask


@triton.jit
def _logit_tile(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """x[rows] @ W[cols]^T (+ b[cols]) in fp32: [BLOCK_N, BLOCK_V]; masked entries 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(x.to(w.dtype), tl.trans(w), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _logit_grad(
    logit, lse, coef, target, rows, row_mask, cols, col_mask, g_ptr, stride_g, HAS_G: tl.constexpr
):
    """d(objective)/d(logit) for one tile: softmax * coef + G (log_prob backward), or
    softmax * coef - coef * onehot(target) (loss backward, coef = per-row loss weight)."""
    g = tl.exp(logit - lse[:, None]) * coef[:, None]
    if HAS_G:
        offs = rows[:, None] * stride_g + cols[None, :]
        g += tl.load(g_ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    else:
        g -= tl.where(cols[None, :] == target[:, None], coef[:, None], 0.0)
    return tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)


@triton.jit
def _pack(value, ids):
    """Order-preserving int64 key of (fp32 value, id): larger value first, then smaller id."""
    bits = value.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _rows_matmul_kernel(
    a_ptr, stride_a, b_ptr, stride_bk, stride_bc, c_ptr, stride_c, perm_ptr, start_ptr, count_ptr, K, C,
    ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[r] (+)= A[r] @ B for the rows r of a group; B [K, C] given by its strides,
    so the same kernel forms z = h @ Q^T and grad_h += grad_z @ Q."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    if pid_n * BLOCK_N >= tl.load(count_ptr):
        return
    rows, row_mask = _group_block(perm_ptr, start_ptr, count_ptr, pid_n, BLOCK_N)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cs[None, :] * stride_bc, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(a.to(b.dtype), b, acc, PRECISION)
    offs = rows[:, None] * stride_c + cs[None, :]
    mask = row_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_outer_kernel(
    a_ptr, stride_a, b_ptr, stride_b, c_ptr, stride_c, perm_ptr, start_ptr, count_ptr, M, C,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[M, C] = sum over the rows r of a group of A[r, :M]^T B[r, :C] (grad of Q)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask, c_mask = ms < M, cs < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, tl.load(count_ptr), BLOCK_N):
        rows, row_mask = _group_block(perm_ptr, start_ptr, count_ptr, r0 // BLOCK_N, BLOCK_N)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ms[None, :], mask=row_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_b + cs[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(tl.trans(a.to(b.dtype)), b, acc, PRECISION)
    offs = ms[:, None] * stride_c + cs[None, :]
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _lse_kernel(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, perm_ptr, start_ptr, count_ptr, target_ptr, lse_ptr, picked_ptr, V, K,
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row of a group: lse[r] = logsumexp_v(x[r] . W[v] + b[v]) streamed over tiles
    of V (online max / sum), and picked[r] = the logit of column target[r]."""
    pid = tl.program_id(0).to(tl.int64)
    if pid * BLOCK_N >= tl.load(count_ptr):
        return
    rows, row_mask = _group_block(perm_ptr, start_ptr, count_ptr, pid, BLOCK_N)
    if HAS_TARGET:
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logit = _logit_tile(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        logit = tl.where(col_mask[None, :], logit, float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
        m = m_new
        if HAS_TARGET:
            picked += tl.sum(tl.where(cols[None, :] == target[:, None], logit, 0.0), axis=1)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_mask)
    if HAS_TARGET:
        tl.store(picked_ptr + rows, picked, mask=row_mask)


@triton.jit
def _grad_x_kernel(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, perm_ptr, start_ptr, count_ptr, lse_ptr, coef_ptr, target_ptr,
    g_ptr, stride_g, out_ptr, stride_out, V, K,
    HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[r, ko] (+)= sum_v dlogit[r, v] W[v, ko] for a row block and a block of the
    input width; dlogit is recomputed tile by tile and never stored."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    if pid_n * BLOCK_N >= tl.load(count_ptr):
        return
    rows, row_mask = _group_block(perm_ptr, start_ptr, count_ptr, pid_n, BLOCK_N)
    ko = pid_k * BLOCK_KO + tl.arange(0, BLOCK_KO)
    ko_mask = ko < K
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    if HAS_G:
        target = rows
    else:
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    acc = tl.zeros((BLOCK_N, BLOCK_KO), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logit = _logit_tile(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        g = _logit_grad(logit, lse, coef, target, rows, row_mask, cols, col_mask, g_ptr, stride_g, HAS_G)
        w_offs = cols.to(tl.int64)[:, None] * stride_w + ko[None, :]
        w = tl.load(w_ptr + w_offs, mask=col_mask[:, None] & ko_mask[None, :], other=0.0)
        acc = _mma(g.to(w.dtype), w, acc, PRECISION)
    offs = rows[:, None] * stride_out + ko[None, :]
    mask = row_mask[:, None] & ko_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _grad_w_kernel(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, perm_ptr, start_ptr, count_ptr, lse_ptr, coef_ptr, target_ptr,
    g_ptr, stride_g, gw_ptr, gb_ptr, V, K,
    HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """grad_W[v, ko] = sum_r dlogit[r, v] x[r, ko] (and grad_b[v] = sum_r dlogit[r, v])
    for one tile of W, over every row of the group, accumulated in fp32 registers."""
    pid_v = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    ko = pid_k * BLOCK_KO + tl.arange(0, BLOCK_KO)
    ko_mask = ko < K
    acc = tl.zeros((BLOCK_V, BLOCK_KO), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, tl.load(count_ptr), BLOCK_N):
        rows, row_mask = _group_block(perm_ptr, start_ptr, count_ptr, r0 // BLOCK_N, BLOCK_N)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        if HAS_G:
            target = rows
        else:
            target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        logit = _logit_tile(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        g = _logit_grad(logit, lse, coef, target, rows, row_mask, cols, col_mask, g_ptr, stride_g, HAS_G)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ko[None, :], mask=row_mask[:, None] & ko_mask[None, :], other=0.0)
        dot_dtype = w_ptr.dtype.element_ty
        acc = _mma(tl.trans(g.to(dot_dtype)), x.to(dot_dtype), acc, PRECISION)
        if HAS_BIAS:
            acc_b += tl.sum(g, axis=0)
    offs = cols[:, None] * stride_w + ko[None, :]
    tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty), mask=col_mask[:, None] & ko_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(gb_ptr + cols, acc_b.to(gb_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _write_log_prob_kernel(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, shift_ptr, out_ptr, stride_out, aux_ptr, stride_aux, N, V, K, N_MAIN,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """logit[r, v] + shift[r] for one tile, written to out[r, v] for v < N_MAIN and to
    aux[r, v - N_MAIN] beyond (the head's cluster columns)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    logit = _logit_tile(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
    lp = logit + tl.load(shift_ptr + rows, mask=row_mask, other=0.0)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    main = cols[None, :] < N_MAIN
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], lp, mask=mask & main)
    tl.store(aux_ptr + rows[:, None] * stride_aux + (cols[None, :] - N_MAIN), lp, mask=mask & ~main)


@triton.jit
def _topk_kernel(
    x_ptr, stride_x, w_ptr, stride_w, b_ptr, shift_ptr, state_ptr, exclude_ptr, stride_ex, M,
    values_ptr, ids_ptr, N, V, K, ID_OFFSET, TOPK,
    HAS_BIAS: tl.constexpr, HAS_EXCLUDE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, KP: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold the items of one cluster (log-prob = logit + shift[r], id = ID_OFFSET + v)
    into each row's running top-KP, a set of packed int64 keys (unordered until the
    last launch sorts it once).

    Per tile: while some row's best new key beats its worst kept key, swap them. Once
    the set has filled up, most tiles need no swap at all, so the cost is the logit
    tile plus two row reductions, and no sort network runs per tile."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    slots = tl.arange(0, KP)
    state_offs = rows[:, None] * KP + slots[None, :]
    if FIRST:
        state = tl.full((BLOCK_N, KP), _NO_ITEM, tl.int64)
    else:
        state = tl.load(state_ptr + state_offs, mask=row_mask[:, None], other=_NO_ITEM)
    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logit = _logit_tile(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_mask, cols, col_mask, K,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        lp = logit + shift[:, None]
        ids = ID_OFFSET + cols.to(tl.int64)
        if HAS_EXCLUDE:
            for j in range(0, M):
                banned = tl.load(exclude_ptr + rows * stride_ex + j, mask=row_mask, other=-1).to(tl.int64)
                lp = tl.where(ids[None, :] == banned[:, None], float("-inf"), lp)
        keys = tl.where(col_mask[None, :], _pack(lp, ids[None, :]), _NO_ITEM)
        best = tl.max(keys, axis=1)
        worst = tl.min(state, axis=1)
        while tl.max((best > worst).to(tl.int32), axis=0) > 0:
            take = best > worst
            # Keys of real items are unique (the id is in them), so `keys == best`
            # removes exactly the item moved into the slot of the worst kept key.
            slot = tl.argmin(state, axis=1)
            state = tl.where(take[:, None] & (slots[None, :] == slot[:, None]), best[:, None], state)
            keys = tl.where(take[:, None] & (keys == best[:, None]), _NO_ITEM, keys)
            best = tl.max(keys, axis=1)
            worst = tl.min(state, axis=1)
    if LAST:
        values, ids = _unpack(tl.sort(state, descending=True))
        out_offs = rows[:, None] * TOPK + slots[None, :]
        out_mask = row_mask[:, None] & (slots[None, :] < TOPK)
        tl.store(values_ptr + out_offs, values, mask=out_mask)
        tl.store(ids_ptr + out_offs, ids, mask=out_mask)
    else:
        tl.store(state_ptr + state_offs, state, mask=row_mask[:, None])


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
class _Group(NamedTuple):
    """Rows perm[start : start + count] of a batch; start/count are 1-element device
    tensors so a grid can be sized from N without reading them on the host."""

    perm: Tensor
    start: Tensor
    count: Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_block() -> int:
    """Rows per program. Interpreted (CI), the smallest tl.dot tile, so tiny test
    shapes still span several row blocks and vocabulary tiles and reach every mask
    and loop boundary."""
    return 16 if _interpreting() else 64


def _cfg(x: Tensor, w: Tensor) -> dict:
    """Block sizes of a logit tile x @ w^T: one fixed config from the width K (tl.dot
    needs every dim >= 16). Bounded tiles keep shared memory small on any GPU.

    float32 weights spilled on sm_90 with the half types' tiles (up to 744 B of stack
    in the gradient kernels at d = 256, ptxas of triton 3.6 and 3.9). Without spills
    (both versions, d = 256 and the tails' 64): IEEE dots, which run on FMA with both
    operands in registers, in 32-row tiles; TF32 dots in 32-wide K steps; both in 2
    pipeline stages."""
    precision = _mma_mode(w)
    fp32 = w.dtype == torch.float32
    block = _row_block()
    cfg = dict(BLOCK_N=min(block, 32) if fp32 and precision == "ieee" else block,
               BLOCK_V=2 * block if block == 16 else block,
               BLOCK_K=_pow2(x.shape[1], 16, 32 if fp32 and precision == "tf32" else 64), PRECISION=precision)
    if fp32 and not _interpreting():
        cfg["num_stages"] = 2
    return cfg


def _out_block(K: int) -> int:
    # The whole input width in one block up to d = 256: every extra block of the
    # gradient kernels recomputes the logit tiles.
    return _pow2(K, 16, 256)


def _warps(num_warps: int = 4) -> dict:
    return {} if _interpreting() else dict(num_warps=num_warps)


def _all_rows(n: int, device) -> _Group:
    return _Group(
        torch.arange(n, device=device),
        torch.zeros(1, dtype=torch.int64, device=device),
        torch.full((1,), n, dtype=torch.int64, device=device),
    )


def _project(a: Tensor, b: Tensor, group: _Group, out: Tensor, b_transposed: bool, accumulate: bool) -> Tensor:
    """out[r] (+)= a[r] @ b^T (b_transposed) or a[r] @ b, for the rows of ``group``."""
    K = a.shape[1]
    C = out.shape[1]
    stride_bk, stride_bc = (b.stride(1), b.stride(0)) if b_transposed else (b.stride(0), b.stride(1))
    # IEEE float32 dots run on FMA with both operands in registers: a 64 x 128 fp32 tile
    # took 255 registers and spilled 8-48 B on sm_90 (ptxas of triton 3.6), 64 x 64 none.
    ieee32 = b.dtype == torch.float32 and _mma_mode(b) == "ieee"
    BN, BC, BK = _row_block(), _pow2(C, 16, 64 if ieee32 else 128), _pow2(K, 16, 64)
    grid = (triton.cdiv(a.shape[0], BN), triton.cdiv(C, BC))
    _rows_matmul_kernel[grid](
        a, a.stride(0), b, stride_bk, stride_bc, out, out.stride(0), *group, K, C,
        ACCUMULATE=accumulate, BLOCK_N=BN, BLOCK_C=BC, BLOCK_K=BK,
        PRECISION=_mma_mode(b), **_warps(),
    )
    return out


def _rows_outer(a: Tensor, b: Tensor, group: _Group, dtype: torch.dtype) -> Tensor:
    """sum over the rows r of ``group`` of a[r]^T b[r]: [a.shape[1], b.shape[1]] in ``dtype``."""
    M, C = a.shape[1], b.shape[1]
    out = torch.empty(M, C, dtype=dtype, device=a.device)
    BM, BC = _pow2(M, 16, 64), _pow2(C, 16, 64)
    _rows_outer_kernel[(triton.cdiv(M, BM), triton.cdiv(C, BC))](
        a, a.stride(0), b, b.stride(0), out, out.stride(0), *group, M, C,
        BLOCK_N=_row_block(), BLOCK_M=BM, BLOCK_C=BC, PRECISION=_mma_mode(b), **_warps(),
    )
    return out


def _lse(x: Tensor, w: Tensor, b: Optional[Tensor], group: _Group, target: Optional[Tensor] = None,
         lse: Optional[Tensor] = None, picked: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per row of ``group``: (logsumexp of x @ w^T + b, the logit of column target);
    rows outside the group keep what ``lse``/``picked`` held (zeros by default)."""
    N = x.shape[0]
    lse = torch.zeros(N, dtype=torch.float32, device=x.device) if lse is None else lse
    picked = torch.zeros_like(lse) if picked is None else picked
    cfg = _cfg(x, w)
    _lse_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x, x.stride(0), w, w.stride(0), w if b is None else b, *group,
        lse if target is None else target, lse, picked, w.shape[0], x.shape[1],
        HAS_BIAS=b is not None, HAS_TARGET=target is not None, **cfg, **_warps(),
    )
    return lse, picked


class _Grad(NamedTuple):
    """What forms dlogit = softmax * coef + G (or - coef * onehot(target)) per row."""

    lse: Tensor
    coef: Tensor
    target: Optional[Tensor] = None
    g: Optional[Tensor] = None  # [N, >= V] slice with unit column stride


def _grad_args(grad: _Grad) -> tuple:
    dummy = grad.coef
    g = dummy if grad.g is None else grad.g
    return (grad.lse, grad.coef, dummy if grad.target is None else grad.target, g, g.stride(0))


def _grad_x(x: Tensor, w: Tensor, b: Optional[Tensor], group: _Group, grad: _Grad, out: Tensor, accumulate: bool):
    """out[r] (+)= dlogit[r] @ w for the rows of ``group``; out is fp32 [N, K]."""
    N, K = x.shape
    cfg = _cfg(x, w)
    BKO = _out_block(K)
    _grad_x_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, BKO))](
        x, x.stride(0), w, w.stride(0), w if b is None else b, *group, *_grad_args(grad),
        out, out.stride(0), w.shape[0], K,
        HAS_BIAS=b is not None, HAS_G=grad.g is not None, ACCUMULATE=accumulate, BLOCK_KO=BKO, **cfg, **_warps(8),
    )


def _grad_w(x: Tensor, w: Tensor, b: Optional[Tensor], group: _Group, grad: _Grad) -> Tuple[Tensor, Optional[Tensor]]:
    """(dlogit^T @ x over the rows of ``group`` [V, K], column sums [V] or None), in w's dtype."""
    V, K = w.shape
    gw = torch.empty_like(w)
    gb = None if b is None else torch.empty_like(b)
    cfg = _cfg(x, w)
    BKO = _out_block(K)
    _grad_w_kernel[(triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(K, BKO))](
        x, x.stride(0), w, w.stride(0), w if b is None else b, *group, *_grad_args(grad),
        gw, gw if gb is None else gb, V, K,
        HAS_BIAS=b is not None, HAS_G=grad.g is not None, BLOCK_KO=BKO, **cfg, **_warps(8),
    )
    return gw, gb


def _write_log_prob(x: Tensor, w: Tensor, b: Optional[Tensor], shift: Tensor, out: Tensor, n_main: int,
                    aux: Optional[Tensor] = None) -> None:
    """out[:, v] = logit + shift for v < n_main, aux[:, v - n_main] beyond."""
    N, V = x.shape[0], w.shape[0]
    aux = out if aux is None else aux
    cfg = _cfg(x, w)
    _write_log_prob_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
        x, x.stride(0), w, w.stride(0), w if b is None else b, shift, out, out.stride(0), aux, aux.stride(0),
        N, V, x.shape[1], n_main, HAS_BIAS=b is not None, **cfg, **_warps(),
    )


# Input dtypes this backend runs; the backend table refuses others before a call.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(hidden: Tensor) -> None:
    # For direct calls that bypass the backend table.
    if hidden.dtype not in DTYPES:
        raise RuntimeError(
            "the triton adaptive softmax supports float32, float16 and bfloat16, not float64 "
            "(tl.dot has no float64 on GPUs); use backend='torch' for float64"
        )


def _tail_bounds(cutoffs: Sequence[int]) -> List[Tuple[int, int]]:
    return block_bounds(cutoffs)[1:]


# --------------------------------------------------------------------------------------
# row grouping (loss)
# --------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    keep: Tensor        # [N] bool, row not ignored
    head: _Group        # every row not ignored
    tails: List[_Group]  # rows whose target is in tail i
    head_col: Tensor    # [N] head column of the target: the item or its cluster token
    local: Tensor       # [N] target - c_{i+1} for a row of tail i


def _plan(target: Tensor, cutoffs: Sequence[int], ignore_index: int) -> _Plan:
    """Group rows by cluster on the device: no .item(), no nonzero, no host sync."""
    n_tails = len(cutoffs) - 1
    target = target.long()
    keep = target != ignore_index
    cluster = torch.zeros_like(target)
    for c in cutoffs[:-1]:
        cluster += target >= c
    cluster = torch.where(keep, cluster, n_tails + 1)  # ignored rows sort last
    perm = torch.argsort(cluster, stable=True)
    counts = torch.zeros(n_tails + 2, dtype=torch.int64, device=target.device)
    counts.index_add_(0, cluster, torch.ones_like(cluster))
    starts = counts.cumsum(0) - counts
    head = _Group(perm, starts[:1], starts[n_tails + 1 :])
    tails = [_Group(perm, starts[i + 1 : i + 2], counts[i + 1 : i + 2]) for i in range(n_tails)]
    head_col = torch.where(cluster == 0, target, cutoffs[0] + cluster - 1)
    local = target.clone()
    for i, lo in enumerate(cutoffs[:-1]):
        local = torch.where(cluster == i + 1, target - lo, local)
    return _Plan(keep, head, tails, head_col, local)


# --------------------------------------------------------------------------------------
# backend functions (signatures of cprec_kernels.reference)
# --------------------------------------------------------------------------------------
def adaptive_softmax_loss_forward(
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int,
    reduction: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(-log p(target | hidden): [N] ("none") or a scalar, head_lse [N], tail_lse [N]), float32."""
    _check_dtype(hidden)
    plan = _plan(target, cutoffs, ignore_index)
    # Every row's head statistic (ignored rows too), as the other backends give it; an
    # ignored row's head column is past the head, so its picked logit is 0.
    lse, picked = _lse(hidden, head_weight, head_bias, _all_rows(hidden.shape[0], hidden.device), plan.head_col)
    nll = lse - picked
    # Tail groups are disjoint, so every tail writes its rows of one pair of buffers.
    tail_lse, tail_picked = torch.zeros_like(lse), torch.zeros_like(lse)
    for group, proj, weight in zip(plan.tails, tail_projections, tail_weights):
        z = _project(hidden, proj, group, hidden.new_empty(hidden.shape[0], proj.shape[0], dtype=torch.float32),
                     b_transposed=True, accumulate=False)
        _lse(z, weight, None, group, plan.local, tail_lse, tail_picked)
    nll = torch.where(plan.keep, nll + tail_lse - tail_picked, 0.0)
    if reduction != "none":
        nll = (nll * _row_weights(target, ignore_index, reduction, torch.float32)).sum()
    return nll, lse, tail_lse


def adaptive_softmax_loss_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    target: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    ignore_index: int,
    reduction: str,
    head_lse: Tensor,
    tail_lse: Tensor,
):
    """-> (grad_hidden, grad_head_weight, grad_head_bias, [grad_tail_projection], [grad_tail_weight]);
    the kernels read the forward's head_lse, tail_lse [N] (float32) instead of recomputing them."""
    _check_dtype(hidden)
    plan = _plan(target, cutoffs, ignore_index)
    coef = (grad_loss.float() * _row_weights(target, ignore_index, reduction, torch.float32)).contiguous()
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    head_grad = _Grad(head_lse.contiguous(), coef, plan.head_col)
    _grad_x(hidden, head_weight, head_bias, plan.head, head_grad, grad_h, accumulate=True)
    grad_hw, grad_hb = _grad_w(hidden, head_weight, head_bias, plan.head, head_grad)
    grad_tp, grad_tw = [], []
    for group, proj, weight in zip(plan.tails, tail_projections, tail_weights):
        gp, gw = _tail_backward(hidden, proj, weight, group, coef, plan.local, None, grad_h, tail_lse.contiguous())
        grad_tp.append(gp)
        grad_tw.append(gw)
    return grad_h.to(hidden.dtype), grad_hw, grad_hb, grad_tp, grad_tw


def _tail_backward(hidden, proj, weight, group, coef, local, g, grad_h, lse=None) -> Tuple[Tensor, Tensor]:
    """Grads of one tail over the rows of ``group``; adds its share to grad_h (fp32).
    ``lse``: the tail's log-sum-exps per row [N] when the forward saved them."""
    N = hidden.shape[0]
    z = _project(hidden, proj, group, hidden.new_empty(N, proj.shape[0], dtype=torch.float32), True, False)
    if lse is None:
        lse, _ = _lse(z, weight, None, group)
    grad = _Grad(lse, coef, local, g)
    grad_z = torch.empty_like(z)
    _grad_x(z, weight, None, group, grad, grad_z, accumulate=False)
    grad_w, _ = _grad_w(z, weight, None, group, grad)
    _project(grad_z, proj, group, grad_h, b_transposed=False, accumulate=True)
    return _rows_outer(grad_z, hidden, group, proj.dtype), grad_w


def _cluster_log_probs(hidden, head_weight, head_bias, cutoffs, head_lse) -> Tensor:
    """[N, n_tails] (at least one column) log-prob of each cluster token of the head."""
    c1, n_tails = cutoffs[0], len(cutoffs) - 1
    aux = hidden.new_empty(hidden.shape[0], max(n_tails, 1), dtype=torch.float32)
    if n_tails:
        bias = None if head_bias is None else head_bias[c1:]
        _write_log_prob(hidden, head_weight[c1:], bias, -head_lse, aux, n_main=0, aux=aux)
    return aux


def adaptive_log_prob_forward(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
) -> Tensor:
    """log p(v | h) for every item: [N, V] float32, each entry written once."""
    _check_dtype(hidden)
    N, c1, V = hidden.shape[0], cutoffs[0], cutoffs[-1]
    rows = _all_rows(N, hidden.device)
    out = hidden.new_empty(N, V, dtype=torch.float32)
    head_lse, _ = _lse(hidden, head_weight, head_bias, rows)
    clusters = hidden.new_empty(N, max(len(cutoffs) - 1, 1), dtype=torch.float32)
    _write_log_prob(hidden, head_weight, head_bias, -head_lse, out, n_main=c1, aux=clusters)
    for i, ((lo, _), proj, weight) in enumerate(zip(_tail_bounds(cutoffs), tail_projections, tail_weights)):
        z = _project(hidden, proj, rows, hidden.new_empty(N, proj.shape[0], dtype=torch.float32), True, False)
        lse, _ = _lse(z, weight, None, rows)
        _write_log_prob(z, weight, None, clusters[:, i] - lse, out[:, lo:], n_main=weight.shape[0])
    return out


def adaptive_log_prob_backward(
    grad: Tensor,
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
):
    """grad: [N, V] -> (grad_hidden, grad_head_weight, grad_head_bias, [grad_tail_projection], [grad_tail_weight]).

    d/d logits of sum_v G[v] log_softmax[v] is G - softmax * sum(G), per head and tail;
    a head cluster token's G is the sum of its tail's G."""
    _check_dtype(hidden)
    N, c1 = hidden.shape[0], cutoffs[0]
    g = grad.float().contiguous()
    rows = _all_rows(N, hidden.device)
    tail_sums = [g[:, lo:hi].sum(dim=1) for lo, hi in _tail_bounds(cutoffs)]
    g_head = torch.cat([g[:, :c1], *(s.unsqueeze(1) for s in tail_sums)], dim=1)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    lse, _ = _lse(hidden, head_weight, head_bias, rows)
    head_grad = _Grad(lse, -g_head.sum(dim=1), g=g_head)
    _grad_x(hidden, head_weight, head_bias, rows, head_grad, grad_h, accumulate=True)
    grad_hw, grad_hb = _grad_w(hidden, head_weight, head_bias, rows, head_grad)
    grad_tp, grad_tw = [], []
    for (lo, _), s, proj, weight in zip(_tail_bounds(cutoffs), tail_sums, tail_projections, tail_weights):
        gp, gw = _tail_backward(hidden, proj, weight, rows, -s, None, g[:, lo:], grad_h)
        grad_tp.append(gp)
        grad_tw.append(gw)
    return grad_h.to(hidden.dtype), grad_hw, grad_hb, grad_tp, grad_tw


def _topk_pass(x, w, b, shift, state, exclude, values, ids, id_offset, k, first, last) -> None:
    """Fold the items of one cluster into the running top-k ``state`` [N, KP]."""
    N, KP = x.shape[0], state.shape[1]
    cfg = _cfg(x, w)
    BN = max(16, min(cfg["BLOCK_N"], 8192 // KP))  # bounds the [BN, KP] keys and the final sort
    if cfg["PRECISION"] == "ieee" and w.dtype == torch.float32:
        # The running [BN, KP] keys beside an FMA dot's register operands spilled 20 B
        # (sm_90, ptxas of triton 3.6) at BLOCK_K = 64; 32-wide K steps do not.
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    has_ex = exclude is not None and exclude.numel() > 0
    ex = exclude if has_ex else ids
    _topk_kernel[(triton.cdiv(N, BN),)](
        x, x.stride(0), w, w.stride(0), w if b is None else b, shift, state, ex, ex.stride(0),
        exclude.shape[1] if has_ex else 0, values, ids, N, w.shape[0], x.shape[1], id_offset, k,
        HAS_BIAS=b is not None, HAS_EXCLUDE=has_ex, FIRST=first, LAST=last,
        BLOCK_N=BN, BLOCK_V=cfg["BLOCK_V"], KP=KP, BLOCK_K=cfg["BLOCK_K"], PRECISION=cfg["PRECISION"], **_warps(),
    )


def adaptive_topk_forward(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Optional[Tensor],
    tail_projections: Sequence[Tensor],
    tail_weights: Sequence[Tensor],
    cutoffs: Sequence[int],
    k: int,
    exclude: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The k most likely items per row, best first: (log_probs [N, k] float32, ids [N, k] int64).

    One pass over the head items, then over each tail; memory O(N * k)."""
    _check_dtype(hidden)
    if k > _MAX_TOPK:
        raise ValueError(f"the triton adaptive_topk supports k <= {_MAX_TOPK}, got {k}; use adaptive_log_prob + torch.topk")
    N, c1, n_tails = hidden.shape[0], cutoffs[0], len(cutoffs) - 1
    rows = _all_rows(N, hidden.device)
    state = hidden.new_empty(N, _pow2(k, 2, _MAX_TOPK), dtype=torch.int64)
    values = hidden.new_empty(N, k, dtype=torch.float32)
    ids = hidden.new_empty(N, k, dtype=torch.int64)
    head_lse, _ = _lse(hidden, head_weight, head_bias, rows)
    clusters = _cluster_log_probs(hidden, head_weight, head_bias, cutoffs, head_lse)
    _topk_pass(hidden, head_weight[:c1], head_bias, -head_lse, state, exclude, values, ids, 0, k, True, n_tails == 0)
    for i, ((lo, _), proj, weight) in enumerate(zip(_tail_bounds(cutoffs), tail_projections, tail_weights)):
        z = _project(hidden, proj, rows, hidden.new_empty(N, proj.shape[0], dtype=torch.float32), True, False)
        lse, _ = _lse(z, weight, None, rows)
        _topk_pass(z, weight, None, clusters[:, i] - lse, state, exclude, values, ids, lo, k, False, i == n_tails - 1)
    return values, ids
