// A float32 GEMM for AVX2 + FMA machines, for the conv's Winograd products:
//   C [M, N] (+)= A [M, K] @ B [K, N],   N a multiple of 16,
// A read in place through two strides (row-major tiles, or a transposed view of them),
// B read from panels of 16 columns (packed once per call, or rows in place).
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

namespace cprec::cpu {
constexpr int64_t kPanelColumns = 16;  // columns of B per panel: two 8-lane registers
}  // namespace cprec::cpu

#ifdef CPREC_HAVE_AVX2
namespace cprec::cpu::panel {

constexpr int kTileRows = 6;      // rows of C per register tile: 12 accumulators of 16

// C rows [0, R) x columns [0, 16) = (Add ? C : 0) + sum_k A(r, k) B(k, 0:16), the sum
// formed from zero in registers; A(r, k) = a[r * a_row + k * a_k], B(k, :) =
// b[k * b_k : k * b_k + 16].
template <int R, bool Add>
__attribute__((target("avx2,fma"), always_inline)) inline void tile(int64_t K, const float* a, int64_t a_row,
                                                                      int64_t a_k, const float* b, int64_t b_k,
                                                                      float* c, int64_t ldc) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, a += a_k, b += b_k) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_row);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if (Add) {
      lo[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc), lo[r]);
      hi[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc + 8), hi[r]);
    }
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}

template <bool Add>
__attribute__((target("avx2,fma"))) void gemm_impl(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row,
                                                   int64_t a_k, const float* B, int64_t b_k, int64_t b_panel, float* C,
                                                   int64_t ldc) {
  // Panel-outer: a panel of B (K x 16) stays in L1 while every row tile passes over it.
  for (int64_t p = 0; p < N / kPanelColumns; ++p) {
    const float* b = B + p * b_panel;
    float* c = C + p * kPanelColumns;
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows)
      tile<kTileRows, Add>(K, A + m * a_row, a_row, a_k, b, b_k, c + m * ldc, ldc);
    const float* a = A + m * a_row;
    float* cm = c + m * ldc;
    switch (M - m) {
      case 5: tile<5, Add>(K, a, a_row, a_k, b, b_k, cm, ldc); break;
      case 4: tile<4, Add>(K, a, a_row, a_k, b, b_k, cm, ldc); break;
      case 3: tile<3, Add>(K, a, a_row, a_k, b, b_k, cm, ldc); break;
      case 2: tile<2, Add>(K, a, a_row, a_k, b, b_k, cm, ldc); break;
      case 1: tile<1, Add>(K, a, a_row, a_k, b, b_k, cm, ldc); break;
      default: break;
    }
  }
}

// Sums over k run in blocks of kBlock, each formed from zero and then added to C: one
// sequential float32 chain over all of K (256 terms at d = 256) rounded grad_x 1.4x worse
// (rms) than MKL's products; blocks of 64 put z, grad_x and grad_W below MKL's error
// (see conv.cpp's error notes).
constexpr int64_t kBlock = 64;

// C [M, N] = A @ B, or += with accumulate. A(r, k) = A[r * a_row + k * a_k]; panel p of
// B (columns 16p .. 16p + 15) starts at B + p * b_panel and its row k at + k * b_k.
// N % 16 == 0 (the caller checks); C rows ldc apart.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_k, const float* B,
                 int64_t b_k, int64_t b_panel, float* C, int64_t ldc, bool accumulate) {
  if (K == 0 && !accumulate) {  // an empty sum
    for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.f);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t kb = std::min(kBlock, K - k0);
    const float *a = A + k0 * a_k, *b = B + k0 * b_k;
    if (accumulate || k0 > 0) {
      gemm_impl<true>(M, N, kb, a, a_row, a_k, b, b_k, b_panel, C, ldc);
    } else {
      gemm_impl<false>(M, N, kb, a, a_row, a_k, b, b_k, b_panel, C, ldc);
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
