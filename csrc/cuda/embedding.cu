// Block-wise factorized embedding on CUDA: forward and deterministic backward.
//
//   out[n]      = E_j[id_n - c_j] @ P_j^T                   [N, d]; zeros for padding ids
//   grad E_j[r] = (sum_{n: id_n = c_j + r} g_n) @ P_j        [c_{j+1}-c_j, d_j]
//   grad P_j    = sum_{n in block j} g_n^T E_j[id_n - c_j]   [d, d_j]
//
// ids: N ids (int32/int64, any single stride), E_j: [c_{j+1}-c_j, d_j], P_j: [d, d_j] or
// null (identity, d_j = d), g = grad_out: [N, d]. Tables in float32, bfloat16 or float16;
// every sum runs in fp32 and is cast once on store.
//
// Only CUDA toolkit headers here (runtime, fp16/bf16, CUB): the CPU build of torch on
// the development machines has no CUDA config headers, and this file must still compile
// there (csrc/cuda/compile_check.sh). The ATen glue is embedding_glue.cpp.
//
// Forward (forward_kernel): grid (token tiles of 256, blocks). The CTA of (tile, j)
// reads the tile's ids, keeps those in block j (CTAs of j = 0 also zero the padding and
// out-of-range rows, so every row is written exactly once) and
//   - identity block: one warp per token copies the row with 16-byte vector loads/stores;
//   - projected block, d_j <= 256 and >= 16 of its tokens in the tile: P_j^T is staged in
//     shared memory in column slices [d_j, S] (fp32; S <= 256 chosen so the CTA stays
//     within 96 KB), each warp stages the rows of 4 tokens (16-byte loads, fp32) and
//     computes their 4 x S outputs with lane-strided columns (conflict-free smem reads,
//     coalesced stores);
//   - otherwise (d_j > 256, or a block too sparse in the tile for staging to pay): one
//     warp per token reads P_j's rows through L1, one warp reduction per output column.
// Traffic: the ids once per block (4-8 B x N x n_blocks), one table row per token, one
// output row per token, and P_j from L2 once per CTA that stages it.
//
// Backward (no float atomics, bitwise deterministic):
//  1. keys_kernel + cub::DeviceRadixSort::SortPairs of (id, position): padding and
//     out-of-range ids get key V and sort to the end; LSB radix sort is stable, so equal
//     ids keep token order and each block is a contiguous range of sorted positions.
//  2. run_sum_kernel: one warp per chunk of 64 sorted positions sums the grad rows of each
//     run of equal ids in position order (fp32, shared memory). A run wholly inside the
//     chunk is finished at once (projected with P_j read through L1, written as its table
//     row); a run cut by a chunk edge leaves its piece in fp32 scratch (last_part[k] for
//     the piece that starts the run, first_part[k] for a continuation).
//  3. run_carry_kernel: the chunk where a cut run starts adds the continuation pieces of
//     the following chunks in chunk order and finishes the row. Every warp does equal
//     work in step 2 whatever the id skew (a popular id is 64-position pieces).
//  4. proj_partial_kernel: grad P_j as a split-K GEMM over block j's sorted positions,
//     64x64 output tiles, fp32 partials [splits, d, d_j]; proj_reduce_kernel sums the
//     splits in order and casts.
// Traffic: ids + the sort (~3 radix passes over 8 B per token), each grad row read twice
// (step 2 and step 4), each touched table row read once per 64-column tile of grad P_j,
// each touched grad row written once, scratch of 2 x N/64 x d fp32; the dense zero fill
// of the table grads is done by the caller.
#include "embedding.h"

#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace cprec::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// dtype helpers
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte vector.
template <typename T>
__host__ __device__ constexpr int vec_n() { return 16 / static_cast<int>(sizeof(T)); }

// Whether rows of `width` elements starting at `ptr` can all be read as 16-byte vectors.
template <typename T>
bool vec_ok(const void* ptr, int64_t width) {
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (width * sizeof(T)) % 16 == 0;
}

// ---------------------------------------------------------------------------------------
// warp row helpers (lane in [0, 32))
// ---------------------------------------------------------------------------------------
// dst[0:len] (fp32, shared) = src[0:len]
template <typename T>
__device__ __forceinline__ void row_to_f32(const T* __restrict__ src, int64_t len, bool vec, float* dst, int lane) {
  if (vec) {
    constexpr int V = vec_n<T>();
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (int64_t i = lane; i < len / V; i += 32) {
      const uint4 u = __ldg(s + i);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int q = 0; q < V; ++q) dst[i * V + q] = to_f(e[q]);
    }
  } else {
    for (int64_t i = lane; i < len; i += 32) dst[i] = to_f(src[i]);
  }
}

