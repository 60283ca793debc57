// Causal dilated 1D convolution on channels-last activations, plain and fused with
// LayerNorm + ReLU (+ residual), forward and backward, on the CPU.
//
//   z[b, t] = sum_k W[:, :, k] @ x[b, t - s_k] + bias,   s_k = (K-1-k) * dilation
//   out     = relu(LN(z) * ln_w + ln_b) (+ residual)      (LN over C_out)
//
// x: [B, T, C_in], W: [C_out, C_in, K], z/out: [B, T, C_out], mean/rstd: [B, T].
//
// Memory traffic it is designed for. No padded copy of x: the batch is one
// [B*T, C_in] matrix and tap k is ONE GEMM of the row range [0, B*T - s_k) of x into
// the row range [s_k, B*T) of the output buffer (addmm_ on contiguous views; x is read
// K times by the GEMMs, as in any GEMM-based conv). Flattening lets rows t < s_k of
// batch b receive the last rows of batch b-1; those (B-1) * s_k rows are saved before
// and restored after the tap's GEMM (forward), or zeroed in the grad buffer once the
// taps reach them (backward, taps in increasing shift), so no extra pass is needed.
// The LayerNorm epilogue then reads each output row once (mean, variance, normalise,
// affine, ReLU, residual, all while the row is in L1) and writes it in place.
// The fused forward (causal_conv1d_ln_relu_forward) does not build z that way: see
// "Fused forward" below (one GEMM, or Winograd F(4,3) for K = 3, and an epilogue that
// assembles each z row from shifted GEMM rows while it normalises it).
// Backward recomputes z with the K shifted GEMMs, runs the LN/ReLU backward in one pass per
// row (per-thread partial sums for d ln_w, d ln_b, reduced in a fixed order), and
// feeds the K input-grad GEMMs and K weight-grad GEMMs from the same buffer.
#include "cpu/common.h"
#include "cpu/ops.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <type_traits>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
#include <vector>

namespace cprec::cpu {
namespace {

using at::vec::Vectorized;

int64_t shift_of(int64_t k, int64_t K, int64_t dilation) { return (K - 1 - k) * dilation; }

void check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t dilation) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3 && weight.size(1) == x.size(2),
              "causal_conv1d: need x [B, T, C_in] and weight [C_out, C_in, K]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "causal_conv1d: weight must have x's dtype");
  TORCH_CHECK(dilation >= 1, "causal_conv1d: dilation must be >= 1");
}

at::Tensor opt_contig(const std::optional<at::Tensor>& t) { return present(t) ? t->contiguous() : at::Tensor(); }

// z = causal conv of x: [B*T, C_out], a fresh contiguous buffer. wt: [K, C_in, C_out].
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias, int64_t dilation) {
  const int64_t B = x.size(0), T = x.size(1), N = B * T, K = wt.size(0);
  const auto xf = x.view({N, x.size(2)});
  // The unshifted tap (k = K-1) creates the buffer, with the bias folded in.
  auto z = bias.defined() ? at::addmm(bias, xf, wt[K - 1]) : at::mm(xf, wt[K - 1]);
  auto z3 = z.view({B, T, z.size(1)});
  for (int64_t k = K - 2; k >= 0; --k) {
    const int64_t s = shift_of(k, K, dilation);
    if (s >= T) break;  // shifts only grow as k falls
    // Rows t < s of batches 1.. must not see the previous batch: save, GEMM, restore.
    const auto guard = B > 1 ? z3.narrow(0, 1, B - 1).narrow(1, 0, s).clone() : at::Tensor();
    z.narrow(0, s, N - s).addmm_(xf.narrow(0, 0, N - s), wt[k]);
    if (B > 1) z3.narrow(0, 1, B - 1).narrow(1, 0, s).copy_(guard);
  }
  return z;
}

