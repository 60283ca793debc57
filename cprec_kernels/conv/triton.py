"""Triton backend of the causal dilated convolution, plain and fused with LayerNorm + ReLU.

Formula (x: [B, T, Ci] channels-last, W: [Co, Ci, K] in ``nn.Conv1d`` layout, tap k
looks back s_k = (K-1-k) * dilation steps, rows before t = 0 read as zeros):

    z[b, t]   = sum_k W[:, :, k] @ x[b, t - s_k] + bias                       [B, T, Co]
    out[b, t] = relu((z[b, t] - mean[b, t]) * rstd[b, t] * ln_w + ln_b) (+ residual[b, t])

Backward, with zhat = (z - mean) * rstd, h = zhat * ln_w + ln_b, g = grad_out * [h > 0]:

    gz        = rstd * (g*ln_w - mean_c(g*ln_w) - zhat * mean_c(g*ln_w * zhat))   [B, T, Co]
    grad_x[t] = sum_k W[:, :, k]^T @ gz[t + s_k]      (anti-causal; zero for t + s_k >= T)
    grad_W[:, :, k] = sum_{b,t} gz[b, t] x[b, t - s_k]^T,   grad_bias = sum_{b,t} gz[b, t]
    grad_ln_w = sum_{b,t} g * zhat,   grad_ln_b = sum_{b,t} g

Implicit GEMM: the B*T tokens form the M dimension of one GEMM per tap, ``tl.dot`` of a
[BLOCK_M, BLOCK_R] tile of x shifted by s_k rows against a [BLOCK_R, BLOCK_N] tile of the
tap's weight. The causal padding is the load mask ``t - s_k >= 0``, which also keeps a
shifted tile from reading the previous sequence of the batch, so no padded copy of x
exists. Accumulation is fp32; float32 dots use TF32 on CUDA exactly when
``torch.backends.cudnn.allow_tf32`` is set (eager ``F.conv1d`` runs cuDNN, which follows
it); float64 inputs accumulate in fp64 through a
broadcast-and-sum product instead of ``tl.dot`` (no portable fp64 dot in Triton), a
slow path kept for exact checks (gradcheck), not for speed.

Memory traffic, M = B*T tokens, d = Ci = Co, e bytes per element (W and the [B, T]
statistics are small next to the activations):
  forward, one kernel: reads x once from HBM (the K taps re-read its rows from L2) and
    the residual, writes out: 3 M*d*e with a residual, 2 without, against about 11 for
    eager (pad copy 2, conv 2, LayerNorm 2, ReLU 2, residual add 3). One program holds
    whole rows of Co (BLOCK_N = next power of two >= Co) up to ROW_TILE, so the
    LayerNorm statistics never leave registers; only mean and rstd are written for the
    backward. Wider rows go in SPLIT_TILE-wide tiles, z parked in out between the
    statistics pass and the normalizing pass: 2 M*d*e more, mostly from L2 (the
    program's own rows, just written).
  backward, three kernels: (1) recompute z from x, fused ReLU + LayerNorm backward:
    reads x and grad_out, writes gz (input dtype) and per-program partial sums of the
    LN-weight, LN-bias and bias grads (3 M*d*e); (2) grad_x as K anti-causal shifted
    GEMMs over gz (2 M*d*e); (3) grad_W per tap, a reduction over token chunks whose
    fp32 partials torch sums in a fixed order (deterministic): reads gz and x once per
    64 x 64 weight tile, mostly from L2. Pre-norm activations are never stored (split
    rows park z in gz for the program's second pass only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._core.tensors import acc_dtype
from .._triton_common import mma as _mma
from .._triton_common import mma_mode as _mma_mode
from .._triton_common import pow2 as _pow2

Tensor = torch.Tensor

# Widest row the fused forward holds whole in one tile. A wider row (and in the
# backward, whose epilogue holds about five tiles live, a row wider than SPLIT_TILE) is
# swept in SPLIT_TILE-wide tiles with a two-pass LayerNorm (row statistics first, z
# parked in the output buffer): a 64-row tile (what wgmma needs per warp group) of a
# whole 1024-wide row would be 256 KB of fp32 accumulator, an SM's whole register
# file. The sweep's nested loop costs about 70 more registers than a whole-row tile
# of the same size (ptxas, sm_90), hence 128 and not 256.
ROW_TILE = 256
SPLIT_TILE = 128


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _shifted_gemm(
    src_ptr, w_ptr, offs_m, offs_n, M, T, R, N, K, k_start, dilation, direction,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MMA: tl.constexpr,
):
    """acc[m, n] = sum_k sum_r src[m - direction*s_k, r] * w[k, r, n], same sequence only.

    src: [M, R] (M = B*T rows, sequences of length T back to back), w: [K, R, N];
    direction +1 is the causal forward, -1 the anti-causal input grad. -> [BLOCK_M, BLOCK_N].
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MMA == "f64":
        acc = acc.to(tl.float64)
    t = offs_m % T
    n_ok = offs_n < N
    n_r = tl.cdiv(R, BLOCK_R)
    # One flat loop over (tap, R block) so the compiler pipelines all of it.
    for i in range(k_start * n_r, K * n_r):
        k = i // n_r
        offs_r = (i - k * n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        shift = direction * (K - 1 - k) * dilation
        # The mask is the causal padding and keeps rows inside their own sequence.
        row_ok = (offs_m < M) & (t - shift >= 0) & (t - shift < T)
        r_ok = offs_r < R
        a = tl.load(
            src_ptr + (offs_m - shift)[:, None] * R + offs_r[None, :],
            mask=row_ok[:, None] & r_ok[None, :], other=0.0,
        )
        b = tl.load(
            w_ptr + (k * R + offs_r[:, None]) * N + offs_n[None, :],
            mask=r_ok[:, None] & n_ok[None, :], other=0.0,
        )
        acc = _mma(a, b, acc, MMA)
    return acc


@triton.jit
def _load_vector(ptr, offs, n, PRESENT: tl.constexpr, default):
    """ptr[offs] (0 past n) in the stored dtype, or ``default`` everywhere when absent."""
    if PRESENT:
        v = tl.load(ptr + offs, mask=offs < n, other=0.0)
    else:
        v = tl.zeros(offs.shape, dtype=tl.float32) + default
    return v


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MMA: tl.constexpr,
):
    """Pre-norm conv output z = conv(x) + bias for tokens offs_m x channels offs_n, in
    fp32: the forward's epilogue input, which the backward recomputes rather than saves."""
    z = _shifted_gemm(
        x_ptr, w_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation, 1,
        BLOCK_M, BLOCK_N, BLOCK_R, MMA,
    )
    return z + _load_vector(bias_ptr, offs_n, Co, HAS_BIAS, 0.0).to(z.dtype)[None, :]