template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t len, bool vec,
                                         int lane) {
  if (vec) {
    constexpr int V = vec_n<T>();
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* o = reinterpret_cast<uint4*>(dst);
    for (int64_t i = lane; i < len / V; i += 32) o[i] = __ldg(s + i);
  } else {
    for (int64_t i = lane; i < len; i += 32) dst[i] = src[i];
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* dst, int64_t len, bool vec, int lane) {
  if (vec) {
    constexpr int V = vec_n<T>();
    uint4* o = reinterpret_cast<uint4*>(dst);
    for (int64_t i = lane; i < len / V; i += 32) o[i] = make_uint4(0u, 0u, 0u, 0u);
  } else {
    for (int64_t i = lane; i < len; i += 32) dst[i] = from_f<T>(0.0f);
  }
}

// dst[c] = sum_k P[c, k] e[k] for c < d; P: [d, dj] read through L1, one warp reduction
// per output column. Lane c % 32 keeps column c, so the stores are coalesced in 32s.
template <typename T>
__device__ void project_row_l1(T* __restrict__ dst, const T* __restrict__ e, const T* __restrict__ proj, int64_t d,
                               int64_t dj, int lane) {
  float mine = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    const T* prow = proj + c * dj;
    float s = 0.0f;
    for (int64_t k = lane; k < dj; k += 32) s += to_f(__ldg(prow + k)) * to_f(__ldg(e + k));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    if ((c & 31) == lane) mine = s;
    if ((c & 31) == 31 || c == d - 1) {
      const int64_t base = c & ~int64_t{31};
      if (base + lane <= c) dst[base + lane] = from_f<T>(mine);
    }
  }
}

// ---------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------
constexpr int kFwdThreads = 256;
constexpr int kFwdWarps = kFwdThreads / 32;
constexpr int kFwdTile = kFwdThreads;  // tokens per CTA: one id per thread
constexpr int kTok = 4;                // tokens per warp step of the staged projection
constexpr int kMaxColsPerLane = 8;     // slice width <= 32 * 8 = 256 columns
constexpr int kMaxStagedWidth = 256;   // d_j above this: the L1 path
constexpr int kMinStagedTokens = 16;   // fewer tokens of the block in a tile: the L1 path
constexpr size_t kFwdSmemBudget = 96 * 1024;

struct FwdBlock {
  const void* table;
  const void* proj;
  int64_t lo, hi, width;
  int slice;  // staged P^T slice width (0: never staged)
  bool vec;   // table rows readable as 16-byte vectors
};

struct FwdParams {
  const void* ids;
  int64_t id_stride, n, d, vocab, padding;
  bool has_padding, out_vec;
  void* out;
  FwdBlock blocks[kMaxBlocks];
};

// Shared floats of a staged projected block: kFwdWarps x kTok rows of d_j, then the
// [d_j, slice + 1] slice of P^T (+1: the transposing stores do not all hit one bank).
__host__ __device__ inline int64_t staged_floats(int64_t dj, int64_t slice) {
  return kFwdWarps * kTok * dj + dj * (slice + 1);
}

// The tile's tokens in block j go to (list_tok, list_row), *count of them; for j = 0 the
// padding and out-of-range ones go to zero_tok, *zero_count of them (so every row is
// written once). List order is irrelevant: each row is computed by one warp with a fixed
// summation order, so the result does not depend on it.
template <typename Idx>
__device__ void collect_tile(const FwdParams& p, const FwdBlock& b, int j, int64_t n0, int* list_tok,
                             int64_t* list_row, int* zero_tok, int* count, int* zero_count) {
  if (threadIdx.x == 0) *count = *zero_count = 0;
  __syncthreads();
  const int64_t n = n0 + threadIdx.x;
  if (n < p.n) {
    const int64_t id = static_cast<int64_t>(static_cast<const Idx*>(p.ids)[n * p.id_stride]);
    const bool pad = p.has_padding && id == p.padding;
    if (!pad && id >= b.lo && id < b.hi) {
      const int slot = atomicAdd(count, 1);
      list_tok[slot] = threadIdx.x;
      list_row[slot] = id - b.lo;
    } else if (j == 0 && (pad || id < 0 || id >= p.vocab)) {
      zero_tok[atomicAdd(zero_count, 1)] = threadIdx.x;
    }
  }
  __syncthreads();
}