// Grads of conv_forward given gz: [B*T, C_out], which this CONSUMES (rows get zeroed).
// -> (grad_x [B, T, C_in], grad_weight [C_out, C_in, K], grad_bias [C_out] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(at::Tensor gz, const at::Tensor& x,
                                                             const at::Tensor& wt, bool need_bias,
                                                             int64_t dilation) {
  const int64_t B = x.size(0), T = x.size(1), N = B * T, K = wt.size(0);
  const auto xf = x.view({N, x.size(2)});
  auto grad_b = need_bias ? gz.sum(0) : absent(x);
  auto grad_wt = at::zeros({K, wt.size(2), wt.size(1)}, wt.options());  // [K, C_out, C_in]
  auto grad_x = at::mm(gz, wt[K - 1].t());                               // [N, C_in]
  auto last = grad_wt[K - 1];
  at::mm_out(last, gz.t(), xf);
  auto gz3 = gz.view({B, T, gz.size(1)});
  int64_t zeroed = 0;  // rows t < zeroed of batches 1.. are already zero
  for (int64_t k = K - 2; k >= 0; --k) {
    const int64_t s = shift_of(k, K, dilation);
    if (s >= T) break;
    // Pairs (x row of batch b, gz row t < s of batch b+1) straddle a batch edge.
    if (B > 1 && s > zeroed) {
      gz3.narrow(0, 1, B - 1).narrow(1, zeroed, s - zeroed).zero_();
      zeroed = s;
    }
    const auto g = gz.narrow(0, s, N - s);
    grad_x.narrow(0, 0, N - s).addmm_(g, wt[k].t());
    auto slot = grad_wt[k];
    at::mm_out(slot, g.t(), xf.narrow(0, 0, N - s));
  }
  return {grad_x.view(x.sizes()), grad_wt.permute({1, 2, 0}).contiguous(), grad_b};
}

// Sum of squared deviations from m of an L1-resident row.
template <typename T>
T row_sq_dev(const T* z, T m, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0)), mv(m);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(z + i) - mv;
    acc += d * d;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += (z[i] - m) * (z[i] - m);
  return s;
}

// In place on z [rows, C] (the recomputed conv output): z becomes d loss / d z.
// Per-thread partial sums of d ln_w = sum g * zhat and d ln_b = sum g go to part_w,
// part_b: [threads, C] (a fixed split per thread count, so the result is deterministic).
template <typename T>
void ln_relu_epilogue_backward(T* z, const T* grad, int64_t rows, int64_t C, const T* lw, const T* lb,
                               const T* mean, const T* rstd, T* part_w, T* part_b) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    T* pw = part_w + tid * C;
    T* pb = part_b + tid * C;
    std::vector<T> zhat(C);
    for (int64_t r = begin; r < end; ++r) {
      T* row = z + r * C;
      const T* gr = grad + r * C;
      const T m = mean[r], rs = rstd[r];
      // Pass 1: g = grad * relu'(h), then g * ln_w and the two row means LN's backward needs.
      T sum_g = 0, sum_gz = 0;
      for (int64_t i = 0; i < C; ++i) {
        const T zh = (row[i] - m) * rs;
        T h = lw ? zh * lw[i] : zh;
        if (lb) h += lb[i];
        const T g = h > T(0) ? gr[i] : T(0);
        pw[i] += g * zh;
        pb[i] += g;
        const T gw = lw ? g * lw[i] : g;
        sum_g += gw;
        sum_gz += gw * zh;
        zhat[i] = zh;
        row[i] = gw;
      }
      // Pass 2: project out the mean and the zhat direction.
      const T mg = sum_g / T(C), mgz = sum_gz / T(C);
      for (int64_t i = 0; i < C; ++i) row[i] = rs * (row[i] - mg - zhat[i] * mgz);
    }
  });
}