@triton.jit
def _shifted_gemm_kernel(
    src_ptr, w_ptr, bias_ptr, out_ptr, M, T, R, N, K, k_start, dilation, direction,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MMA: tl.constexpr,
):
    """out[M, N] = shifted GEMM (+ bias): the plain conv forward and every input grad."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _shifted_gemm(
        src_ptr, w_ptr, offs_m, offs_n, M, T, R, N, K, k_start, dilation, direction,
        BLOCK_M, BLOCK_N, BLOCK_R, MMA,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(acc.dtype)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_relu_out(
    z, mean, rstd, offs_m, offs_n, M, Co, lnw_ptr, lnb_ptr, res_ptr, out_ptr,
    HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, HAS_RES: tl.constexpr,
):
    """out[offs_m, offs_n] = relu((z - mean) * rstd * ln_w + ln_b) (+ residual); z: fp32."""
    row_ok = offs_m < M
    col_ok = (offs_n < Co)[None, :]
    h = (z - mean[:, None]) * rstd[:, None] * _load_vector(lnw_ptr, offs_n, Co, HAS_LNW, 1.0).to(z.dtype)[None, :]
    h += _load_vector(lnb_ptr, offs_n, Co, HAS_LNB, 0.0).to(z.dtype)[None, :]
    y = tl.maximum(h, 0.0)
    mask = row_ok[:, None] & col_ok
    offs = offs_m[:, None] * Co + offs_n[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(y.dtype)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_ln_relu_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, lnw_ptr, lnb_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr,
    M, T, Ci, Co, K, k_start, dilation, eps,
    HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MMA: tl.constexpr, SPLIT: tl.constexpr,
):
    """One program: BLOCK_M tokens x all Co channels; conv, then the LN/ReLU epilogue.
    SPLIT (Co > BLOCK_N): pass 1 sweeps the column tiles, merging their mean and
    centred sum of squares (Chan et al.) and parking z in out; pass 2 normalizes."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    if SPLIT:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if MMA == "f64":
            mean = mean.to(tl.float64)
            m2 = m2.to(tl.float64)
        for c0 in range(0, Co, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            col_ok = (offs_n < Co)[None, :]
            z = _conv_tile(
                x_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, MMA,
            )
            # Column counts before and after this tile, in the statistics' dtype.
            n_old = tl.minimum(c0, Co).to(mean.dtype)
            n_new = tl.minimum(c0 + BLOCK_N, Co).to(mean.dtype)
            tile_mean = tl.sum(z, axis=1) / (n_new - n_old)  # padded columns hold exact zeros
            diff = tl.where(col_ok, z - tile_mean[:, None], 0.0)
            delta = tile_mean - mean
            mean += delta * ((n_new - n_old) / n_new)
            m2 += tl.sum(diff * diff, axis=1) + delta * delta * (n_old * (n_new - n_old) / n_new)
            offs = offs_m[:, None] * Co + offs_n[None, :]
            tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
        rstd = 1.0 / tl.sqrt(m2 / Co + eps)
        # Pass 2 reads z that other threads of this program wrote.
        tl.debug_barrier()
        for c0 in range(0, Co, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            offs = offs_m[:, None] * Co + offs_n[None, :]
            z = tl.load(out_ptr + offs, mask=row_ok[:, None] & (offs_n < Co)[None, :], other=0.0).to(mean.dtype)
            _ln_relu_out(z, mean, rstd, offs_m, offs_n, M, Co, lnw_ptr, lnb_ptr, res_ptr, out_ptr,
                         HAS_LNW, HAS_LNB, HAS_RES)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        z = _conv_tile(
            x_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation,
            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, MMA,
        )
        mean = tl.sum(z, axis=1) / Co  # padded columns hold exact zeros
        diff = tl.where((offs_n < Co)[None, :], z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / Co + eps)
        _ln_relu_out(z, mean, rstd, offs_m, offs_n, M, Co, lnw_ptr, lnb_ptr, res_ptr, out_ptr,
                     HAS_LNW, HAS_LNB, HAS_RES)
    tl.store(mean_ptr + offs_m, mean.to(mean_ptr.dtype.element_ty), mask=row_ok)
    tl.store(rstd_ptr + offs_m, rstd.to(rstd_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _ln_relu_grad(
    z, mean, rstd, offs_m, offs_n, pid, M, Co, grad_ptr, lnw_ptr, lnb_ptr, part_lnw_ptr, part_lnb_ptr,
    HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, STORE_PARTS: tl.constexpr,
):
    """For a tile of z (fp32): (g * ln_w, zhat), 0 outside the tile's valid entries, with
    g = grad_out * [h > 0]; STORE_PARTS writes the tile's LN-weight/bias grad sums."""
    col_ok = offs_n < Co
    mask = (offs_m < M)[:, None] & col_ok[None, :]
    zhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    lnw = _load_vector(lnw_ptr, offs_n, Co, HAS_LNW, 1.0).to(z.dtype)
    h = zhat * lnw[None, :] + _load_vector(lnb_ptr, offs_n, Co, HAS_LNB, 0.0).to(z.dtype)[None, :]
    g = tl.load(grad_ptr + offs_m[:, None] * Co + offs_n[None, :], mask=mask, other=0.0).to(z.dtype)
    g = tl.where(h > 0, g, 0.0)
    if STORE_PARTS:
        if HAS_LNW:
            tl.store(part_lnw_ptr + pid * Co + offs_n, tl.sum(g * zhat, axis=0), mask=col_ok)
        if HAS_LNB:
            tl.store(part_lnb_ptr + pid * Co + offs_n, tl.sum(g, axis=0), mask=col_ok)
    return g * lnw[None, :], zhat


@triton.jit
def _store_gz(
    g, zhat, rstd, c_one, c_zhat, offs_m, offs_n, pid, M, Co, gz_ptr, part_bias_ptr, HAS_BIAS: tl.constexpr,
):
    """LayerNorm backward of one tile: remove the components along 1 and along zhat
    (row means c_one, c_zhat), store gz and, with a bias, its column sums."""
    col_ok = offs_n < Co
    mask = (offs_m < M)[:, None] & col_ok[None, :]
    gz = tl.where(mask, rstd[:, None] * (g - c_one[:, None] - zhat * c_zhat[:, None]), 0.0)
    tl.store(gz_ptr + offs_m[:, None] * Co + offs_n[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(part_bias_ptr + pid * Co + offs_n, tl.sum(gz, axis=0), mask=col_ok)


@triton.jit
def _conv_ln_relu_bwd_kernel(
    grad_ptr, x_ptr, w_ptr, bias_ptr, lnw_ptr, lnb_ptr, mean_ptr, rstd_ptr,
    gz_ptr, part_lnw_ptr, part_lnb_ptr, part_bias_ptr,
    M, T, Ci, Co, K, k_start, dilation,
    HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MMA: tl.constexpr, SPLIT: tl.constexpr,
):
    """Recompute z, then the fused ReLU + LayerNorm backward: gz [M, Co] and the
    per-program partial sums (row ``pid`` of each [programs, Co] buffer). SPLIT
    (Co > BLOCK_N): pass 1 sweeps the column tiles for the two row means, parking z
    in gz; pass 2 turns the parked z into gz, so the conv is computed once."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    mean = tl.load(mean_ptr + offs_m, mask=row_ok, other=0.0)  # fp32, fp64 for float64
    rstd = tl.load(rstd_ptr + offs_m, mask=row_ok, other=0.0)
    if SPLIT:
        c_zhat = tl.zeros((BLOCK_M,), dtype=mean.dtype)
        c_one = tl.zeros((BLOCK_M,), dtype=mean.dtype)
        for c0 in range(0, Co, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            z = _conv_tile(
                x_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, MMA,
            )
            g, zhat = _ln_relu_grad(z, mean, rstd, offs_m, offs_n, pid, M, Co, grad_ptr, lnw_ptr, lnb_ptr,
                                    part_lnw_ptr, part_lnb_ptr, HAS_LNW, HAS_LNB, False)
            c_zhat += tl.sum(g * zhat, axis=1)
            c_one += tl.sum(g, axis=1)
            offs = offs_m[:, None] * Co + offs_n[None, :]
            tl.store(gz_ptr + offs, z.to(gz_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < Co)[None, :])
        c_zhat = c_zhat / Co
        c_one = c_one / Co
        # Pass 2 reads z that other threads of this program wrote.
        tl.debug_barrier()
        for c0 in range(0, Co, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            offs = offs_m[:, None] * Co + offs_n[None, :]
            z = tl.load(gz_ptr + offs, mask=row_ok[:, None] & (offs_n < Co)[None, :], other=0.0).to(mean.dtype)
            g, zhat = _ln_relu_grad(z, mean, rstd, offs_m, offs_n, pid, M, Co, grad_ptr, lnw_ptr, lnb_ptr,
                                    part_lnw_ptr, part_lnb_ptr, HAS_LNW, HAS_LNB, True)
            _store_gz(g, zhat, rstd, c_one, c_zhat, offs_m, offs_n, pid, M, Co, gz_ptr, part_bias_ptr, HAS_BIAS)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        z = _conv_tile(
            x_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, T, Ci, Co, K, k_start, dilation,
            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R, MMA,
        )
        g, zhat = _ln_relu_grad(z, mean, rstd, offs_m, offs_n, pid, M, Co, grad_ptr, lnw_ptr, lnb_ptr,
                                part_lnw_ptr, part_lnb_ptr, HAS_LNW, HAS_LNB, True)
        c_zhat = tl.sum(g * zhat, axis=1) / Co
        c_one = tl.sum(g, axis=1) / Co
        _store_gz(g, zhat, rstd, c_one, c_zhat, offs_m, offs_n, pid, M, Co, gz_ptr, part_bias_ptr, HAS_BIAS)


@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, part_w_ptr, part_b_ptr, M, T, Ci, Co, K, k_start, dilation, chunk, n_ci_tiles,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    MMA: tl.constexpr,
):
    """part_w[split, k] = sum over the split's tokens m of g[m]^T x[m - s_k]  ([Co, Ci] tile).

    Grid: (Co tiles * Ci tiles, active taps, splits). With HAS_BIAS the programs of
    tap K-1 (no shift, so every token) and the first Ci tile also store the sum of g
    over their tokens into part_b[split].
    """
    pid_co = tl.program_id(0) // n_ci_tiles
    pid_ci = tl.program_id(0) % n_ci_tiles
    k = k_start + tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    shift = (K - 1 - k) * dilation
    offs_co = pid_co.to(tl.int64) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci.to(tl.int64) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = offs_co < Co
    ci_ok = offs_ci < Ci
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    if MMA == "f64":
        acc = acc.to(tl.float64)
        bsum = bsum.to(tl.float64)
    for m0 in range(0, chunk, BLOCK_M):
        offs_m = split * chunk + m0 + tl.arange(0, BLOCK_M)
        row_ok = (offs_m < M) & (offs_m % T >= shift)
        g = tl.load(g_ptr + offs_m[:, None] * Co + offs_co[None, :], mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        xs = tl.load(
            x_ptr + (offs_m - shift)[:, None] * Ci + offs_ci[None, :],
            mask=row_ok[:, None] & ci_ok[None, :], other=0.0,
        )
        acc = _mma(tl.trans(g), xs, acc, MMA)
        if HAS_BIAS:
            bsum += tl.sum(g.to(bsum.dtype), axis=0)
    tile = ((split * K + k) * Co + offs_co[:, None]) * Ci + offs_ci[None, :]
    tl.store(part_w_ptr + tile, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if HAS_BIAS:
        if (pid_ci == 0) & (k == K - 1):
            tl.store(part_b_ptr + split * Co + offs_co, bsum, mask=co_ok)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int


def _gemm_tiles(M: int, R: int, N: int, dtype: torch.dtype, mma: str, row_tile: int = 0) -> _Tiles:
    """Block sizes for the shifted GEMM: M tokens, reduction R, N outputs, ``mma`` the
    mode of ``_common.mma``.

    ``row_tile`` > 0 (the LayerNorm kernels): BLOCK_N covers all of N up to row_tile;
    wider rows take the kernels' two-pass split. Tensor-core dots (half types, TF32)
    take 64-row tiles, as wgmma needs 64 rows per warp group; a tile wider than 64
    spreads over two warp groups (8 warps). IEEE float32 dots run on FMA with operands
    in registers, so they keep 16 fp32 accumulators per thread (32 for the plain GEMM)
    and BLOCK_R <= 32. These compiled for sm_90 without spills at d = 64, 256, 1024
    (ptxas of triton 3.9 and 3.6, checked offline). A weight tile stays near 32 KB of
    shared memory per pipeline stage; tl.dot wants every dim >= 16.
    """
    if dtype == torch.float64:
        # Broadcast-and-sum product: its [BLOCK_M, BLOCK_R, BLOCK_N] temporary is the bound.
        block_n = _pow2(N, 16, row_tile) if row_tile else _pow2(N, 16, 64)
        return _Tiles(_pow2(M, 16, 16), block_n, _pow2(R, 4, max(4, 16384 // (16 * block_n))), 4, 1)
    block_n = _pow2(N, 16, row_tile) if row_tile else _pow2(N, 16, 128)
    tf32_rows = dtype == torch.float32 and mma == "tf32" and row_tile > 0
    if dtype != torch.float32 or mma == "tf32":
        num_warps = 8 if block_n >= 128 else 4
        block_m = _pow2(M, 16, 64)
        # TF32 LayerNorm tiles: 32-wide fp32 steps, 3 stages spilled 8-24 B in the
        # backward (ptxas of triton 3.9 and 3.6); 16 wide in 2 stages do not.
        max_r = 64 if dtype != torch.float32 else 16 if tf32_rows else 32
    else:
        num_warps = 8 if row_tile and block_n > 64 else 4
        per_thread = 16 if row_tile else 32
        block_m = _pow2(M, 16, min(64, max(16, per_thread * 32 * num_warps // block_n)))
        max_r = 32
    block_r = _pow2(R, 16, min(max_r, max(16, (32 * 1024) // (block_n * dtype.itemsize))))
    stage_bytes = (block_m + block_n) * block_r * dtype.itemsize
    num_stages = 3 if 3 * stage_bytes <= 160 * 1024 and not tf32_rows else 2
    return _Tiles(block_m, block_n, block_r, num_warps, num_stages)


def _first_tap(K: int, T: int, dilation: int) -> int:
    """Taps k < this look back T or more steps: they only ever read padding."""
    return max(0, K - 1 - (T - 1) // dilation)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, quick tests


def _taps_major(weight: Tensor, reduce_over_in: bool) -> Tensor:
    """W [Co, Ci, K] -> [K, Ci, Co] (forward) or [K, Co, Ci] (input grad), contiguous,
    so a program's weight tile is read along contiguous rows."""
    return weight.permute(2, 1, 0).contiguous() if reduce_over_in else weight.permute(2, 0, 1).contiguous()


def _vec(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """A 1-D parameter as a contiguous tensor, or a never-read placeholder pointer."""
    return dummy if t is None else t.contiguous()


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _launch_shifted_gemm(
    src: Tensor, w_taps: Tensor, bias: Optional[Tensor], out: Tensor, T: int, dilation: int, direction: int
) -> Tensor:
    """out [M, N] = sum_k src shifted by direction*s_k @ w_taps[k] (+ bias); src: [M, R]."""
    M, R = src.shape
    K, _, N = w_taps.shape
    mma = _mma_mode(src, "conv")
    tiles = _gemm_tiles(M, R, N, src.dtype, mma)
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n))
    _shifted_gemm_kernel[grid](
        src, w_taps, _vec(bias, src), out, M, T, R, N, K, _first_tap(K, T, dilation), dilation, direction,
        HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r,
        MMA=mma, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _grad_weight(
    g: Tensor, x: Tensor, K: int, T: int, dilation: int, need_bias: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """g: [M, Co], x: [M, Ci] -> (grad_W [Co, Ci, K], grad_bias [Co] or None) in the
    accumulation dtype; token chunks give partials summed in a fixed order."""
    M, Co = g.shape
    Ci = x.shape[1]
    f64 = x.dtype == torch.float64
    block_co, block_ci = (_pow2(Co, 16, 32), _pow2(Ci, 16, 32)) if f64 else (_pow2(Co, 16, 64), _pow2(Ci, 16, 64))
    mma = _mma_mode(x, "conv")
    # IEEE float32 (FMA, operands in registers) spilled 12 B at 64 tokens per step (sm_90,
    # ptxas of triton 3.6, Ci > 64); 32 do not.
    block_m = 8 if f64 else 32 if mma == "ieee" and x.dtype == torch.float32 else 64
    k_start = _first_tap(K, T, dilation)
    n_ci_tiles = triton.cdiv(Ci, block_ci)
    tiles = triton.cdiv(Co, block_co) * n_ci_tiles * (K - k_start)
    # Enough chunks to give every SM about two programs, never more than one per block.
    splits = min(triton.cdiv(M, block_m), triton.cdiv(2 * _sm_count(x.device), tiles))
    chunk = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, chunk)
    a = acc_dtype(x.dtype)
    part_w = torch.zeros(splits, K, Co, Ci, dtype=a, device=x.device)
    part_b = torch.empty(splits, Co, dtype=a, device=x.device) if need_bias else part_w
    grid = (triton.cdiv(Co, block_co) * n_ci_tiles, K - k_start, splits)
    _grad_weight_kernel[grid](
        g, x, part_w, part_b, M, T, Ci, Co, K, k_start, dilation, chunk, n_ci_tiles,
        HAS_BIAS=need_bias, BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci,
        MMA=mma, num_warps=4,
    )
    grad_w = part_w.sum(dim=0).permute(1, 2, 0)
    return grad_w, part_b.sum(dim=0) if need_bias else None


def _conv_ln_relu_bwd(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias, ln_weight, ln_bias, mean: Tensor, rstd: Tensor, dilation: int
):
    """Kernel 1 of the backward -> (gz [M, Co] in x's dtype, grad_bias, grad_ln_w, grad_ln_b)
    with the three sums in the accumulation dtype (None where the input is absent)."""
    B, T, Ci = x.shape
    Co, _, K = weight.shape
    M = B * T
    mma = _mma_mode(x, "conv")
    tiles = _gemm_tiles(M, Ci, Co, x.dtype, mma, SPLIT_TILE)
    programs = triton.cdiv(M, tiles.block_m)
    a = acc_dtype(x.dtype)

    def partial(t):
        return None if t is None else torch.empty(programs, Co, dtype=a, device=x.device)

    part_b, part_lnw, part_lnb = partial(bias), partial(ln_weight), partial(ln_bias)
    gz = torch.empty(M, Co, dtype=x.dtype, device=x.device)
    _conv_ln_relu_bwd_kernel[(programs,)](
        grad_out, x, _taps_major(weight, True), _vec(bias, x), _vec(ln_weight, x), _vec(ln_bias, x),
        mean, rstd, gz, _vec(part_lnw, mean), _vec(part_lnb, mean), _vec(part_b, mean),
        M, T, Ci, Co, K, _first_tap(K, T, dilation), dilation,
        HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r,
        MMA=mma, SPLIT=tiles.block_n < Co, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    sums = [None if p is None else p.sum(dim=0) for p in (part_b, part_lnw, part_lnb)]
    return (gz, *sums)


def _cast(t: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(like.dtype)


# --------------------------------------------------------------------------------------
# backend functions (signatures of cprec_kernels.reference)
# --------------------------------------------------------------------------------------
def causal_conv1d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """x: [B, T, Ci], weight: [Co, Ci, K], bias: [Co] or None -> y: [B, T, Co]."""
    B, T, Ci = x.shape
    out = torch.empty(B, T, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch_shifted_gemm(x.view(B * T, Ci), _taps_major(weight, True), bias, out.view(B * T, -1), T, dilation, 1)
    return out


def causal_conv1d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """-> (grad_x [B, T, Ci], grad_weight [Co, Ci, K], grad_bias [Co] or None)."""
    B, T, Ci = x.shape
    Co = weight.shape[0]
    g = grad_y.view(B * T, Co)
    grad_x = torch.empty_like(x)
    _launch_shifted_gemm(g, _taps_major(weight, False), None, grad_x.view(B * T, Ci), T, dilation, -1)
    grad_w, grad_b = _grad_weight(g, x.view(B * T, Ci), weight.shape[2], T, dilation, bias is not None)
    return grad_x, grad_w.to(weight.dtype), _cast(grad_b, bias)


def causal_conv1d_ln_relu_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    residual: Optional[Tensor],
    dilation: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (out [B, T, Co] in x's dtype, mean [B, T], rstd [B, T] in the accumulation dtype,
    None: no saved z, the backward kernel recomputes it)."""
    B, T, Ci = x.shape
    Co, _, K = weight.shape
    M = B * T
    mma = _mma_mode(x, "conv")
    tiles = _gemm_tiles(M, Ci, Co, x.dtype, mma, ROW_TILE if Co <= ROW_TILE else SPLIT_TILE)
    out = torch.empty(B, T, Co, dtype=x.dtype, device=x.device)
    mean = torch.empty(B, T, dtype=acc_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    _conv_ln_relu_fwd_kernel[(triton.cdiv(M, tiles.block_m),)](
        x, _taps_major(weight, True), _vec(bias, x), _vec(ln_weight, x), _vec(ln_bias, x), _vec(residual, x),
        out, mean, rstd, M, T, Ci, Co, K, _first_tap(K, T, dilation), dilation, eps,
        HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
        HAS_RES=residual is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r,
        MMA=mma, SPLIT=tiles.block_n < Co, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, mean, rstd, None


def causal_conv1d_ln_relu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    dilation: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """-> (grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias); the residual's
    grad is grad_out itself. ``eps`` is unused: rstd already holds it."""
    B, T, Ci = x.shape
    Co, _, K = weight.shape
    gz, grad_b, grad_lnw, grad_lnb = _conv_ln_relu_bwd(
        grad_out, x, weight, bias, ln_weight, ln_bias, mean.contiguous(), rstd.contiguous(), dilation
    )
    grad_x = torch.empty_like(x)
    _launch_shifted_gemm(gz, _taps_major(weight, False), None, grad_x.view(B * T, Ci), T, dilation, -1)
    grad_w, _ = _grad_weight(gz, x.view(B * T, Ci), K, T, dilation, need_bias=False)
    return grad_x, grad_w.to(weight.dtype), _cast(grad_b, bias), _cast(grad_lnw, ln_weight), _cast(grad_lnb, ln_bias)