// Identity block (d_j = d): one warp per token copies its row.
template <typename T>
__device__ void forward_identity(const FwdParams& p, const FwdBlock& b, int64_t n0, const int* list_tok,
                                 const int64_t* list_row, int m) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* out = static_cast<T*>(p.out);
  const T* table = static_cast<const T*>(b.table);
  for (int i = warp; i < m; i += kFwdWarps)
    copy_row(out + (n0 + list_tok[i]) * p.d, table + list_row[i] * p.d, p.d, b.vec && p.out_vec, lane);
}

// Projected block, P_j read through L1: one warp per token.
template <typename T>
__device__ void forward_projected_l1(const FwdParams& p, const FwdBlock& b, int64_t n0, const int* list_tok,
                                     const int64_t* list_row, int m) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* out = static_cast<T*>(p.out);
  const T* table = static_cast<const T*>(b.table);
  for (int i = warp; i < m; i += kFwdWarps)
    project_row_l1(out + (n0 + list_tok[i]) * p.d, table + list_row[i] * b.width, static_cast<const T*>(b.proj),
                   p.d, b.width, lane);
}

// Projected block with P_j^T staged in shared memory in column slices (see the header).
// Called by the whole CTA: it holds __syncthreads.
template <typename T>
__device__ void forward_projected_staged(const FwdParams& p, const FwdBlock& b, int64_t n0, const int* list_tok,
                                         const int64_t* list_row, int m, float* smem) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = p.d, dj = b.width;
  T* out = static_cast<T*>(p.out);
  const T* table = static_cast<const T*>(b.table);
  const T* proj = static_cast<const T*>(b.proj);
  float* rows = smem + static_cast<int64_t>(warp) * kTok * dj;  // this warp's kTok rows [kTok, d_j]
  float* pt = smem + static_cast<int64_t>(kFwdWarps) * kTok * dj;  // P^T slice [d_j, slice + 1]
  const int ld = b.slice + 1;
  for (int64_t c0 = 0; c0 < d; c0 += b.slice) {
    const int cw = static_cast<int>(d - c0 < b.slice ? d - c0 : b.slice);
    __syncthreads();  // every warp is done with the previous slice
    // Reads run along P's rows (coalesced); the transposed stores are the one-off cost.
    for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(cw) * dj; idx += kFwdThreads) {
      const int64_t c = idx / dj, k = idx % dj;
      pt[k * ld + c] = to_f(__ldg(proj + (c0 + c) * dj + k));
    }
    __syncthreads();
    for (int g = warp * kTok; g < m; g += kFwdWarps * kTok) {
      const int tcount = m - g < kTok ? m - g : kTok;
      __syncwarp();  // the previous group's rows are consumed
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (t < tcount) {
          row_to_f32(table + list_row[g + t] * dj, dj, b.vec, rows + t * dj, lane);
        } else {
          for (int64_t k = lane; k < dj; k += 32) rows[t * dj + k] = 0.0f;
        }
      }
      __syncwarp();
      float acc[kTok][kMaxColsPerLane];
#pragma unroll
      for (int t = 0; t < kTok; ++t)
#pragma unroll
        for (int i = 0; i < kMaxColsPerLane; ++i) acc[t][i] = 0.0f;
      for (int64_t k = 0; k < dj; ++k) {
        float e[kTok];
#pragma unroll
        for (int t = 0; t < kTok; ++t) e[t] = rows[t * dj + k];  // broadcast reads
        const float* prow = pt + k * ld;
#pragma unroll
        for (int i = 0; i < kMaxColsPerLane; ++i) {
          const int c = lane + 32 * i;
          const float pv = c < cw ? prow[c] : 0.0f;  // consecutive lanes, consecutive banks
#pragma unroll
          for (int t = 0; t < kTok; ++t) acc[t][i] = fmaf(e[t], pv, acc[t][i]);
        }
      }
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (t < tcount) {
          T* o = out + (n0 + list_tok[g + t]) * d + c0;
#pragma unroll
          for (int i = 0; i < kMaxColsPerLane; ++i) {
            const int c = lane + 32 * i;
            if (c < cw) o[c] = from_f<T>(acc[t][i]);
          }
        }
      }
    }
  }
}