// ---- float32 row kernels for AVX2 + FMA machines ------------------------------------
// The extension is built for baseline x86-64 (no -march), where at::vec::Vectorized
// falls back to its generic code; the fused forward's row loops (input transform,
// epilogue) were then as slow as a third of the GEMMs. These few loops are compiled
// for AVX2 + FMA and picked at run time when the CPU has them; the math is the same
// (the same sums in the same order per lane).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CPREC_HAVE_AVX2_PATH 1
namespace avx2 {

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// dst = bias + sum_k coef[k] * src[k] (bias may be null) -> the sum of dst.
__attribute__((target("avx2,fma"))) float combine_row(float* dst, int64_t n, const float* coef,
                                                      const float* const* src, const float* bias, int64_t C) {
  __m256 vs = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    __m256 acc = bias ? _mm256_loadu_ps(bias + i) : _mm256_setzero_ps();
    for (int64_t k = 0; k < n; ++k) acc = _mm256_fmadd_ps(_mm256_set1_ps(coef[k]), _mm256_loadu_ps(src[k] + i), acc);
    _mm256_storeu_ps(dst + i, acc);
    vs = _mm256_add_ps(vs, acc);
  }
  float sum = hsum(vs);
  for (; i < C; ++i) {
    float acc = bias ? bias[i] : 0.f;
    for (int64_t k = 0; k < n; ++k) acc += coef[k] * src[k][i];
    dst[i] = acc;
    sum += acc;
  }
  return sum;
}

__attribute__((target("avx2,fma"))) float sq_dev(const float* z, float m, int64_t C) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(z + i), mv);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  float s = hsum(acc);
  for (; i < C; ++i) s += (z[i] - m) * (z[i] - m);
  return s;
}

// o = relu((z - m) * rs * g + b) + res (g, b, res may be null).
__attribute__((target("avx2,fma"))) void ln_relu_out(float* o, const float* z, float m, float rs, const float* g,
                                                     const float* b, const float* res, int64_t C) {
  const __m256 mv = _mm256_set1_ps(m), rv = _mm256_set1_ps(rs), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(z + i), mv), rv);
    if (g) h = _mm256_mul_ps(h, _mm256_loadu_ps(g + i));
    if (b) h = _mm256_add_ps(h, _mm256_loadu_ps(b + i));
    h = _mm256_max_ps(h, zero);
    if (res) h = _mm256_add_ps(h, _mm256_loadu_ps(res + i));
    _mm256_storeu_ps(o + i, h);
  }
  for (; i < C; ++i) {
    float h = (z[i] - m) * rs;
    if (g) h *= g[i];
    if (b) h += b[i];
    h = h > 0.f ? h : 0.f;
    if (res) h += res[i];
    o[i] = h;
  }
}

}  // namespace avx2
#endif

