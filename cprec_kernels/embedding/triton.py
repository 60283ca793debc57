"""Triton backend of the block-wise factorized embedding (CpRec's input layer).

Formula, for flat ids [N], blocks j = 0..n-1 holding ids [c_j, c_{j+1}), tables
E_j: [c_{j+1} - c_j, d_j], projections P_j: [d, d_j] (None: identity, d_j = d):

    out[t]      = E_j[id_t - c_j] @ P_j^T              [N, d]; zeros for padding ids
    grad E_j[r] = (sum_{t: id_t = c_j + r} g_t) @ P_j    rows never looked up stay zero
    grad P_j    = sum_{t in block j} g_t^T E_j[id_t - c_j]          [d, d_j]

Forward (one kernel, ``_forward_kernel``): a program owns a [BLOCK_N tokens, BLOCK_D
columns] tile of ``out``. It loops over the blocks (up to 4 per launch, each a pointer
pair with constexpr width), gathers the rows of its tokens that fall in the block
(masked loads, so other tokens cost no traffic), multiplies them with the block's
projection tile on tensor cores (fp32 accumulation) and stores the tile once. Blocks
with no token in the tile are skipped. Traffic per token: its id, one gathered row of
d_j elements and one output row of d elements; the projections (<= d * sum_j d_j
elements) are re-read per tile from L2. More than 4 blocks take one more launch per 4
blocks: the first writes every row, later ones only their own tokens' rows.

Backward (deterministic, no atomics): the ids are sorted once (``torch.sort``, stable)
so each block is one contiguous range of the sorted order and equal ids are adjacent
("runs"). Per block:
  ``_table_grad_kernel``: a program takes CHUNK sorted positions, projects their grads
    (gathered by the sort order) with G @ P_j, sums the runs inside the chunk with a 0/1
    [CHUNK, CHUNK] matrix product and writes the rows of the runs that end in the chunk;
    it also leaves the chunk's first and last run partials in fp32 scratch
    ([N / CHUNK, d_j] each).
  ``_run_carry_kernel``: the chunk where a run longer than a chunk starts (a popular
    item) adds the partials of the chunks it covers, in chunk order, and writes its row.
  ``_projection_grad_kernel``: grad P_j as a split-K GEMM over the block's sorted
    tokens, fp32 partials [SPLIT, d, d_j] summed by torch in a fixed order.
Traffic: each grad_out row is read twice (for its table grad, where the column tiles of
a chunk run side by side and share it through L2, and for grad P_j), each table row
touched is read once per column tile of grad P_j, each grad row is written once; the
dense zero fill of the table grads (the API returns dense grads) is the rest.

Dtypes: float32 (IEEE dot unless torch allows TF32), bfloat16 and float16 tables with
fp32 accumulation; float64 runs the same kernels with a broadcast-and-sum product in
fp64 instead of ``tl.dot`` (correct, not fast: for tests and CPU checks).
Ids outside [0, V) (possible only with ``check_bounds=False``) act as padding.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._core.tensors import acc_dtype
from .reference import embedding_dim
from .._triton_common import mma as _mma
from .._triton_common import mma_mode as _mma_mode
from .._triton_common import pow2 as _pow2

Tensor = torch.Tensor

# Blocks per forward launch: each one is a (table, projection) pointer pair argument.
MAX_BLOCKS_PER_LAUNCH = 4
# Sorted positions per backward program. Tests lower it to force long runs to span chunks.
CHUNK = 32
# Tokens per split of the grad-P_j reduction, and the most splits (fp32 partials).
TOKENS_PER_SPLIT = 4096
MAX_SPLIT = 64


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _zeros(shape, MMA: tl.constexpr):
    """An accumulator: fp64 for float64 tables, fp32 otherwise."""
    if MMA == "f64":
        acc = tl.zeros(shape, dtype=tl.float64)
    else:
        acc = tl.zeros(shape, dtype=tl.float32)
    return acc


@triton.jit
def _sum_runs(same, h, MMA: tl.constexpr):
    """same @ h for a 0/1 matrix ``same`` [C, C] and fp32/fp64 ``h`` [C, Q]: exact products."""
    if MMA == "f64":
        out = tl.sum(same[:, :, None].to(tl.float64) * h[None, :, :], axis=1)
    else:
        out = tl.dot(same.to(tl.float32), h, input_precision="ieee")
    return out


@triton.jit
def _add_block(
    acc, ids, live, table, proj, lo, hi, offs_d,
    D: tl.constexpr, D_J: tl.constexpr, BLOCK_K: tl.constexpr, HAS_PROJ: tl.constexpr, MMA: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_D] += the rows of the tokens with lo <= id < hi, projected to
    columns ``offs_d``. table: [hi - lo, D_J], proj: [D, D_J] (read as P^T tiles)."""
    member = live & (ids >= lo) & (ids < hi)
    # Zipf ids mostly sit in the head, so many tiles hold no token of a tail block.
    if tl.max(member.to(tl.int32), axis=0) > 0:
        # A clamp, not tl.where(member, ...): triton 3.6 fails to lower an op on the i1
        # ``member`` here once two blocks reach tl.dot. Members' rows are unchanged.
        rows = tl.minimum(tl.maximum(ids - lo, 0), hi - lo - 1)
        in_d = offs_d < D
        if HAS_PROJ:
            for k0 in range(0, D_J, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                in_k = offs_k < D_J
                x = tl.load(table + rows[:, None] * D_J + offs_k[None, :],
                            mask=member[:, None] & in_k[None, :], other=0.0)
                p = tl.load(proj + offs_d[None, :] * D_J + offs_k[:, None],
                            mask=in_k[:, None] & in_d[None, :], other=0.0)
                acc = _mma(x, p, acc, MMA)
        else:
            x = tl.load(table + rows[:, None] * D + offs_d[None, :], mask=member[:, None] & in_d[None, :], other=0.0)
            acc += x.to(acc.dtype)
    return acc


@triton.jit
def _forward_kernel(
    ids_ptr, ids_stride, out_ptr, n_tokens, pad, own_lo, own_hi,
    e0, p0, e1, p1, e2, p2, e3, p3,
    c0, c1, c2, c3, c4,
    D: tl.constexpr, NUM_BLOCKS: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, H3: tl.constexpr,
    HAS_PAD: tl.constexpr, WRITE_ALL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MMA: tl.constexpr,
):
    """out[t, cols] for a tile of tokens; block j of this launch holds ids [c_j, c_{j+1}),
    has table e_j [c_{j+1} - c_j, D_j], projection p_j [D, D_j] (H_j) and K-tile K_j.

    WRITE_ALL: store every row (zeros for tokens in no block of this launch); else only
    rows with own_lo <= id < own_hi (a later launch of a model with > 4 blocks).
    """
    # Column tiles of one token tile are neighbours in launch order: they share its ids
    # and gathered rows through L2.
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // ((D + BLOCK_D - 1) // BLOCK_D)
    pid_d = pid % ((D + BLOCK_D - 1) // BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_n = offs_n < n_tokens
    ids = tl.load(ids_ptr + offs_n * ids_stride, mask=in_n, other=-1).to(tl.int64)
    live = in_n
    if HAS_PAD:
        live = live & (ids != pad)
    acc = _zeros((BLOCK_N, BLOCK_D), MMA)
    acc = _add_block(acc, ids, live, e0, p0, c0, c1, offs_d, D, D0, K0, H0, MMA)
    if NUM_BLOCKS > 1:
        acc = _add_block(acc, ids, live, e1, p1, c1, c2, offs_d, D, D1, K1, H1, MMA)
    if NUM_BLOCKS > 2:
        acc = _add_block(acc, ids, live, e2, p2, c2, c3, offs_d, D, D2, K2, H2, MMA)
    if NUM_BLOCKS > 3:
        acc = _add_block(acc, ids, live, e3, p3, c3, c4, offs_d, D, D3, K3, H3, MMA)
    keep = in_n
    if not WRITE_ALL:
        keep = keep & live & (ids >= own_lo) & (ids < own_hi)
    out = out_ptr + offs_n[:, None] * D + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=keep[:, None] & (offs_d < D)[None, :])


@triton.jit
def _project_grads(
    grad_ptr, tok, valid, proj, offs_j, in_j,
    D: tl.constexpr, D_J: tl.constexpr, HAS_PROJ: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, MMA: tl.constexpr,
):
    """h [CHUNK, BLOCK_J] = g[tok] @ P[:, offs_j] (identity: g[tok][:, offs_j]), accumulator dtype."""
    if HAS_PROJ:
        h = _zeros((CHUNK, BLOCK_J), MMA)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            g = tl.load(grad_ptr + tok[:, None] * D + offs_d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
            p = tl.load(proj + offs_d[:, None] * D_J + offs_j[None, :], mask=in_d[:, None] & in_j[None, :], other=0.0)
            h = _mma(g, p, h, MMA)
    else:
        h = _zeros((CHUNK, BLOCK_J), MMA)
        h += tl.load(grad_ptr + tok[:, None] * D + offs_j[None, :], mask=valid[:, None] & in_j[None, :], other=0.0)
    return h


@triton.jit
def _chunk_program(bounds_ptr, block, D_J: tl.constexpr, BLOCK_J: tl.constexpr):
    """-> (chunk, column tile, block start in the sorted order, block length) of this
    program. Column tiles of a chunk are neighbouring programs (shared rows stay in L2)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = (D_J + BLOCK_J - 1) // BLOCK_J
    start = tl.load(bounds_ptr + block)
    return pid // tiles, pid % tiles, start, tl.load(bounds_ptr + block + 1) - start


@triton.jit
def _table_grad_kernel(
    grad_ptr, keys_ptr, order_ptr, bounds_ptr, proj, grad_table, first_part, last_part, block, lo,
    D: tl.constexpr, D_J: tl.constexpr, HAS_PROJ: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, MMA: tl.constexpr,
):
    """Rows of grad E_j for the runs of equal ids that end in this chunk of sorted positions.

    keys: sorted ids [N], order: their token positions [N], bounds: [n_blocks + 1] start of
    each block in the sorted order. first_part/last_part: [n_chunks, D_J] partial sums of
    the chunk's first and last run, for ``_run_carry_kernel``.
    """
    pid_c, pid_j, start, count = _chunk_program(bounds_ptr, block, D_J, BLOCK_J)
    q0 = pid_c * CHUNK
    if q0 < count:
        offs = tl.arange(0, CHUNK)
        q = q0 + offs
        valid = q < count
        key = tl.load(keys_ptr + start + q, mask=valid, other=-1).to(tl.int64)
        prev = tl.load(keys_ptr + start + q - 1, mask=valid & (q > 0), other=-1).to(tl.int64)
        starts = valid & (key != prev)  # a run begins at this position
        heads = starts | (valid & (offs == 0))  # first position of a run within the chunk
        last_key = tl.max(tl.where(valid, key, -1), axis=0)
        after = tl.load(keys_ptr + start + q0 + CHUNK, mask=q0 + CHUNK < count, other=-1).to(tl.int64)
        # Only the chunk's last run can go on in the next chunk (key == after); the
        # chunk where it starts leaves it to _run_carry_kernel.

        offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        in_j = offs_j < D_J
        tok = tl.load(order_ptr + start + q, mask=valid, other=0)
        h = _project_grads(grad_ptr, tok, valid, proj, offs_j, in_j, D, D_J, HAS_PROJ, CHUNK, BLOCK_J, BLOCK_D, MMA)
        # runs[i] = sum of h over the positions of this chunk with the key of head i.
        same = heads[:, None] & (key[:, None] == key[None, :]) & valid[None, :]
        runs = _sum_runs(same, h, MMA)

        done = starts & (key != after)
        rows = tl.where(done, key - lo, 0)
        tl.store(grad_table + rows[:, None] * D_J + offs_j[None, :], runs.to(grad_table.dtype.element_ty),
                 mask=done[:, None] & in_j[None, :])
        first = tl.sum(tl.where((offs == 0)[:, None], runs, 0.0), axis=0)
        last = tl.sum(tl.where((heads & (key == last_key))[:, None], runs, 0.0), axis=0)
        tl.store(first_part + pid_c * D_J + offs_j, first, mask=in_j)
        tl.store(last_part + pid_c * D_J + offs_j, last, mask=in_j)


@triton.jit
def _run_carry_kernel(
    keys_ptr, bounds_ptr, grad_table, first_part, last_part, block, lo,
    D_J: tl.constexpr, CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The row of a run that starts in this chunk and spills into the next ones:
    its partial here plus the first-run partials of the following chunks it covers."""
    pid_c, pid_j, start, count = _chunk_program(bounds_ptr, block, D_J, BLOCK_J)
    q0 = pid_c * CHUNK
    if q0 + CHUNK < count:
        last_key = tl.load(keys_ptr + start + q0 + CHUNK - 1).to(tl.int64)
        after = tl.load(keys_ptr + start + q0 + CHUNK).to(tl.int64)
        before = tl.load(keys_ptr + start + q0 - 1, mask=q0 > 0, other=-1).to(tl.int64)
        if (after == last_key) & (before != last_key):
            offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
            in_j = offs_j < D_J
            total = tl.load(last_part + pid_c * D_J + offs_j, mask=in_j, other=0.0)
            chunk = pid_c + 1
            more = after == last_key
            # BLOCK_C chunks per step: a run of L ids costs L / (CHUNK * BLOCK_C) steps.
            while more:
                cs = chunk + tl.arange(0, BLOCK_C)
                first_key = tl.load(keys_ptr + start + cs * CHUNK, mask=cs * CHUNK < count, other=-1).to(tl.int64)
                same = first_key == last_key
                parts = tl.load(first_part + cs[:, None] * D_J + offs_j[None, :], mask=same[:, None] & in_j[None, :],
                                other=0.0)
                total += tl.sum(parts, axis=0)
                more = tl.min(same.to(tl.int32), axis=0) > 0
                chunk += BLOCK_C
            tl.store(grad_table + (last_key - lo) * D_J + offs_j, total.to(grad_table.dtype.element_ty), mask=in_j)


@triton.jit
def _projection_grad_kernel(
    grad_ptr, keys_ptr, order_ptr, bounds_ptr, table, partial, block, lo,
    D: tl.constexpr, D_J: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr, MMA: tl.constexpr,
):
    """partial[s] [D, D_J] = sum over split s of block j's sorted tokens of g_t^T E_j[row_t]."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    start = tl.load(bounds_ptr + block)
    count = tl.load(bounds_ptr + block + 1) - start
    per_split = tl.cdiv(count, tl.num_programs(2))
    q_lo = pid_s * per_split
    q_hi = tl.minimum(q_lo + per_split, count)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    in_d = offs_d < D
    in_j = offs_j < D_J
    acc = _zeros((BLOCK_D, BLOCK_J), MMA)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        valid = q < q_hi
        tok = tl.load(order_ptr + start + q, mask=valid, other=0)
        row = tl.load(keys_ptr + start + q, mask=valid, other=lo).to(tl.int64) - lo
        g_t = tl.load(grad_ptr + tok[None, :] * D + offs_d[:, None], mask=in_d[:, None] & valid[None, :], other=0.0)
        x = tl.load(table + row[:, None] * D_J + offs_j[None, :], mask=valid[:, None] & in_j[None, :], other=0.0)
        acc = _mma(g_t, x, acc, MMA)
    out = partial + pid_s * D * D_J + offs_d[:, None] * D_J + offs_j[None, :]
    tl.store(out, acc, mask=in_d[:, None] & in_j[None, :])


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
def _k_tile(width: int, dtype: torch.dtype) -> int:
    """Reduction tile: tl.dot needs K >= 16; 64 half / 32 fp32 elements keep one operand
    stage near 8 KB per 64 rows; the fp64 broadcast product keeps its 3-D temporary small."""
    if dtype == torch.float64:
        return 16
    return _pow2(width, 16, 32 if dtype == torch.float32 else 64)


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
def _launch_forward(flat: Tensor, out: Tensor, weights, projections, edges, padding_idx, first: int) -> None:
    """One launch over blocks first..first+3. flat: [N] ids (any stride: a flattened slice
    needs no copy), out: [N, d]; edges = [0, c1, ..., V]."""
    blocks = list(range(first, min(first + MAX_BLOCKS_PER_LAUNCH, len(weights))))
    n, d = out.shape
    f64 = out.dtype == torch.float64
    block_n = 16 if f64 else 64
    # float32 (IEEE: an FMA product) spills at 128 columns: 64x128 accumulators + operands.
    block_d = _pow2(d, 16, 32 if f64 else 64 if out.dtype == torch.float32 else 128)
    args, widths, k_tiles, has_proj = [], [], [], []
    for slot in range(MAX_BLOCKS_PER_LAUNCH):
        j = blocks[min(slot, len(blocks) - 1)]  # unused slots repeat a real block; NUM_BLOCKS masks them
        proj = projections[j]
        args += [weights[j], weights[j] if proj is None else proj]
        widths.append(weights[j].shape[1])
        k_tiles.append(_k_tile(weights[j].shape[1], out.dtype))
        has_proj.append(proj is not None)
    bounds = [edges[min(first + s, len(edges) - 1)] for s in range(MAX_BLOCKS_PER_LAUNCH + 1)]
    grid = (triton.cdiv(n, block_n) * triton.cdiv(d, block_d),)
    _forward_kernel[grid](
        flat, flat.stride(0), out, n, 0 if padding_idx is None else padding_idx,
        edges[blocks[0]], edges[blocks[-1] + 1],
        *args, *bounds,
        D=d, NUM_BLOCKS=len(blocks), D0=widths[0], D1=widths[1], D2=widths[2], D3=widths[3],
        K0=k_tiles[0], K1=k_tiles[1], K2=k_tiles[2], K3=k_tiles[3],
        H0=has_proj[0], H1=has_proj[1], H2=has_proj[2], H3=has_proj[3],
        HAS_PAD=padding_idx is not None, WRITE_ALL=first == 0,
        BLOCK_N=block_n, BLOCK_D=block_d, MMA=_mma_mode(out),
    )


def blockwise_embedding_forward(
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tensor:
    """ids: any shape, int32/int64; weights[j]: [c_{j+1}-c_j, d_j]; projections[j]: [d, d_j]
    or None -> [*ids.shape, d] in the tables' dtype (see ``reference.blockwise_embedding_forward``)."""
    flat = ids.reshape(-1)
    d = embedding_dim(weights, projections)
    out = torch.empty(flat.numel(), d, dtype=weights[0].dtype, device=ids.device)
    edges = [0] + list(cutoffs)
    if flat.numel() > 0:
        for first in range(0, len(weights), MAX_BLOCKS_PER_LAUNCH):
            _launch_forward(flat, out, weights, projections, edges, padding_idx, first)
    return out.reshape(*ids.shape, d)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _edges_on(edges: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    # Cached so only the first call with these cutoffs pays the host-to-device copy.
    return torch.tensor(edges, dtype=dtype, device=device)


def _sort_by_id(flat: Tensor, cutoffs: Sequence[int], padding_idx: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (keys [N] sorted ids, padding and out-of-range ids as V at the end;
    order [N] int64 token of each key; bounds [n_blocks + 1] int64 first sorted position of
    each block, then the count of real ids). Stable, so equal ids keep token order."""
    V = cutoffs[-1]
    live = (flat >= 0) & (flat < V)
    if padding_idx is not None:
        live &= flat != padding_idx
    key_dtype = torch.int32 if V < 2**31 - 1 else torch.int64  # narrower keys sort faster
    keys, order = torch.sort(torch.where(live, flat, V).to(key_dtype), stable=True)
    bounds = torch.searchsorted(keys, _edges_on(tuple([0] + list(cutoffs)), keys.device, key_dtype))
    return keys, order, bounds


def _table_grad(g: Tensor, keys: Tensor, order: Tensor, bounds: Tensor, j: int, lo: int,
                table: Tensor, proj: Optional[Tensor]) -> Tensor:
    """grad E_j: [c_{j+1}-c_j, d_j] in the table's dtype. g: [N, d]."""
    n, d = g.shape
    d_j = table.shape[1]
    f64 = table.dtype == torch.float64
    grad = torch.zeros_like(table)
    chunk = min(CHUNK, 16) if f64 else CHUNK  # the fp64 run sum is a [chunk, chunk, BLOCK_J] temporary
    chunks = triton.cdiv(n, chunk)
    first = torch.empty(chunks, d_j, dtype=acc_dtype(table.dtype), device=g.device)
    last = torch.empty_like(first)
    block_j = _pow2(d_j, 16, 16 if f64 else 64)
    grid = (chunks * triton.cdiv(d_j, block_j),)
    _table_grad_kernel[grid](
        g, keys, order, bounds, table if proj is None else proj, grad, first, last, j, lo,
        D=d, D_J=d_j, HAS_PROJ=proj is not None, CHUNK=chunk, BLOCK_J=block_j,
        BLOCK_D=_k_tile(d, table.dtype), MMA=_mma_mode(table),
    )
    _run_carry_kernel[grid](keys, bounds, grad, first, last, j, lo, D_J=d_j, CHUNK=chunk, BLOCK_J=block_j, BLOCK_C=16)
    return grad


def _projection_grad(g: Tensor, keys: Tensor, order: Tensor, bounds: Tensor, j: int, lo: int,
                     table: Tensor, proj: Tensor) -> Tensor:
    """grad P_j: [d, d_j] in the projection's dtype. g: [N, d]."""
    n, d = g.shape
    d_j = table.shape[1]
    f64 = table.dtype == torch.float64
    split = max(1, min(MAX_SPLIT, n // TOKENS_PER_SPLIT))
    partial = torch.empty(split, d, d_j, dtype=acc_dtype(table.dtype), device=g.device)
    block_d = _pow2(d, 16, 16 if f64 else 64)
    block_j = _pow2(d_j, 16, 16 if f64 else 64)
    mma = _mma_mode(table)
    # IEEE float32 (FMA, operands in registers) spilled 4 B at 32 tokens per step
    # (sm_90, ptxas of triton 3.9, d_j = 64); 16 do not.
    block_q = 16 if f64 or (mma == "ieee" and table.dtype == torch.float32) else 32
    grid = (triton.cdiv(d, block_d), triton.cdiv(d_j, block_j), split)
    _projection_grad_kernel[grid](
        g, keys, order, bounds, table, partial, j, lo,
        D=d, D_J=d_j, BLOCK_D=block_d, BLOCK_J=block_j, BLOCK_Q=block_q, MMA=mma,
    )
    return partial.sum(dim=0).to(proj.dtype)


def blockwise_embedding_backward(
    grad_out: Tensor,
    ids: Tensor,
    weights: Sequence[Tensor],
    projections: Sequence[Optional[Tensor]],
    cutoffs: Sequence[int],
    padding_idx: Optional[int],
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """grad_out: [*ids.shape, d] -> (grads of the tables, grads of the projections; None
    where a projection is None). Deterministic: no atomics, fixed summation order."""
    flat = ids.reshape(-1)
    g = grad_out.reshape(flat.numel(), -1).contiguous()
    keys, order, bounds = _sort_by_id(flat, cutoffs, padding_idx)
    edges = [0] + list(cutoffs)
    grad_weights, grad_projections = [], []
    for j, (table, proj) in enumerate(zip(weights, projections)):
        grad_weights.append(_table_grad(g, keys, order, bounds, j, edges[j], table, proj))
        grad_projections.append(
            None if proj is None else _projection_grad(g, keys, order, bounds, j, edges[j], table, proj)
        )
    return grad_weights, grad_projections