template <typename T, typename Idx>
__global__ void __launch_bounds__(kFwdThreads) forward_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ float smem[];
  __shared__ int list_tok[kFwdTile];
  __shared__ int64_t list_row[kFwdTile];
  __shared__ int zero_tok[kFwdTile];
  __shared__ int count, zero_count;

  const int j = blockIdx.y;
  const FwdBlock& b = p.blocks[j];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFwdTile;
  collect_tile<Idx>(p, b, j, n0, list_tok, list_row, zero_tok, &count, &zero_count);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < zero_count; i += kFwdWarps)
    zero_row(static_cast<T*>(p.out) + (n0 + zero_tok[i]) * p.d, p.d, p.out_vec, lane);
  const int m = count;  // CTA-uniform, so the staged path's __syncthreads are reached by all
  if (m == 0) return;
  if (b.proj == nullptr) {
    forward_identity<T>(p, b, n0, list_tok, list_row, m);
  } else if (b.slice == 0 || m < kMinStagedTokens) {
    forward_projected_l1<T>(p, b, n0, list_tok, list_row, m);
  } else {
    forward_projected_staged<T>(p, b, n0, list_tok, list_row, m, smem);
  }
}

// The widest staged slice (multiple of 32, <= 256, <= d rounded up) within the budget;
// 0 when not even 32 columns fit (then the block uses the L1 path).
int staged_slice(int64_t d, int64_t dj) {
  if (dj > kMaxStagedWidth) return 0;
  const int64_t cap = std::min<int64_t>(32 * kMaxColsPerLane, (d + 31) / 32 * 32);
  for (int64_t s = cap; s >= 32; s -= 32)
    if (staged_floats(dj, s) * static_cast<int64_t>(sizeof(float)) <= static_cast<int64_t>(kFwdSmemBudget))
      return static_cast<int>(s);
  return 0;
}

template <typename T, typename Idx>
cudaError_t launch_forward(const EmbeddingProblem& pr, void* out, cudaStream_t stream) {
  FwdParams p{};
  p.ids = pr.ids;
  p.id_stride = pr.id_stride;
  p.n = pr.n;
  p.d = pr.d;
  p.vocab = pr.vocab;
  p.padding = pr.padding_idx;
  p.has_padding = pr.has_padding;
  p.out_vec = vec_ok<T>(out, pr.d);
  p.out = out;
  size_t smem = 0;
  for (int j = 0; j < pr.n_blocks; ++j) {
    const EmbeddingBlock& b = pr.blocks[j];
    FwdBlock& f = p.blocks[j];
    f.table = b.table;
    f.proj = b.proj;
    f.lo = b.lo;
    f.hi = b.hi;
    f.width = b.width;
    f.vec = vec_ok<T>(b.table, b.width);
    f.slice = b.proj == nullptr ? 0 : staged_slice(pr.d, b.width);
    if (f.slice > 0) smem = std::max(smem, static_cast<size_t>(staged_floats(b.width, f.slice)) * sizeof(float));
  }
  auto kernel = forward_kernel<T, Idx>;
  if (smem > 48 * 1024) {  // above the default limit: opt in (sm_80: 163 KB, sm_90: 227 KB)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((pr.n + kFwdTile - 1) / kFwdTile), static_cast<unsigned>(pr.n_blocks));
  kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------
constexpr int kChunk = 64;  // sorted positions per warp in run_sum_kernel
constexpr int kBwdThreads = 128;
constexpr int kBwdWarps = kBwdThreads / 32;
constexpr int kTileP = 64;   // grad P output tile [64, 64]
constexpr int kStepP = 32;   // sorted positions per shared-memory stage
constexpr int kMaxSplits = 32;
constexpr int64_t kTokensPerSplit = 1024;

struct BwdBlock {
  const void* proj;  // P_j or null
  void* grad_table;  // [hi - lo, width]
  int64_t lo, hi, width;
};

struct BwdParams {
  const uint32_t* keys;  // sorted ids [N] (V for padding / out of range)
  const int32_t* pos;    // token of each sorted key [N]
  const void* grad;      // [N, d]
  int64_t n, d, vocab;
  bool grad_vec;
  int n_blocks;
  float* first_part;  // [chunks, d] continuation piece of a cut run
  float* last_part;   // [chunks, d] first piece of a cut run
  BwdBlock blocks[kMaxBlocks];
};

template <typename Idx>
__global__ void keys_kernel(const Idx* __restrict__ ids, int64_t stride, int64_t n, int64_t vocab, bool has_padding,
                            int64_t padding, uint32_t* __restrict__ keys, int32_t* __restrict__ pos) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t id = static_cast<int64_t>(ids[i * stride]);
  const bool live = id >= 0 && id < vocab && !(has_padding && id == padding);
  keys[i] = static_cast<uint32_t>(live ? id : vocab);
  pos[i] = static_cast<int32_t>(i);
}

// bounds[j] = first sorted position with key >= c_j (bounds[n_blocks]: first with key >= V).
__global__ void bounds_kernel(const uint32_t* __restrict__ keys, int64_t n, const __grid_constant__ BwdParams p,
                              int64_t* __restrict__ bounds) {
  const int j = threadIdx.x;
  if (j > p.n_blocks) return;
  const uint64_t edge = j < p.n_blocks ? static_cast<uint64_t>(p.blocks[j].lo) : static_cast<uint64_t>(p.vocab);
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<uint64_t>(keys[mid]) < edge) lo = mid + 1; else hi = mid;
  }
  bounds[j] = lo;
}

