// A float32 GEMM for AVX2 + FMA machines, for the conv's Winograd products and (through
// cpu/panel_matmul.h) the adaptive softmax's:
//   C [M, N] (+)= A [M, K] @ B [K, N],
// A read in place through two strides (row-major tiles, or a transposed view of them;
// packed per block when its k's are a page apart), B read from panels of 16 columns
// (packed once per call, or rows in place), the last panel possibly partial.
//
// Why not at::mm (MKL): the Winograd passes run six [~52 x 256] @ [256 x 256] products a
// chunk, one per weight plane. MKL packs both operands on every call, and the six planes
// (1.5 MB at d = 256) do not stay in a 1 MB L2 from one chunk to the next, so each plane
// is re-read from L3 and re-packed per chunk: 80-89 GFLOP/s in the op against 96 for one
// product alone (one core of the 2-core AMD EPYC CI machine, d = 256). Here the planes
// are packed once per call, tiles are read in place, and the 6 x 16 register tile runs at
// 108-115 GFLOP/s on the same shapes (K = 100-400, M = 52-256).
//
// Each entry of C is summed in the same order whatever M or the chunk (blocks of kBlock
// k's in increasing order, each an FMA chain from zero, added to C in turn): the result
// of a row does not depend on how the rows are cut, so the ops stay bitwise the same on
// any thread count.
#pragma once

#include "cpu/common.h"

#include <algorithm>
#include <vector>

namespace cprec::cpu {
constexpr int64_t kPanelColumns = 16;  // columns of B per panel: two 8-lane registers
}  // namespace cprec::cpu

#ifdef CPREC_HAVE_AVX2
namespace cprec::cpu::panel {

constexpr int kTileRows = 6;      // rows of C per register tile: 12 accumulators of 16

// Sums over k run in blocks of kBlock, each formed from zero and then added to C: one
// sequential float32 chain over all of K (256 terms at d = 256) rounded grad_x 1.4x worse
// (rms) than MKL's products; blocks of 64 put z, grad_x and grad_W below MKL's error
// (see conv.cpp's error notes).
constexpr int64_t kBlock = 64;

// C rows [0, R) x columns [0, 16) = (Add ? C : 0) + sum_k A(r, k) B(k, 0:16), the k's in
// blocks of kBlock, each summed from zero in registers and then added to the C tile
// (L1-resident meanwhile); A(r, k) = a[r * a_row + k * a_k], B(k, :) = b[k * b_k : + 16].
template <int R, bool Add>
__attribute__((target("avx2,fma"), always_inline)) inline void tile(int64_t K, const float* a, int64_t a_row,
                                                                      int64_t a_k, const float* b, int64_t b_k,
                                                                      float* c, int64_t ldc) {
  for (int64_t k0 = 0; k0 < K || (k0 == 0 && !Add); k0 += kBlock) {
    __m256 lo[R], hi[R];
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    const int64_t kb = std::min(kBlock, K - k0);
    for (int64_t k = 0; k < kb; ++k, a += a_k, b += b_k) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r * a_row);
        lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
        hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (Add || k0 > 0) {
        lo[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc), lo[r]);
        hi[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc + 8), hi[r]);
      }
      _mm256_storeu_ps(c + r * ldc, lo[r]);
      _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
    }
  }
}

// tile() on the first `cols` (< 16) columns of C only, through a tile on the stack.
template <int R, bool Add>
__attribute__((target("avx2,fma"), always_inline)) inline void edge_tile(int64_t K, const float* a, int64_t a_row,
                                                                           int64_t a_k, const float* b, int64_t b_k,
                                                                           float* c, int64_t ldc, int64_t cols) {
  alignas(32) float buf[R * kPanelColumns];
  if (Add)
    for (int r = 0; r < R; ++r) std::copy_n(c + r * ldc, cols, buf + r * kPanelColumns);
  tile<R, Add>(K, a, a_row, a_k, b, b_k, buf, kPanelColumns);
  for (int r = 0; r < R; ++r) std::copy_n(buf + r * kPanelColumns, cols, c + r * ldc);
}