// ---- Fused forward ---------------------------------------------------------------
//
// z rows are never stored. A GEMM fills a buffer Y whose rows are linear pieces of z,
// and the epilogue builds each z row in an L1-resident scratch row from a few Y rows
// (bias + sum_i coef_i * Y_i), then runs LayerNorm + ReLU (+ residual) on it and writes
// the output row once. Three ways to fill Y:
//
// * direct, any K: ONE GEMM Y = x @ [W_k0^T | ... | W_{K-1}^T]: [B*T, C_in] x
//   [C_in, K'*C_out] (taps with shift >= T dropped, K' <= K), and
//   z[b, t] = bias + sum_{k: s_k <= t} Y[b, t - s_k, k-th slice]   (masks at sequence starts).
//   Traffic: x once, Y (K' * C_out per row) written once and read once.
// * Winograd F(4,3), K = 3: the outputs of one dilation phase come in tiles of m = 4
//   (t0, t0 + dil, ..., t0 + 3*dil) that need the a = 6 inputs d_l = x[t0 + (l-2)*dil]
//   (zero before 0); U_i = sum_l BT[i][l] d_l (input transform, per chunk of tiles),
//   V_i = sum_k G[i][k] W_k^T ([a, C_in, C_out]), M_i = U_i @ V_i (a GEMMs with half the
//   direct FLOPs: 6 per 4 outputs instead of 12), and z[t0 + j*dil] = bias + sum_i
//   AT[j][i] M_i in the epilogue. Its transforms use the points 0, +-1, +-2, so float32
//   rounding grows: measured at C = 256 on random data, max |err| 1.1e-5 against 1.6e-6
//   for the direct sum (rms 7e-7 against 2e-7); F(2,3) kept 2.1e-6 but saved only a
//   third of the FLOPs.
// * im2col, few rows (N = B*T < C_out: serving one history): the two paths above need
//   the weight re-laid out per call ([C_in, K*C_out], as many floats as the weight),
//   which then costs more than the GEMM itself. Instead x is unfolded into
//   cols [N, C_in*K] (zeros before the sequence start; N*C_in*K < the weight's size) and
//   Y = cols @ W.view(C_out, C_in*K)^T reads the weight in its own layout: each Y row is
//   the whole z row, so the epilogue has one term.
constexpr int kWinoM = 4, kWinoA = 6;
constexpr double kWinoBT[kWinoA][kWinoA] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                            {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr double kWinoG[kWinoA][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                      {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                      {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
constexpr double kWinoAT[kWinoM][kWinoA] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

// Tiles of the Winograd path: per batch, per dilation phase p, nq tiles of m outputs;
// tile (b, p, q) starts at t0 = p + q*m*dil.
struct WinoTiles {
  int64_t B, T, dil, nq;
  int64_t count() const { return B * dil * nq; }
  static WinoTiles of(int64_t B, int64_t T, int64_t dil) {
    const int64_t longest = (T + dil - 1) / dil;  // phase 0 is the longest
    return {B, T, dil, (longest + kWinoM - 1) / kWinoM};
  }
};

// Winograd pays off on GEMM-bound sizes only, and only when the tiles do not overshoot
// T by much (dilations close to T leave half-empty tiles); else the direct path.
bool use_im2col(int64_t B, int64_t T, int64_t C_out) { return B * T < C_out; }

// cols [B*T, C_in*K]: cols[b*T + t, c*K + k] = x[b, t - shift_k, c], 0 before the start.
at::Tensor im2col(const at::Tensor& x, int64_t K, int64_t dilation) {
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2);
  auto cols = at::zeros({B, T, C_in, K}, x.options());
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = shift_of(k, K, dilation);
    if (s < T) cols.select(3, k).narrow(1, s, T - s).copy_(x.narrow(1, 0, T - s));
  }
  return cols.view({B * T, C_in * K});
}

bool use_winograd(int64_t B, int64_t T, int64_t C_in, int64_t C_out, int64_t K, int64_t dil) {
  if (K != 3 || 2 * dil >= T || C_in < 32 || C_out < 32 || B * T < 64) return false;
  const auto tiles = WinoTiles::of(B, T, dil);
  return tiles.count() * kWinoM <= B * T + B * T / 8;  // at most 12.5% padding
}

// U [a, stride, C]: the input transform of tiles [t_begin, t_end) (row tile - t_begin).
template <typename T>
void wino_input_transform(const T* x, int64_t C, const WinoTiles& w, int64_t t_begin, int64_t t_end, int64_t stride,
                          T* U) {
  using Vec = Vectorized<T>;
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t q = tile % w.nq, p = (tile / w.nq) % w.dil, b = tile / (w.nq * w.dil);
    const int64_t t0 = p + q * kWinoM * w.dil;
    const T* d[kWinoA];
    for (int l = 0; l < kWinoA; ++l) {
      const int64_t t = t0 + (l - 2) * w.dil;
      d[l] = (t >= 0 && t < w.T) ? x + (b * w.T + t) * C : nullptr;  // zero padding / past T
    }
#ifdef CPREC_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
      if (have_avx2()) {
        for (int i = 0; i < kWinoA; ++i) {
          float coef[kWinoA];
          const float* src[kWinoA];
          int64_t n = 0;
          for (int l = 0; l < kWinoA; ++l)
            if (kWinoBT[i][l] != 0 && d[l]) {
              coef[n] = float(kWinoBT[i][l]);
              src[n++] = d[l];
            }
          avx2::combine_row(U + (i * stride + tile - t_begin) * C, n, coef, src, nullptr, C);
        }
        continue;
      }
    }
#endif
    for (int i = 0; i < kWinoA; ++i) {
      T* dst = U + (i * stride + tile - t_begin) * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        Vec acc(T(0));
        for (int l = 0; l < kWinoA; ++l)
          if (kWinoBT[i][l] != 0 && d[l]) acc = at::vec::fmadd(Vec(T(kWinoBT[i][l])), Vec::loadu(d[l] + c), acc);
        acc.store(dst + c);
      }
      for (; c < C; ++c) {
        T acc = 0;
        for (int l = 0; l < kWinoA; ++l)
          if (kWinoBT[i][l] != 0 && d[l]) acc += T(kWinoBT[i][l]) * d[l][c];
        dst[c] = acc;
      }
    }
  }
}