// The finished sum s (fp32 [d], shared, complete) of the run of `key`: its table-grad
// row is s @ P_j (P_j through L1, lanes along d_j: coalesced) or s itself.
template <typename T>
__device__ void finish_row(const BwdParams& p, uint32_t key, const float* s, int lane) {
  int j = 0;
  while (j + 1 < p.n_blocks && static_cast<int64_t>(key) >= p.blocks[j].hi) ++j;
  const BwdBlock& b = p.blocks[j];
  const int64_t dj = b.width, d = p.d;
  T* dst = static_cast<T*>(b.grad_table) + (static_cast<int64_t>(key) - b.lo) * dj;
  if (b.proj == nullptr) {
    for (int64_t c = lane; c < d; c += 32) dst[c] = from_f<T>(s[c]);
    return;
  }
  const T* proj = static_cast<const T*>(b.proj);
  for (int64_t k = lane; k < dj; k += 32) {
    float acc = 0.0f;
    for (int64_t c = 0; c < d; ++c) acc = fmaf(s[c], to_f(__ldg(proj + c * dj + k)), acc);
    dst[k] = from_f<T>(acc);
  }
}

// s[0:d] += g[row, 0:d]; each lane owns the same columns every call (no sync needed).
template <typename T>
__device__ __forceinline__ void add_grad_row(float* s, const T* __restrict__ g, int64_t d, bool vec, int lane) {
  if (vec) {
    constexpr int V = vec_n<T>();
    const uint4* src = reinterpret_cast<const uint4*>(g);
    for (int64_t i = lane; i < d / V; i += 32) {
      const uint4 u = __ldg(src + i);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int q = 0; q < V; ++q) s[i * V + q] += to_f(e[q]);
    }
  } else {
    for (int64_t c = lane; c < d; c += 32) s[c] += to_f(g[c]);
  }
}

template <typename T>
__device__ __forceinline__ void fill_row(float* s, int64_t d, float v, bool vec, int lane) {
  // Same column ownership as add_grad_row, so a lane only ever touches its own columns.
  if (vec) {
    constexpr int V = vec_n<T>();
    for (int64_t i = lane; i < d / V; i += 32)
#pragma unroll
      for (int q = 0; q < V; ++q) s[i * V + q] = v;
  } else {
    for (int64_t c = lane; c < d; c += 32) s[c] = v;
  }
}

template <typename T>
__device__ __forceinline__ void store_part(float* dst, const float* s, int64_t d, bool vec, int lane) {
  if (vec) {
    constexpr int V = vec_n<T>();
    for (int64_t i = lane; i < d / V; i += 32)
#pragma unroll
      for (int q = 0; q < V; ++q) dst[i * V + q] = s[i * V + q];
  } else {
    for (int64_t c = lane; c < d; c += 32) dst[c] = s[c];
  }
}