// Rows [0, M) of C against panel b (columns [0, cols) of C, cols <= 16), in row tiles;
// the tile of rows [6t, 6t + 6) reads A from A + t * a_tile (6 * a_row for A in place,
// one packed tile's size for pack_rows's layout).
template <bool Add>
__attribute__((target("avx2,fma"))) void panel_rows(int64_t M, int64_t K, const float* A, int64_t a_row, int64_t a_k,
                                                    int64_t a_tile, const float* b, int64_t b_k, float* c,
                                                    int64_t ldc, int64_t cols) {
  const bool full = cols == kPanelColumns;
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) {
    const float* a = A + m / kTileRows * a_tile;
    if (full) {
      tile<kTileRows, Add>(K, a, a_row, a_k, b, b_k, c + m * ldc, ldc);
    } else {
      edge_tile<kTileRows, Add>(K, a, a_row, a_k, b, b_k, c + m * ldc, ldc, cols);
    }
  }
  const float* a = A + m / kTileRows * a_tile;
  float* cm = c + m * ldc;
  switch (M - m) {
#define CPREC_PANEL_TAIL(R)                                               \
  case R:                                                                 \
    if (full) tile<R, Add>(K, a, a_row, a_k, b, b_k, cm, ldc);            \
    else edge_tile<R, Add>(K, a, a_row, a_k, b, b_k, cm, ldc, cols);      \
    break;
    CPREC_PANEL_TAIL(5)
    CPREC_PANEL_TAIL(4)
    CPREC_PANEL_TAIL(3)
    CPREC_PANEL_TAIL(2)
    CPREC_PANEL_TAIL(1)
#undef CPREC_PANEL_TAIL
    default: break;
  }
}

// Cache blocking for products larger than L2 (the adaptive softmax's head: [4096 x 256]
// @ [256 x 2003] and its transposes): rows in blocks of kRowBlock and k in blocks of
// kDepthBlock, so that a [kRowBlock x kDepthBlock] block of A (144 KB) and the C rows it
// feeds stay in L2 while the panels' [kDepthBlock x 16] pieces (16 KB) pass through L1.
// kDepthBlock is a multiple of kBlock, so the sums' blocks (and the results) are the
// same as without it.
constexpr int64_t kRowBlock = 24 * kTileRows;
constexpr int64_t kDepthBlock = 4 * kBlock;

// A's k steps at least this many floats apart (a page) are packed per block: read in
// place, every k of a tile touches another page (the loss's G^T @ h, a_k = 2003: 81
// GFLOP/s); packed, 68-69 without a prefetch (the packing waits on DRAM, one short row
// segment a k) and 93-95 with the next rows prefetched 4 k's ahead.
constexpr int64_t kPackStrideA = 1024;

// The [mb, kb] block of A(r, k) = A[r * a_row + k * a_k] as row tiles [tile][kb][6],
// A(t * 6 + i, k) at out[(t * kb + k) * 6 + i] (a partial last tile keeps its rows).
__attribute__((target("avx2,fma"))) inline void pack_rows(int64_t mb, int64_t kb, const float* A, int64_t a_row,
                                                          int64_t a_k, float* out) {
  // k outer: with rows adjacent (a transposed A) each k reads mb contiguous floats, one
  // prefetch per 64-byte line of them; rows further apart, one per row.
  constexpr int64_t ahead = 4;
  for (int64_t k = 0; k < kb; ++k) {
    const float* src = A + k * a_k;
    if (k + ahead < kb && a_row == 1) {
      for (int64_t r = 0; r < mb; r += 16) __builtin_prefetch(src + ahead * a_k + r);
    } else if (k + ahead < kb) {
      for (int64_t r = 0; r < mb; ++r) __builtin_prefetch(src + ahead * a_k + r * a_row);
    }
    for (int64_t t = 0; t * kTileRows < mb; ++t) {
      const int64_t rows = std::min<int64_t>(kTileRows, mb - t * kTileRows);
      float* dst = out + (t * kb + k) * kTileRows;
      for (int64_t i = 0; i < rows; ++i) dst[i] = src[(t * kTileRows + i) * a_row];
    }
  }
}