// out[r] = relu(LN(bias + sum_k coef_k * src_k) * g + b) + res[r], with the row stats;
// z: a scratch row of C (L1-resident).
template <typename T>
void ln_relu_row(int64_t r, int64_t n, const T* coef, const T* const* src, int64_t C, const T* bias, const T* g,
                 const T* b, const T* res, T* out, T* mean, T* rstd, double eps, T* z) {
#ifdef CPREC_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) {
      const float m = avx2::combine_row(z, n, coef, src, bias, C) / float(C);
      const float rs = 1.f / std::sqrt(avx2::sq_dev(z, m, C) / float(C) + float(eps));
      mean[r] = m;
      rstd[r] = rs;
      avx2::ln_relu_out(out + r * C, z, m, rs, g, b, res ? res + r * C : nullptr, C);
      return;
    }
  }
#endif
  using Vec = Vectorized<T>;
  // Pass 1: assemble the z row and its sum.
  Vec vsum(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    Vec acc = bias ? Vec::loadu(bias + i) : Vec(T(0));
    for (int64_t k = 0; k < n; ++k) acc = at::vec::fmadd(Vec(coef[k]), Vec::loadu(src[k] + i), acc);
    acc.store(z + i);
    vsum += acc;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, vsum);
  for (; i < C; ++i) {
    T acc = bias ? bias[i] : T(0);
    for (int64_t k = 0; k < n; ++k) acc += coef[k] * src[k][i];
    z[i] = acc;
    sum += acc;
  }
  const T m = sum / T(C);
  const T rs = T(1) / std::sqrt(row_sq_dev(z, m, C) / T(C) + T(eps));
  mean[r] = m;
  rstd[r] = rs;
  // Pass 2: normalise, affine, ReLU, residual; the only write of the output row.
  T* o = out + r * C;
  const T* rr = res ? res + r * C : nullptr;
  const Vec mv(m), rv(rs), zero(T(0));
  i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    Vec h = (Vec::loadu(z + i) - mv) * rv;
    if (g) h = h * Vec::loadu(g + i);
    if (b) h = h + Vec::loadu(b + i);
    h = at::vec::maximum(h, zero);
    if (rr) h = h + Vec::loadu(rr + i);
    h.store(o + i);
  }
  for (; i < C; ++i) {
    T h = (z[i] - m) * rs;
    if (g) h *= g[i];
    if (b) h += b[i];
    h = h > T(0) ? h : T(0);
    if (rr) h += rr[i];
    o[i] = h;
  }
}

// ln_relu_row for every row, in parallel; gather(r, coef, src) names the terms of row r
// and returns their count (<= max_terms).
template <typename T, typename Gather>
void fused_ln_relu_rows(int64_t rows, int64_t C, int64_t max_terms, const Gather& gather, const T* bias,
                        const T* g, const T* b, const T* res, T* out, T* mean, T* rstd, double eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * max_terms, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> z(C), coef(max_terms);
    std::vector<const T*> src(max_terms);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = gather(r, coef.data(), src.data());
      ln_relu_row<T>(r, n, coef.data(), src.data(), C, bias, g, b, res, out, mean, rstd, eps, z.data());
    }
  });
}