// One warp per chunk of kChunk sorted positions: run sums in position order.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) run_sum_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kBwdWarps + warp;
  const int64_t q0 = chunk * kChunk;
  if (q0 >= p.n || p.keys[q0] >= p.vocab) return;  // warp-uniform; no block-wide sync below
  const int64_t q1 = q0 + kChunk < p.n ? q0 + kChunk : p.n;
  const int64_t d = p.d;
  float* s = smem + static_cast<int64_t>(warp) * d;
  const T* grad = static_cast<const T*>(p.grad);
  const uint32_t before = q0 > 0 ? p.keys[q0 - 1] : 0xffffffffu;
  const uint32_t after = q1 < p.n ? p.keys[q1] : 0xffffffffu;

  uint32_t key = p.keys[q0];
  bool continued = key == before;  // the current run began in an earlier chunk
  fill_row<T>(s, d, 0.0f, p.grad_vec, lane);
  for (int64_t q = q0; q < q1; ++q) {
    const uint32_t k = p.keys[q];
    if (k >= p.vocab) break;  // padding / out-of-range keys sort last
    if (k != key) {           // the run of `key` ends inside this chunk
      __syncwarp();
      if (continued) store_part<T>(p.first_part + chunk * d, s, d, p.grad_vec, lane);
      else finish_row<T>(p, key, s, lane);
      __syncwarp();
      fill_row<T>(s, d, 0.0f, p.grad_vec, lane);
      key = k;
      continued = false;
    }
    add_grad_row(s, grad + static_cast<int64_t>(p.pos[q]) * d, d, p.grad_vec, lane);
  }
  __syncwarp();
  // The chunk's last run: finished here, or cut by the chunk's end.
  if (key == after) {
    store_part<T>((continued ? p.first_part : p.last_part) + chunk * d, s, d, p.grad_vec, lane);
  } else if (continued) {
    store_part<T>(p.first_part + chunk * d, s, d, p.grad_vec, lane);
  } else {
    finish_row<T>(p, key, s, lane);
  }
}

// One warp per chunk whose last run starts in it and continues past its end: adds the
// continuation pieces of the following chunks in chunk order and finishes the row.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) run_carry_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kBwdWarps + warp;
  const int64_t q0 = chunk * kChunk, q1 = q0 + kChunk;
  if (q1 >= p.n) return;
  const uint32_t key = p.keys[q1 - 1];
  if (key >= p.vocab || p.keys[q1] != key) return;  // the last run ends in this chunk
  if (p.keys[q0] == key && q0 > 0 && p.keys[q0 - 1] == key) return;  // it began earlier
  const int64_t d = p.d;
  float* s = smem + static_cast<int64_t>(warp) * d;
  for (int64_t c = lane; c < d; c += 32) {
    float acc = p.last_part[chunk * d + c];
    for (int64_t k = chunk + 1; k * kChunk < p.n && p.keys[k * kChunk] == key; ++k) acc += p.first_part[k * d + c];
    s[c] = acc;
  }
  __syncwarp();
  finish_row<T>(p, key, s, lane);
}

// partial[split] [d, d_j] = sum over split `split` of block j's sorted positions of
// g_n^T E_j[row_n]; a 64 x 64 output tile per CTA, 4 x 4 outputs per thread.
template <typename T>
__global__ void __launch_bounds__(256) proj_partial_kernel(const __grid_constant__ BwdParams p, const int64_t* __restrict__ bounds,
                                                           int j, const T* __restrict__ table, int splits,
                                                           float* __restrict__ partial) {
  __shared__ float gs[kStepP][kTileP];
  __shared__ float es[kStepP][kTileP];
  const int64_t d = p.d, dj = p.blocks[j].width, lo = p.blocks[j].lo;
  const int tiles_k = static_cast<int>((dj + kTileP - 1) / kTileP);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x / tiles_k) * kTileP;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x % tiles_k) * kTileP;
  const int split = blockIdx.y;
  const int64_t start = bounds[j], count = bounds[j + 1] - bounds[j];
  const int64_t per = (count + splits - 1) / splits;
  const int64_t qa = static_cast<int64_t>(split) * per < count ? static_cast<int64_t>(split) * per : count;
  const int64_t qb = qa + per < count ? qa + per : count;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* grad = static_cast<const T*>(p.grad);
  float acc[4][4] = {};
  for (int64_t q = qa; q < qb; q += kStepP) {
    for (int idx = threadIdx.x; idx < kStepP * kTileP; idx += 256) {
      const int t = idx / kTileP, c = idx % kTileP;
      const bool live = q + t < qb;
      const int64_t sq = start + q + t;
      gs[t][c] = live && c0 + c < d ? to_f(grad[static_cast<int64_t>(p.pos[sq]) * d + c0 + c]) : 0.0f;
      es[t][c] = live && k0 + c < dj ? to_f(table[(static_cast<int64_t>(p.keys[sq]) - lo) * dj + k0 + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int t = 0; t < kStepP; ++t) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = gs[t][ty + 16 * u];
        b[u] = es[t][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
    }
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(split) * d * dj;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t c = c0 + ty + 16 * u, k = k0 + tx + 16 * v;
      if (c < d && k < dj) out[c * dj + k] = acc[u][v];
    }
}

// grad_P[i] = sum_s partial[s][i] in split order, cast once.
template <typename T>
__global__ void proj_reduce_kernel(const float* __restrict__ partial, int splits, int64_t size, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size) return;
  float acc = 0.0f;
  for (int s = 0; s < splits; ++s) acc += partial[static_cast<int64_t>(s) * size + i];
  out[i] = from_f<T>(acc);
}