// C [M, N] = A @ B, or += with accumulate. A(r, k) = A[r * a_row + k * a_k]; panel p of
// B (columns 16p .. 16p + 15) starts at B + p * b_panel and its row k at + k * b_k; the
// last panel may be partial (N % 16 columns of C written), its other columns readable.
// C rows ldc apart. Each entry's sum has one order whatever M, so rows cut across
// threads give the same result.
__attribute__((target("avx2,fma"))) inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row,
                                                     int64_t a_k, const float* B, int64_t b_k, int64_t b_panel,
                                                     float* C, int64_t ldc, bool accumulate) {
  const int64_t panels = (N + kPanelColumns - 1) / kPanelColumns;
  const bool pack_a = a_k >= kPackStrideA;
  thread_local std::vector<float> a_block;  // the packed block of A, when pack_a
  if (pack_a) a_block.resize(kRowBlock * kDepthBlock);
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t mb = std::min(kRowBlock, M - m0);
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kDepthBlock) {
      const int64_t kb = std::min(kDepthBlock, K - k0);
      const float* a = A + m0 * a_row + k0 * a_k;
      if (pack_a) pack_rows(mb, kb, a, a_row, a_k, a_block.data());
      // A packed: tiles [kb][6] one after another, rows 1 apart and k's 6 apart.
      const float* a_src = pack_a ? a_block.data() : a;
      const int64_t ar = pack_a ? 1 : a_row, ak = pack_a ? kTileRows : a_k;
      const int64_t a_tile = pack_a ? kb * kTileRows : kTileRows * a_row;
      for (int64_t p = 0; p < panels; ++p) {
        const float* b = B + p * b_panel + k0 * b_k;
        float* c = C + m0 * ldc + p * kPanelColumns;
        const int64_t cols = std::min(kPanelColumns, N - p * kPanelColumns);
        if (accumulate || k0 > 0) {
          panel_rows<true>(mb, kb, a_src, ar, ak, a_tile, b, b_k, c, ldc, cols);
        } else {
          panel_rows<false>(mb, kb, a_src, ar, ak, a_tile, b, b_k, c, ldc, cols);
        }
      }
    }
  }
}

// Panels of B(k, n) = B[k * b_k + n * b_n] for k < K, n < N: out[p][k][0:16] = B(k,
// 16p .. 16p + 15), zero past N; panels [p_begin, p_end).
__attribute__((target("avx2,fma"))) inline void pack_panels(int64_t K, int64_t N, const float* B, int64_t b_k,
                                                            int64_t b_n, float* out, int64_t p_begin, int64_t p_end) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    float* dst = out + p * K * kPanelColumns;
    const int64_t n0 = p * kPanelColumns, cols = std::min(kPanelColumns, N - n0);
    if (b_n == 1 && cols == kPanelColumns) {
      for (int64_t k = 0; k < K; ++k) std::copy_n(B + k * b_k + n0, kPanelColumns, dst + k * kPanelColumns);
      continue;
    }
    // Columns outer: each B column is read along k (contiguous when B is a transpose).
    for (int64_t j = 0; j < kPanelColumns; ++j) {
      if (j < cols) {
        const float* src = B + (n0 + j) * b_n;
        for (int64_t k = 0; k < K; ++k) dst[k * kPanelColumns + j] = src[k * b_k];
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k * kPanelColumns + j] = 0.f;
      }
    }
  }
}

// Rows r[0..7] (8 floats each) -> their transpose, in place (for callers that pack B).
__attribute__((target("avx2"), always_inline)) inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

}  // namespace cprec::cpu::panel
#endif

namespace cprec::cpu {

// Whether panel::gemm takes a product with N output columns in scalar type T.
template <typename T>
inline bool use_panel_gemm(int64_t N) {
#ifdef CPREC_HAVE_AVX2
  return std::is_same_v<T, float> && N % kPanelColumns == 0 && N > 0 && have_avx2();
#else
  return false;
#endif
}

// panel::gemm's product (same arguments) when `panels` (use_panel_gemm<T>(N)) holds and
// T is float; returns whether it ran, so the caller falls back to BLAS otherwise.
template <typename T>
inline bool panel_gemm_if(bool panels, int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_k,
                          const T* B, int64_t b_k, int64_t b_panel, T* C, int64_t ldc, bool accumulate) {
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (panels) {
      panel::gemm(M, N, K, A, a_row, a_k, B, b_k, b_panel, C, ldc, accumulate);
      return true;
    }
  }
#endif
  return false;
}

}  // namespace cprec::cpu