// The whole Winograd forward in ONE parallel region: the tiles are cut into chunks, and
// each thread runs, per chunk,
// input transform -> a GEMMs (sequential BLAS inside the region) -> epilogue, on buffers
// of its own that stay in L2 and are reused across its chunks. One region, no
// tile-sized buffers (their first-touch page faults cost as much as the transforms),
// and the epilogue reads M while it is still in cache.
template <typename T>
void wino_forward(const T* x, const at::Tensor& V, int64_t C_in, int64_t C, const WinoTiles& w, const T* bias,
                  const T* g, const T* b, const T* res, T* out, T* mean, T* rstd, double eps) {
  const int64_t n_tiles = w.count();
  // ~128 tiles a chunk (U and M: a * 128 * C floats each), the count rounded up to a
  // multiple of 4 so 1, 2 or 4 threads get even shares. The split does not depend on
  // the thread count, so neither do the results.
  int64_t n_chunks = std::max<int64_t>(1, (n_tiles + 127) / 128);
  if (n_chunks > 1) n_chunks = (n_chunks + 3) / 4 * 4;
  const int64_t chunk = (n_tiles + n_chunks - 1) / n_chunks;
  n_chunks = (n_tiles + chunk - 1) / chunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowAutograd below_autograd;  // worker threads do not inherit the caller's
    auto U = at::empty({kWinoA, chunk, C_in}, V.options());
    auto M = at::empty({kWinoA, chunk, C}, V.options());
    std::vector<T> z(C);
    T coef[kWinoA];
    const T* src[kWinoA];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t t_begin = c * chunk, t_end = std::min(n_tiles, t_begin + chunk), n = t_end - t_begin;
      wino_input_transform<T>(x, C_in, w, t_begin, t_end, chunk, U.data_ptr<T>());
      for (int i = 0; i < kWinoA; ++i) {
        auto Mi = M[i].narrow(0, 0, n);
        at::mm_out(Mi, U[i].narrow(0, 0, n), V[i]);
      }
      const T* m = M.const_data_ptr<T>();
      for (int64_t tile = t_begin; tile < t_end; ++tile) {
        const int64_t q = tile % w.nq, p = (tile / w.nq) % w.dil, bb = tile / (w.nq * w.dil);
        for (int j = 0; j < kWinoM; ++j) {
          const int64_t t = p + (q * kWinoM + j) * w.dil;
          if (t >= w.T) break;
          int64_t k = 0;
          for (int i = 0; i < kWinoA; ++i)
            if (kWinoAT[j][i] != 0) {
              coef[k] = T(kWinoAT[j][i]);
              src[k++] = m + (i * chunk + (tile - t_begin)) * C;
            }
          ln_relu_row<T>(bb * w.T + t, k, coef, src, C, bias, g, b, res, out, mean, rstd, eps, z.data());
        }
      }
    }
  });
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