// ---------------------------------------------------------------------------------------
// backward workspace: one layout for the size query and the launch
// ---------------------------------------------------------------------------------------
size_t align256(size_t x) { return (x + 255) / 256 * 256; }

int end_bit(int64_t vocab) {  // keys lie in [0, V]
  int bits = 1;
  while (bits < 32 && (uint64_t{1} << bits) <= static_cast<uint64_t>(vocab)) ++bits;
  return bits;
}

int proj_splits(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, (n + kTokensPerSplit - 1) / kTokensPerSplit)));
}

struct Layout {
  size_t keys_in, keys_out, pos_in, pos_out, bounds, first_part, last_part, proj_partial, cub_temp, cub_bytes, total;
};

Layout layout(const EmbeddingProblem& pr) {
  const size_t n = static_cast<size_t>(pr.n);
  const size_t chunks = (n + kChunk - 1) / kChunk;
  size_t proj_floats = 0;  // the largest block's partials: blocks run one after another
  for (int j = 0; j < pr.n_blocks; ++j)
    if (pr.blocks[j].proj != nullptr)
      proj_floats = std::max(proj_floats, static_cast<size_t>(pr.d * pr.blocks[j].width));
  proj_floats *= static_cast<size_t>(proj_splits(pr.n));
  size_t cub_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(pr.n), 0, end_bit(pr.vocab));
  Layout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) { const size_t here = at; at += align256(std::max<size_t>(bytes, 1)); return here; };
  l.keys_in = take(n * sizeof(uint32_t));
  l.keys_out = take(n * sizeof(uint32_t));
  l.pos_in = take(n * sizeof(int32_t));
  l.pos_out = take(n * sizeof(int32_t));
  l.bounds = take((pr.n_blocks + 1) * sizeof(int64_t));
  l.first_part = take(chunks * pr.d * sizeof(float));
  l.last_part = take(chunks * pr.d * sizeof(float));
  l.proj_partial = take(proj_floats * sizeof(float));
  l.cub_bytes = cub_bytes;
  l.cub_temp = take(cub_bytes);
  l.total = at;
  return l;
}

template <typename T, typename Idx>
cudaError_t launch_backward(const EmbeddingProblem& pr, const void* grad_out, void* const* grad_tables,
                            void* const* grad_projs, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const Layout l = layout(pr);
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<uint32_t*>(ws + l.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(ws + l.keys_out);
  auto* pos_in = reinterpret_cast<int32_t*>(ws + l.pos_in);
  auto* pos_out = reinterpret_cast<int32_t*>(ws + l.pos_out);
  auto* bounds = reinterpret_cast<int64_t*>(ws + l.bounds);
  const int64_t n = pr.n;

  keys_kernel<Idx><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      static_cast<const Idx*>(pr.ids), pr.id_stride, n, pr.vocab, pr.has_padding, pr.padding_idx, keys_in, pos_in);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t cub_bytes = l.cub_bytes;
  err = cub::DeviceRadixSort::SortPairs(ws + l.cub_temp, cub_bytes, keys_in, keys_out, pos_in, pos_out,
                                        static_cast<int>(n), 0, end_bit(pr.vocab), stream);
  if (err != cudaSuccess) return err;

  BwdParams p{};
  p.keys = keys_out;
  p.pos = pos_out;
  p.grad = grad_out;
  p.n = n;
  p.d = pr.d;
  p.vocab = pr.vocab;
  p.grad_vec = vec_ok<T>(grad_out, pr.d);
  p.n_blocks = pr.n_blocks;
  p.first_part = reinterpret_cast<float*>(ws + l.first_part);
  p.last_part = reinterpret_cast<float*>(ws + l.last_part);
  for (int j = 0; j < pr.n_blocks; ++j) {
    p.blocks[j].proj = pr.blocks[j].proj;
    p.blocks[j].grad_table = grad_tables[j];
    p.blocks[j].lo = pr.blocks[j].lo;
    p.blocks[j].hi = pr.blocks[j].hi;
    p.blocks[j].width = pr.blocks[j].width;
  }

  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const unsigned run_grid = static_cast<unsigned>((chunks + kBwdWarps - 1) / kBwdWarps);
  const size_t run_smem = static_cast<size_t>(kBwdWarps) * pr.d * sizeof(float);
  if (run_smem > 48 * 1024) {
    for (auto kernel : {run_sum_kernel<T>, run_carry_kernel<T>}) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(run_smem));
      if (err != cudaSuccess) return err;
    }
  }
  run_sum_kernel<T><<<run_grid, kBwdThreads, run_smem, stream>>>(p);
  run_carry_kernel<T><<<run_grid, kBwdThreads, run_smem, stream>>>(p);
  bounds_kernel<<<1, kMaxBlocks + 1, 0, stream>>>(keys_out, n, p, bounds);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int splits = proj_splits(n);
  auto* partial = reinterpret_cast<float*>(ws + l.proj_partial);
  for (int j = 0; j < pr.n_blocks; ++j) {
    if (pr.blocks[j].proj == nullptr) continue;
    const int64_t dj = pr.blocks[j].width;
    const int64_t tiles = ((pr.d + kTileP - 1) / kTileP) * ((dj + kTileP - 1) / kTileP);
    proj_partial_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), 256, 0, stream>>>(
        p, bounds, j, static_cast<const T*>(pr.blocks[j].table), splits, partial);
    const int64_t size = pr.d * dj;
    proj_reduce_kernel<T><<<static_cast<unsigned>((size + 255) / 256), 256, 0, stream>>>(
        partial, splits, size, static_cast<T*>(grad_projs[j]));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// dtype x id type -> f<T, Idx>(): the 6 instantiations of each launcher.
template <template <typename, typename> class F, typename... Args>
cudaError_t dispatch(DType dtype, IdType id_type, Args&&... args) {
  const bool i64 = id_type == IdType::kInt64;
  switch (dtype) {
    case DType::kFloat32:
      return i64 ? F<float, int64_t>::run(args...) : F<float, int32_t>::run(args...);
    case DType::kBFloat16:
      return i64 ? F<__nv_bfloat16, int64_t>::run(args...) : F<__nv_bfloat16, int32_t>::run(args...);
    case DType::kFloat16:
      return i64 ? F<__half, int64_t>::run(args...) : F<__half, int32_t>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Idx>
struct Forward {
  static cudaError_t run(const EmbeddingProblem& pr, void* out, cudaStream_t stream) {
    return launch_forward<T, Idx>(pr, out, stream);
  }
};

template <typename T, typename Idx>
struct Backward {
  static cudaError_t run(const EmbeddingProblem& pr, const void* grad_out, void* const* grad_tables,
                         void* const* grad_projs, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return launch_backward<T, Idx>(pr, grad_out, grad_tables, grad_projs, workspace, workspace_bytes, stream);
  }
};

bool valid(const EmbeddingProblem& pr) {
  return pr.n_blocks >= 1 && pr.n_blocks <= kMaxBlocks && pr.d > 0 && pr.n >= 0 && pr.n < (int64_t{1} << 31) &&
         pr.vocab >= 0 && pr.vocab < (int64_t{1} << 32) - 1;
}

}  // namespace

cudaError_t blockwise_embedding_forward(const EmbeddingProblem& problem, void* out, cudaStream_t stream) {
  if (!valid(problem)) return cudaErrorInvalidValue;
  if (problem.n == 0) return cudaSuccess;
  return dispatch<Forward>(problem.dtype, problem.id_type, problem, out, stream);
}

size_t blockwise_embedding_backward_workspace(const EmbeddingProblem& problem) {
  if (!valid(problem) || problem.n == 0) return 0;
  return layout(problem).total;
}

cudaError_t blockwise_embedding_backward(const EmbeddingProblem& problem, const void* grad_out,
                                         void* const* grad_tables, void* const* grad_projs, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(problem) || problem.d > kMaxBackwardDim) return cudaErrorInvalidValue;
  if (problem.n == 0) {  // nothing looked up: zero projection grads (the tables are zero-filled)
    for (int j = 0; j < problem.n_blocks; ++j) {
      if (problem.blocks[j].proj == nullptr) continue;
      const size_t elem = problem.dtype == DType::kFloat32 ? 4 : 2;
      const cudaError_t err =
          cudaMemsetAsync(grad_projs[j], 0, static_cast<size_t>(problem.d * problem.blocks[j].width) * elem, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  return dispatch<Backward>(problem.dtype, problem.id_type, problem, grad_out, grad_tables, grad_projs, workspace,
                            workspace_bytes, stream);
}

}  // namespace cprec::cuda