at::Tensor causal_conv1d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t dilation) {
  check_conv(x, weight, dilation);
  const auto xc = x.contiguous();
  const auto z = conv_forward(xc, weight.permute({2, 1, 0}).contiguous(), opt_contig(bias), dilation);
  return z.view({x.size(0), x.size(1), weight.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      int64_t dilation) {
  check_conv(x, weight, dilation);
  const auto xc = x.contiguous();
  // conv_backward zeroes rows of its grad buffer: give it a private copy.
  auto gz = grad_y.to(x.scalar_type()).reshape({-1, weight.size(0)}).clone(at::MemoryFormat::Contiguous);
  return conv_backward(gz, xc, weight.permute({2, 1, 0}).contiguous(), present(bias), dilation);
}

}  // namespace cprec::cpu

namespace cprec::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const std::optional<at::Tensor>& residual, int64_t dilation, double eps) {
  check_conv(x, weight, dilation);
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2), C = weight.size(0), K = weight.size(2);
  const int64_t N = B * T;
  const auto xc = x.contiguous();
  const auto bc = opt_contig(bias), lw = opt_contig(ln_weight), lb = opt_contig(ln_bias), res = opt_contig(residual);
  auto out = at::empty({B, T, C}, x.options());
  auto mean = at::empty({B, T}, x.options());
  auto rstd = at::empty({B, T}, x.options());
  const bool wino = use_winograd(B, T, C_in, C, K, dilation);
  const bool unfold = !wino && use_im2col(B, T, C);
  at::Tensor Y;  // direct and im2col paths: the GEMM output the epilogue reads (see "Fused forward")
  int64_t k0 = 0;  // direct path: first tap with shift < T (earlier taps never reach a row)
  const auto tiles = WinoTiles::of(B, T, dilation);
  at::Tensor V;  // Winograd: the transformed weights [a, C_in, C_out]
  if (wino) {
    double g[kWinoA * 3];
    for (int i = 0; i < kWinoA; ++i)
      for (int k = 0; k < 3; ++k) g[i * 3 + k] = kWinoG[i][k];
    const auto G = at::from_blob(g, {kWinoA, 3}, at::kDouble).to(x.scalar_type());
    const auto wt = weight.permute({2, 1, 0}).contiguous().view({3, C_in * C});  // [K, C_in * C_out]
    V = at::mm(G, wt).view({kWinoA, C_in, C});
  } else if (unfold) {
    Y = at::mm(im2col(xc, K, dilation), weight.contiguous().view({C, C_in * K}).t());  // [N, C_out]
  } else {
    while (k0 < K && shift_of(k0, K, dilation) >= T) ++k0;
    // [C_in, K' * C_out]: column block k - k0 is W_k^T.
    const auto wcat = weight.narrow(2, k0, K - k0).permute({1, 2, 0}).reshape({C_in, (K - k0) * C});
    Y = at::mm(xc.view({N, C_in}), wcat);  // [N, K' * C_out]
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_ln_relu_forward", [&] {
    using T_ = scalar_t;
    const T_* y = wino ? nullptr : Y.const_data_ptr<T_>();
    const T_ *pb = ptr_or_null<T_>(bc), *pg = ptr_or_null<T_>(lw), *pl = ptr_or_null<T_>(lb),
             *pr = ptr_or_null<T_>(res);
    T_ *po = out.data_ptr<T_>(), *pm = mean.data_ptr<T_>(), *ps = rstd.data_ptr<T_>();
    if (wino) {
      wino_forward<T_>(xc.const_data_ptr<T_>(), V, C_in, C, tiles, pb, pg, pl, pr, po, pm, ps, eps);
    } else {
      const int64_t width = (K - k0) * C;
      auto gather = [&](int64_t r, T_* coef, const T_** src) -> int64_t {
        if (unfold) {  // the whole z row (minus bias) is Y's row r
          coef[0] = T_(1);
          src[0] = y + r * C;
          return 1;
        }
        const int64_t t = r % T;
        int64_t n = 0;
        for (int64_t k = k0; k < K; ++k) {
          const int64_t s = shift_of(k, K, dilation);
          if (s > t) continue;  // before the sequence start: the zero padding
          coef[n] = T_(1);
          src[n++] = y + (r - s) * width + (k - k0) * C;
        }
        return n;
      };
      fused_ln_relu_rows<T_>(N, C, std::max<int64_t>(K - k0, 1), gather, pb, pg, pl, pr, po, pm, ps, eps);
    }
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t dilation, double eps) {
  check_conv(x, weight, dilation);
  const int64_t N = x.size(0) * x.size(1), C = weight.size(0);
  const auto xc = x.contiguous();
  const auto wt = weight.permute({2, 1, 0}).contiguous();
  auto gz = conv_forward(xc, wt, opt_contig(bias), dilation);  // z again, then d loss / d z in place
  const auto lw = opt_contig(ln_weight), lb = opt_contig(ln_bias);
  const auto grad = grad_out.to(x.scalar_type()).contiguous();
  const auto m = mean.to(x.scalar_type()).contiguous(), rs = rstd.to(x.scalar_type()).contiguous();
  const int64_t threads = at::get_num_threads();
  auto part_w = at::zeros({threads, C}, x.options()), part_b = at::zeros({threads, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_ln_relu_backward", [&] {
    ln_relu_epilogue_backward<scalar_t>(gz.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), N, C,
                                        ptr_or_null<scalar_t>(lw), ptr_or_null<scalar_t>(lb),
                                        m.const_data_ptr<scalar_t>(), rs.const_data_ptr<scalar_t>(),
                                        part_w.data_ptr<scalar_t>(), part_b.data_ptr<scalar_t>());
  });
  auto [grad_x, grad_w, grad_b] = conv_backward(gz, xc, wt, present(bias), dilation);
  return {grad_x, grad_w, grad_b, lw.defined() ? part_w.sum(0) : absent(x), lb.defined() ? part_b.sum(0) : absent(x)};
}

}  // namespace cprec::cpu
