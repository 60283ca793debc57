// Causal dilated 1D convolution on channels-last activations, plain and fused with
// LayerNorm + ReLU (+ residual), forward and backward, on the CPU.
//
//   z[b, t] = sum_k W[:, :, k] @ x[b, t - s_k] + bias,   s_k = (K-1-k) * dilation
//   out     = relu(LN(z) * ln_w + ln_b) (+ residual)      (LN over C_out)
//
// x: [B, T, C_in], W: [C_out, C_in, K], z/out: [B, T, C_out], mean/rstd: [B, T].
//
// Plain forward (causal_conv1d_forward): no padded copy of x. The batch is one
// [B*T, C_in] matrix and tap k is ONE GEMM of the row range [0, B*T - s_k) of x into
// the row range [s_k, B*T) of the output buffer (addmm_ on contiguous views).
// Flattening lets rows t < s_k of batch b receive the last rows of batch b-1; those
// (B-1) * s_k rows are saved before and restored after the tap's GEMM.
// The fused forward (causal_conv1d_ln_relu_forward) does not build z that way: see
// "Fused forward" below (one GEMM, or Winograd F(4,3) for K = 3, and an epilogue that
// assembles each z row from GEMM rows while it normalises it).
// Both backwards: see "Backward" below (Winograd for the three products of the fused
// backward, or three single GEMMs over an im2col of x).
#include "cpu/common.h"
#include "cpu/ops.h"
#include "cpu/panel_gemm.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <type_traits>
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

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

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

// Pass 1 of the LayerNorm + ReLU backward (see ln_relu_grad_row) on columns [i, C):
// o = relu'(h) * grad * g, z becomes zhat, pw += relu'(h) grad zhat, pb += relu'(h) grad;
// adds sum o and sum o * zhat to s1, s2.
template <typename T>
void ln_relu_grad_pass1_cols(T* o, T* z, const T* grad, T m, T rs, const T* g, const T* b, T* pw, T* pb, int64_t i,
                             int64_t C, T& s1, T& s2) {
  for (; i < C; ++i) {
    const T zh = (z[i] - m) * rs;
    T h = g ? zh * g[i] : zh;
    if (b) h += b[i];
    const T gr = h > T(0) ? grad[i] : T(0);
    pw[i] += gr * zh;
    pb[i] += gr;
    const T gw = g ? gr * g[i] : gr;
    s1 += gw;
    s2 += gw * zh;
    z[i] = zh;
    o[i] = gw;
  }
}

// ---- float32 row kernels for AVX2 + FMA machines ------------------------------------
// The extension is built for baseline x86-64 (no -march), where at::vec::Vectorized
// falls back to its generic code; the fused forward's row loops (input transform,
// epilogue) were then as slow as a third of the GEMMs. These few loops are compiled
// for AVX2 + FMA and picked at run time when the CPU has them; the math is the same
// (the same sums in the same order per lane).
#ifdef CPREC_HAVE_AVX2
namespace avx2 {

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
  float sum = hsum_avx2(vs);
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
  float s = hsum_avx2(acc);
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

// ln_relu_grad_pass1_cols on all columns, 8 at a time; -> (sum o, sum o * zhat).
__attribute__((target("avx2,fma"))) std::pair<float, float> ln_relu_grad_pass1(
    float* o, float* z, const float* grad, float m, float rs, const float* g, const float* b, float* pw, float* pb,
    int64_t C) {
  const __m256 mv = _mm256_set1_ps(m), rv = _mm256_set1_ps(rs), zero = _mm256_setzero_ps();
  __m256 sg = zero, sgz = zero;
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    const __m256 zh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(z + i), mv), rv);
    __m256 h = g ? _mm256_mul_ps(zh, _mm256_loadu_ps(g + i)) : zh;
    if (b) h = _mm256_add_ps(h, _mm256_loadu_ps(b + i));
    const __m256 gr = _mm256_and_ps(_mm256_cmp_ps(h, zero, _CMP_GT_OQ), _mm256_loadu_ps(grad + i));
    _mm256_storeu_ps(pw + i, _mm256_fmadd_ps(gr, zh, _mm256_loadu_ps(pw + i)));
    _mm256_storeu_ps(pb + i, _mm256_add_ps(gr, _mm256_loadu_ps(pb + i)));
    const __m256 gw = g ? _mm256_mul_ps(gr, _mm256_loadu_ps(g + i)) : gr;
    sg = _mm256_add_ps(sg, gw);
    sgz = _mm256_fmadd_ps(gw, zh, sgz);
    _mm256_storeu_ps(z + i, zh);
    _mm256_storeu_ps(o + i, gw);
  }
  float s1 = hsum_avx2(sg), s2 = hsum_avx2(sgz);
  ln_relu_grad_pass1_cols(o, z, grad, m, rs, g, b, pw, pb, i, C, s1, s2);
  return {s1, s2};
}

// Pass 2: o = rs * (o - mg - zhat * mgz); pz (may be null) += o.
__attribute__((target("avx2,fma"))) void ln_relu_grad_pass2(float* o, const float* zh, float rs, float mg, float mgz,
                                                            float* pz, int64_t C) {
  const __m256 rv = _mm256_set1_ps(rs), mgv = _mm256_set1_ps(mg), mgzv = _mm256_set1_ps(mgz);
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    const __m256 v = _mm256_mul_ps(
        rv, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(o + i), mgv), _mm256_mul_ps(_mm256_loadu_ps(zh + i), mgzv)));
    _mm256_storeu_ps(o + i, v);
    if (pz) _mm256_storeu_ps(pz + i, _mm256_add_ps(v, _mm256_loadu_ps(pz + i)));
  }
  for (; i < C; ++i) {
    o[i] = rs * (o[i] - mg - zh[i] * mgz);
    if (pz) pz[i] += o[i];
  }
}

// Splits the 8 triples (x, y, z) at p into x[0:8], y[0:8], z[0:8]: three loads, and per
// output two blends and one lane permute (the weight's [.., .., 3] layout to tap planes).
__attribute__((target("avx2,fma"))) inline void split_triples(const float* p, __m256& x, __m256& y, __m256& z) {
  const __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + 8), a2 = _mm256_loadu_ps(p + 16);
  x = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a0, a1, 0x92), a2, 0x24),
                               _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  y = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a0, a1, 0x24), a2, 0x49),
                               _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  z = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a0, a1, 0x49), a2, 0x92),
                               _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}

// The inverse of split_triples: x, y, z stored as 8 triples at p.
__attribute__((target("avx2,fma"))) inline void join_triples(float* p, __m256 x, __m256 y, __m256 z) {
  const __m256 tx = _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 ty = _mm256_permutevar8x32_ps(y, _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 tz = _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(p, _mm256_blend_ps(_mm256_blend_ps(tx, ty, 0x92), tz, 0x24));
  _mm256_storeu_ps(p + 8, _mm256_blend_ps(_mm256_blend_ps(tx, ty, 0x24), tz, 0x49));
  _mm256_storeu_ps(p + 16, _mm256_blend_ps(_mm256_blend_ps(tx, ty, 0x49), tz, 0x92));
}

// dst_i[j] = sum_k mat[i][k] * triples[3j + k] for j < n (a multiple of 8), i < A,
// dst_i = dst + i * plane; the sums as combine_row forms them (zero terms skipped).
template <int A>
__attribute__((target("avx2,fma"))) void planes_from_triples(const float* triples, int64_t n,
                                                             const double (&mat)[A][3], float* dst, int64_t plane) {
  for (int64_t j = 0; j < n; j += 8) {
    __m256 t[3];
    split_triples(triples + 3 * j, t[0], t[1], t[2]);
    for (int i = 0; i < A; ++i) {
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < 3; ++k)
        if (mat[i][k] != 0) acc = _mm256_fmadd_ps(_mm256_set1_ps(float(mat[i][k])), t[k], acc);
      _mm256_storeu_ps(dst + i * plane + j, acc);
    }
  }
}

// The forward's planes V_i^T [C_in, C_out] straight from the weight [C_out, C_in, 3] into
// panel::gemm's panels, dst_i[p][k][16] = sum_t mat[i][t] * w[16p + j, k, t]
// (dst_i = dst + i * C_out * C_in; C_out a multiple of 16): 8 c_out x 8 c_in blocks are
// formed as planes_from_triples forms its rows and transposed in registers, so the planes
// are written once, in the order the GEMM reads them. The c_in tail (C_in % 8) one float
// at a time.
template <int A>
__attribute__((target("avx2,fma"))) void panels_from_triples(const float* w, int64_t C_out, int64_t C_in,
                                                             const double (&mat)[A][3], float* dst) {
  const int64_t plane = C_out * C_in, vec = C_in / 8 * 8;
  for (int64_t r0 = 0; r0 < C_out; r0 += 8) {
    float* out = dst + (r0 / kPanelColumns) * C_in * kPanelColumns + r0 % kPanelColumns;
    for (int64_t k0 = 0; k0 < vec; k0 += 8) {
      __m256 t[8][3];
      for (int j = 0; j < 8; ++j) split_triples(w + ((r0 + j) * C_in + k0) * 3, t[j][0], t[j][1], t[j][2]);
      for (int i = 0; i < A; ++i) {
        __m256 rows[8];
        for (int j = 0; j < 8; ++j) {
          __m256 acc = _mm256_setzero_ps();
          for (int k = 0; k < 3; ++k)
            if (mat[i][k] != 0) acc = _mm256_fmadd_ps(_mm256_set1_ps(float(mat[i][k])), t[j][k], acc);
          rows[j] = acc;
        }
        panel::transpose8(rows);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(out + i * plane + (k0 + q) * kPanelColumns, rows[q]);
      }
    }
    for (int64_t k = vec; k < C_in; ++k)
      for (int j = 0; j < 8; ++j) {
        const float* tr = w + ((r0 + j) * C_in + k) * 3;
        for (int i = 0; i < A; ++i) {
          float acc = 0.f;
          for (int q = 0; q < 3; ++q)
            if (mat[i][q] != 0) acc += float(mat[i][q]) * tr[q];
          out[i * plane + k * kPanelColumns + j] = acc;
        }
      }
  }
}

// taps [3, n] (rows x, y, z; n a multiple of 8) stored as n triples at out.
__attribute__((target("avx2,fma"))) void triples_from_taps(const float* taps, int64_t stride, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += 8)
    join_triples(out + 3 * j, _mm256_loadu_ps(taps + j), _mm256_loadu_ps(taps + stride + j),
                 _mm256_loadu_ps(taps + 2 * stride + j));
}

}  // namespace avx2
#endif

// dst = bias + sum_k coef[k] * src[k] (bias may be null) -> the sum of dst.
template <typename T>
T combine_row(T* dst, int64_t n, const T* coef, const T* const* src, const T* bias, int64_t C) {
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) return avx2::combine_row(dst, n, coef, src, bias, C);
  }
#endif
  using Vec = Vectorized<T>;
  Vec vsum(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    Vec acc = bias ? Vec::loadu(bias + i) : Vec(T(0));
    for (int64_t k = 0; k < n; ++k) acc = at::vec::fmadd(Vec(coef[k]), Vec::loadu(src[k] + i), acc);
    acc.store(dst + i);
    vsum += acc;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, vsum);
  for (; i < C; ++i) {
    T acc = bias ? bias[i] : T(0);
    for (int64_t k = 0; k < n; ++k) acc += coef[k] * src[k][i];
    dst[i] = acc;
    sum += acc;
  }
  return sum;
}

// out[r] = relu(LN(bias + sum_k coef_k * src_k) * g + b) + res[r], with the row stats;
// z: the row of C that receives the conv output (the saved z row; L1-resident while
// this row is normalised).
template <typename T>
void ln_relu_row(int64_t r, int64_t n, const T* coef, const T* const* src, int64_t C, const T* bias, const T* g,
                 const T* b, const T* res, T* out, T* mean, T* rstd, double eps, T* z) {
  const T m = combine_row(z, n, coef, src, bias, C) / T(C);
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) {
      const float rs = 1.f / std::sqrt(avx2::sq_dev(z, m, C) / float(C) + float(eps));
      mean[r] = m;
      rstd[r] = rs;
      avx2::ln_relu_out(out + r * C, z, m, rs, g, b, res ? res + r * C : nullptr, C);
      return;
    }
  }
#endif
  using Vec = Vectorized<T>;
  const T rs = T(1) / std::sqrt(row_sq_dev(z, m, C) / T(C) + T(eps));
  mean[r] = m;
  rstd[r] = rs;
  // Normalise, affine, ReLU, residual; the only write of the output row.
  T* o = out + r * C;
  const T* rr = res ? res + r * C : nullptr;
  const Vec mv(m), rv(rs), zero(T(0));
  int64_t i = 0;
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

// The LayerNorm + ReLU backward of one row. z: the recomputed conv output row (scratch,
// overwritten with zhat); grad: d loss / d out; o: d loss / d z. Column sums go to the
// calling thread's rows of the partials: pw (d ln_w = sum g * zhat), pb (d ln_b = sum g)
// and pz (d bias = sum of o; null when there is no bias).
template <typename T>
void ln_relu_grad_row(T* o, T* z, const T* grad, T m, T rs, const T* g, const T* b, T* pw, T* pb, T* pz, int64_t C) {
  T sum_g = 0, sum_gz = 0;
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) {
      std::tie(sum_g, sum_gz) = avx2::ln_relu_grad_pass1(o, z, grad, m, rs, g, b, pw, pb, C);
      avx2::ln_relu_grad_pass2(o, z, rs, sum_g / float(C), sum_gz / float(C), pz, C);
      return;
    }
  }
#endif
  // Pass 1: relu'(h) * grad * ln_w and the two row means LN's backward needs.
  ln_relu_grad_pass1_cols(o, z, grad, m, rs, g, b, pw, pb, 0, C, sum_g, sum_gz);
  // Pass 2: project out the mean and the zhat direction.
  const T mg = sum_g / T(C), mgz = sum_gz / T(C);
  for (int64_t i = 0; i < C; ++i) {
    o[i] = rs * (o[i] - mg - z[i] * mgz);
    if (pz) pz[i] += o[i];
  }
}

// ---- Fused forward ---------------------------------------------------------------
//
// z is never built by a GEMM. A GEMM fills a buffer Y whose rows are linear pieces of z,
// and the epilogue builds each z row from a few Y rows (bias + sum_i coef_i * Y_i) into
// its row of the z output, runs LayerNorm + ReLU (+ residual) on it while it is in L1 and
// writes the output row once. z is returned so the backward need not recompute it (one
// [B, T, C_out] activation a layer, as the eager reference keeps). Three ways to fill Y:
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
//   rounding grows: measured at B = 16, T = 50, C = 256 on random data, max |err| of z
//   5.1e-6 against 1.2e-6 for the float32 direct sum (rms 5.1e-7 against 2.1e-7), with
//   the products by panel::gemm (6.9e-6 and 6.7e-7 when they were MKL's); F(2,3) kept
//   2.1e-6 but saved only a third of the FLOPs. The products go to panel::gemm
//   (cpu/panel_gemm.h) in float32 when C_out is a multiple of 16, else to BLAS.
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
// Tiles of the Winograd path: per batch, per dilation phase p (times p, p + dil, ...),
// enough tiles of m outputs to cover the phase; tile (b, p, q) starts at t0 = p + q*m*dil.
// Phases differ in length by at most one: the first r phases have `longest` times and
// take nq tiles, the others one time fewer and nq_short tiles. A uniform nq for every
// phase left whole tiles past T (dilation 4 at T = 50: 2 of 16 F(4,3) tiles per batch
// row; dilation 8 at T = 50: 6 of 32 F(3,2) tiles) that cost GEMM rows and produced
// nothing. With `reversed`, time t of the problem is row T-1-t of its batch in memory
// (the anti-causal input gradient as a causal conv; the same tiles in that time).
struct WinoTiles {
  int64_t B, T, dil, r, nq, nq_short;
  bool reversed;
  int64_t m;  // outputs per tile
  int64_t per_batch() const { return r * nq + (dil - r) * nq_short; }
  int64_t count() const { return B * per_batch(); }
  static WinoTiles of(int64_t B, int64_t T, int64_t dil, bool reversed = false, int64_t m = kWinoM) {
    const int64_t longest = (T + dil - 1) / dil;  // phase 0 is among the longest
    const int64_t r = T - (longest - 1) * dil;    // phases 0 .. r-1 have `longest` times
    return {B, T, dil, r, (longest + m - 1) / m, (longest - 1 + m - 1) / m, reversed, m};
  }
  void start(int64_t tile, int64_t& b, int64_t& t0) const {
    const int64_t per = per_batch();
    b = tile / per;
    int64_t rest = tile % per, p, q;
    if (rest < r * nq) {
      p = rest / nq;
      q = rest % nq;
    } else {
      rest -= r * nq;
      p = r + rest / nq_short;
      q = rest % nq_short;
    }
    t0 = p + q * m * dil;
  }
  int64_t row(int64_t b, int64_t t) const { return b * T + (reversed ? T - 1 - t : t); }
};

// Winograd pays off on GEMM-bound sizes only, and only when the tiles do not overshoot
// T by much (dilations close to T leave half-empty tiles); else the direct path (the
// forward) or im2col (the backwards). The tiles may pad B*T rows by a third: a padded
// tile still costs 0.5 * 4/3 = 0.67 of a direct GEMM. Measured at d = 256 when every
// phase still had the longest phase's tile count (CPU time of one thread on a loaded
// machine, min of 5 runs of 10, interleaved): the fused forward
// at T = 50, dilation 4 or 8 (28% padding) 2.9-3.0 vs 3.7-3.8 ms direct, at T = 100,
// dilation 8 (28%) 11.8 vs 16.1 ms; the fused backward at T = 50, dilation 4 (23%) 9.5
// vs 11.6-12.1 ms im2col, at T = 100, dilation 8 (28%) 34 vs 44-49 ms.
bool use_winograd(int64_t B, int64_t T, int64_t C_in, int64_t C_out, int64_t K, int64_t dil) {
  if (K != 3 || 2 * dil >= T || C_in < 32 || C_out < 32 || B * T < 64) return false;
  const auto tiles = WinoTiles::of(B, T, dil);
  return tiles.count() * kWinoM <= B * T + B * T / 3;
}

// The backwards' choice: z and grad_x are convs C_in -> C_out and back.
bool use_winograd_backward(int64_t B, int64_t T, int64_t C_in, int64_t C_out, int64_t K, int64_t dil) {
  return use_winograd(B, T, C_in, C_out, K, dil) && use_winograd(B, T, C_out, C_in, K, dil);
}

// Few rows: the im2col path (see "Fused forward").
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

// dst_i = sum_l mat[i][l] * src_l for each i < A (src_l null: a zero row), row i of the
// tile at dst + i * plane; C channels.
template <typename T, int A, int L>
void transform_tile(const T* const (&src)[L], const double (&mat)[A][L], int64_t C, T* dst, int64_t plane) {
  for (int i = 0; i < A; ++i) {
    T coef[L];
    const T* terms[L];
    int64_t n = 0;
    for (int l = 0; l < L; ++l)
      if (mat[i][l] != 0 && src[l]) {
        coef[n] = T(mat[i][l]);
        terms[n++] = src[l];
      }
    combine_row<T>(dst + i * plane, n, coef, terms, nullptr, C);
  }
}

// Weights of a K = 3 kernel in planes, straight from the [rows, cols, 3] layout:
// dst_i [rows, cols] = sum_k mat[i][k] * taps_k (i < A), taps_k = src[:, :, k], with
// dst_i at dst + i * rows * cols. One pass: each src row (3 * cols values, in L1) is
// split into its three taps, then combined; no transposed copy of the weight first.
// Not an at::mm: MKL's [A, 3] x [3, n] product gave float32 results that changed with the
// thread count (2 threads differed from 1, 3 and 4 in the last bit). Here each element's
// sum has one order whatever the thread count.
template <typename T, int A>
void planes_from_taps(const T* src, int64_t rows, int64_t cols, const double (&mat)[A][3], T* dst) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)), [&](int64_t begin,
                                                                                          int64_t end) {
    std::vector<T> taps(3 * cols);
    const T* tap[3] = {taps.data(), taps.data() + cols, taps.data() + 2 * cols};
    int64_t vec = 0;  // leading columns done 8 at a time by AVX2 (float32)
#ifdef CPREC_HAVE_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (have_avx2()) vec = cols / 8 * 8;
    }
#endif
    for (int64_t r = begin; r < end; ++r) {
      const T* row = src + r * cols * 3;
      T* out = dst + r * cols;
#ifdef CPREC_HAVE_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (vec) avx2::planes_from_triples<A>(row, vec, mat, out, rows * cols);
      }
#endif
      // The rest: split into the taps, then combined as rows (the same sums).
      for (int64_t j = vec; j < cols; ++j)
        for (int k = 0; k < 3; ++k) taps[k * cols + j] = row[3 * j + k];
      if (vec < cols) {
        const T* rest[3] = {tap[0] + vec, tap[1] + vec, tap[2] + vec};
        transform_tile<T, A, 3>(rest, mat, cols - vec, out + vec, rows * cols);
      }
    }
  });
}

// V [a, C_out, C_in], V_i = sum_k G[i][k] W_k: weight [C_out, C_in, 3] (contiguous).
// The forward multiplies by V_i^T (a transposed view: BLAS reads it as such), the input
// gradient by V_i. V is the calling thread's scratch (see thread_scratch); inside a
// parallel region the thread forms all of it alone.
at::Tensor wino_weights(const at::Tensor& weight) {
  const int64_t C = weight.size(0), C_in = weight.size(1);
  auto V = thread_scratch(Scratch::kWinoWeights, {kWinoA, C, C_in}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "wino_weights", [&] {
    planes_from_taps<scalar_t, kWinoA>(weight.const_data_ptr<scalar_t>(), C, C_in, kWinoG, V.data_ptr<scalar_t>());
  });
  return V;
}

// U [a, stride, C]: the input transform of tiles [t_begin, t_end) (row tile - t_begin).
template <typename T>
void wino_input_transform(const T* x, int64_t C, const WinoTiles& w, int64_t t_begin, int64_t t_end, int64_t stride,
                          T* U) {
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    int64_t b, t0;
    w.start(tile, b, t0);
    const T* d[kWinoA];
    for (int l = 0; l < kWinoA; ++l) {
      const int64_t t = t0 + (l - 2) * w.dil;
      d[l] = (t >= 0 && t < w.T) ? x + w.row(b, t) * C : nullptr;  // zero padding / past T
    }
    transform_tile<T, kWinoA, kWinoA>(d, kWinoBT, C, U + (tile - t_begin) * C, stride * C);
  }
}

// How the Winograd tiles are cut into chunks: ~128 tiles a chunk (U and M: a * 128 * C
// floats each), the count rounded up to a multiple of 4 so 1, 2 or 4 threads get even
// shares. The split does not depend on the thread count.
struct WinoChunks {
  int64_t n_tiles, size, count;
  static WinoChunks of(const WinoTiles& w) {
    const int64_t n_tiles = w.count();
    int64_t n = std::max<int64_t>(1, (n_tiles + 127) / 128);
    if (n > 1) n = (n + 3) / 4 * 4;
    const int64_t size = (n_tiles + n - 1) / n;
    return {n_tiles, size, (n_tiles + size - 1) / size};
  }
};

// Which product a Winograd conv takes with the weight planes V_i [C_out, C_in] of a
// weight [C_out, C_in, 3]: the causal conv (C_in -> C_out) multiplies the tiles by V_i^T,
// its input gradient (the anti-causal conv C_out -> C_in) by V_i.
enum class WinoProduct { kConv, kInputGrad };

// A Winograd convolution in ONE parallel region: each thread runs, per chunk,
// input transform -> a GEMMs (panel::gemm, or sequential BLAS) -> epilogue, on buffers
// of its own that stay in L2 and are reused across its chunks. One region, no
// tile-sized buffers (their first-touch page faults cost as much as the transforms),
// and the epilogue reads M while it is still in cache.
// Each thread forms its own copy of the weight planes (wino_weights into its scratch):
// planes written by one core and read by another cost more than forming them twice.
// Measured at B = 16, T = 50, d = 256, 2 threads (perf, fused forward): forming the
// planes in parallel into one shared copy took 12% of the samples and BLAS's packing of
// them another 12% (3% and 6% on 1 thread).
// x: [B*T, C_in] rows (w.row order), weight: [C_out, C_in, 3] contiguous; C_in and C are
// the input and output widths of this conv (swapped for kInputGrad). For each output
// (b, t < T): out_row(row, n, coef, src, scratch) with the row's value
// sum_k coef_k * src_k (C wide; scratch: C floats of the thread).
template <typename T, typename OutRow>
void wino_conv(const T* x, const at::Tensor& weight, WinoProduct product, int64_t C_in, int64_t C,
               const WinoTiles& w, const OutRow& out_row) {
  const auto plan = WinoChunks::of(w);
  const bool panels = use_panel_gemm<T>(C);
  at::parallel_for(0, plan.count, 1, [&](int64_t c_begin, int64_t c_end) {
    at::AutoDispatchBelowAutograd below_autograd;  // worker threads do not inherit the caller's
    // panel::gemm reads V_i [C_in, C] by rows of 16 columns: the input gradient's V_i are
    // the row-major planes, read in place; the forward's V_i^T are formed straight into
    // panels. Each thread forms its own (see above).
    at::Tensor packed;  // [a, C / 16, C_in, 16]
#ifdef CPREC_HAVE_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (panels && product == WinoProduct::kConv) {
        packed = thread_scratch(Scratch::kWinoPanels, {kWinoA, C_in * C}, weight.options());
        avx2::panels_from_triples<kWinoA>(weight.const_data_ptr<float>(), C, C_in, kWinoG, packed.data_ptr<float>());
      }
    }
#endif
    at::Tensor V;  // [a, C_in, C]: the planes the BLAS path and the in-place panel path read
    if (!packed.defined()) {
      const auto planes = wino_weights(weight);  // [a, C_out, C_in], this thread's scratch
      V = product == WinoProduct::kConv ? planes.transpose(1, 2) : planes;
    }
    auto U = thread_scratch(Scratch::kTransformIn, {kWinoA, plan.size, C_in}, weight.options());
    auto M = thread_scratch(Scratch::kTransformOut, {kWinoA, plan.size, C}, weight.options());
    std::vector<T> scratch(C);
    T coef[kWinoA];
    const T* src[kWinoA];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t t_begin = c * plan.size, t_end = std::min(plan.n_tiles, t_begin + plan.size);
      const int64_t n = t_end - t_begin;
      wino_input_transform<T>(x, C_in, w, t_begin, t_end, plan.size, U.data_ptr<T>());
      for (int i = 0; i < kWinoA; ++i) {
        // B: the forward's panels, or V_i's rows in place
        const bool p = packed.defined();
        if (panel_gemm_if<T>(panels, n, C, C_in, U[i].const_data_ptr<T>(), C_in, 1,
                             p ? packed[i].const_data_ptr<T>() : V[i].const_data_ptr<T>(),
                             p ? kPanelColumns : V.stride(1), p ? kPanelColumns * C_in : kPanelColumns,
                             M[i].data_ptr<T>(), C, false))
          continue;
        auto Mi = M[i].narrow(0, 0, n);
        at::mm_out(Mi, U[i].narrow(0, 0, n), V[i]);
      }
      const T* m = M.const_data_ptr<T>();
      for (int64_t tile = t_begin; tile < t_end; ++tile) {
        int64_t bb, t0;
        w.start(tile, bb, t0);
        for (int j = 0; j < kWinoM; ++j) {
          const int64_t t = t0 + j * w.dil;
          if (t >= w.T) break;
          int64_t k = 0;
          for (int i = 0; i < kWinoA; ++i)
            if (kWinoAT[j][i] != 0) {
              coef[k] = T(kWinoAT[j][i]);
              src[k++] = m + (i * plan.size + (tile - t_begin)) * C;
            }
          out_row(w.row(bb, t), k, coef, src, scratch.data());
        }
      }
    }
  });
}

// ln_relu_row for every row, in parallel; gather(r, coef, src) names the terms of row r
// and returns their count (<= max_terms). Row r of z [rows, C] receives the conv output.
template <typename T, typename Gather>
void fused_ln_relu_rows(int64_t rows, int64_t C, int64_t max_terms, const Gather& gather, const T* bias,
                        const T* g, const T* b, const T* res, T* out, T* mean, T* rstd, T* z, double eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * max_terms, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> coef(max_terms);
    std::vector<const T*> src(max_terms);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = gather(r, coef.data(), src.data());
      ln_relu_row<T>(r, n, coef.data(), src.data(), C, bias, g, b, res, out, mean, rstd, eps, z + r * C);
    }
  });
}

// ---- Backward ----------------------------------------------------------------------
//
// Given gz = d loss / d z: [N, C_out] (the fused op makes it first in the row pass that
// runs LN + ReLU backward, from the z its forward saved, else from z recomputed; the
// plain op gets it), three products:
//   grad_x[t] = sum_k gz[t + s_k] @ W_k        (anti-causal: a causal conv in reversed time)
//   grad_W_k  = sum_t gz[t]^T x[t - s_k]       (a correlation, C_out x C_in per tap)
//   grad_bias = sum_t gz[t]                    (column sums in the gz row pass)
// Both ops pick by size as the forward does (use_winograd_backward):
// With the saved z the row pass reads z rows and the products below follow (the same as
// the plain op's); without it (a direct call with no z):
// * Winograd, K = 3: pass A recomputes z tile by tile as the forward does and runs the
//   LN/ReLU backward on each output row as soon as the epilogue has assembled it (gz
//   rows written once, bias/LN column sums in the same pass). Pass B is the forward's
//   Winograd on gz in reversed time with the taps W_k ([C_out, C_in]): grad_x in place
//   of z, no LayerNorm. Each has half the direct FLOPs. grad_W: F(3,2) (see
//   "Weight gradient by Winograd F(3,2)"), 2/3 of the direct FLOPs. The plain op runs
//   pass B and F(3,2) on the gz it is given.
//   float32 error against the float64 direct sum, measured at B = 16, T = 50, C = 256,
//   dilation 1 on random data (the float32 direct sum of the eager reference in
//   brackets): grad_x max |err| 2.6e-6, rms 2.6e-7 (6.8e-7, 1.1e-7; entries up to 2.3);
//   grad_W (F(3,2)) max 2.0e-5, rms 3.0e-6 (2.8e-5, 3.8e-6; entries up to 93); grad_bias
//   max 2.8e-5, rms 5.2e-6 (7.9e-6, 1.9e-6; entries up to 50), with the saved z. The
//   products of both passes go to panel::gemm in float32 when C_in is a multiple of 16
//   (grad_x: 4.7e-6 / 3.5e-7 and grad_W: 2.7e-5 / 3.7e-6 when they were MKL's).
// * im2col, any K and any N (few rows, K != 3, or dilations close to T): cols [N, C_in*K]
//   of x and ONE GEMM per product, all against the weight in its own layout
//   Wf = W.view(C_out, C_in*K): z = cols @ Wf^T (without a saved z), grad_W = gz^T @ cols ([C_out, N] x
//   [N, C_in*K]), grad_cols = gz @ Wf ([N, C_out] x [C_out, C_in*K]) and grad_x the
//   K shifted slices of grad_cols summed (col2im).

// The floor that keeps fwd+bwd of the fused op under 1.5x eager at d = 256 (one thread,
// CPU time, min of 5 x 10 runs on a loaded 2-core machine): at B = 16, T = 50 the bare
// GEMMs of these algorithms, as one call each, take 1.80 ms per Winograd F(4,3) pass
// (forward, pass A, pass B) and 2.31 ms for grad_W by F(3,2): 7.7 ms a layer with no
// transform, epilogue or LayerNorm at all, against 11.4-15.8 ms for the eager reference's
// forward+backward in the same runs (1.5-2.1x at best); we measure 12-14.5 ms (2.6-2.9
// fwd, 8.8-9.0 bwd, ~1 ms in the Python op layer). Pass A (recomputing z) was 1.80 ms
// of that floor; the op now saves z, which takes pass A out: the floor is 5.9 ms.
// Measured with the saved z (CPU time, 1 thread, min of 3 interleaved rounds of 10 on a
// 2-core machine at load ~9, so rough): fwd+bwd at B = 16, T = 50, dilations 1-8
// 9.6-11.4 ms (12.0-14.1 recomputing z; eager 12.7-14.8: 1.16-1.37x), at B = 32,
// T = 100 33.0-36.8 ms (38.9-47.6; eager 51-55: 1.39-1.61x).
// Then the weight planes straight from the weight's layout (no transposed copies), the
// grad_W partials without a zero fill and written in the weight's layout, and per-thread
// scratch kept across calls. One thread, quiet machine, 101 calls in a row: fwd + bwd
// 7.9 / 9.4 / 9.1 / 9.9 ms at dilations 1 / 2 / 4 / 8 (B = 16, T = 50); at dilation 1
// the GEMMs take 1.9 ms in each Winograd pass and 2.3 ms in grad_W (82-92 GFLOP/s, MKL
// alone reaches 95-100 at these shapes), the transforms, epilogues, row pass and weight
// planes 1.2 ms. Dilations 4 and 8 pay 28% of padded tile rows at T = 50.
// Then panel::gemm for the float32 products (no per-chunk packing by BLAS; the forward's
// planes formed straight into panels once per call): the four layers' fwd + bwd
// 30.6 -> 26.7 ms (sum of per-call minimums, 1 thread), 14.0 ms on 2 threads.

// Per-thread column sums of the backward row pass, [threads, C] each, summed at the end
// in thread order (deterministic for a given thread count).
struct ColumnSums {
  at::Tensor ln_w, ln_b, bias;
  ColumnSums(int64_t C, bool need_bias, const at::TensorOptions& opt) {
    const int64_t threads = at::get_num_threads();
    ln_w = at::zeros({threads, C}, opt);
    ln_b = at::zeros({threads, C}, opt);
    if (need_bias) bias = at::zeros({threads, C}, opt);
  }
};

// The backward row pass: row r of z = bias + sum_k coef_k src_k; its d loss / d z goes to
// gz row r. The gz row may alias a src row (read into scratch first).
template <typename T>
struct LnReluGradRows {
  T* gz;
  const T *grad, *mean, *rstd, *bias, *g, *b;
  T *pw, *pb, *pz;
  int64_t C;
  void operator()(int64_t r, int64_t n, const T* coef, const T* const* src, T* scratch) const {
    const int64_t off = at::get_thread_num() * C;
    combine_row<T>(scratch, n, coef, src, bias, C);
    ln_relu_grad_row<T>(gz + r * C, scratch, grad + r * C, mean[r], rstd[r], g, b, pw + off, pb + off,
                        pz ? pz + off : nullptr, C);
  }
};

// The row pass over rows [0, N) whose z rows are z + r * C (one term each): the
// im2col path's GEMM output, or the z the forward saved (then rows.bias is null).
template <typename T>
void ln_relu_grad_rows_from(const T* z, int64_t N, const LnReluGradRows<T>& rows) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / rows.C), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(rows.C);
    const T one(1);
    for (int64_t r = begin; r < end; ++r) {
      const T* src = z + r * rows.C;
      rows(r, 1, &one, &src, scratch.data());
    }
  });
}

// grad_x [B, T, C_in] from grad_cols [N, C_in*K]: the K shifted slices summed.
at::Tensor col2im(const at::Tensor& grad_cols, int64_t B, int64_t T, int64_t C_in, int64_t K, int64_t dilation) {
  const auto g4 = grad_cols.view({B, T, C_in, K});
  auto gx = g4.select(3, K - 1).contiguous();  // the unshifted tap
  for (int64_t k = K - 2; k >= 0; --k) {
    const int64_t s = shift_of(k, K, dilation);
    if (s >= T) break;
    gx.narrow(1, 0, T - s).add_(g4.select(3, k).narrow(1, s, T - s));
  }
  return gx;
}

// im2col products of the backward: -> (grad_x [B, T, C_in], grad_W [C_out, C_in, K]).
std::tuple<at::Tensor, at::Tensor> im2col_backward(const at::Tensor& gz, const at::Tensor& cols, const at::Tensor& wf,
                                                   const at::Tensor& x, int64_t K, int64_t dilation) {
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2);
  auto grad_w = at::mm(gz.t(), cols).view({wf.size(0), C_in, K});
  return {col2im(at::mm(gz, wf), B, T, C_in, K, dilation), grad_w};
}

// Pass B: grad_x [B, T, C_in] = the anti-causal conv of gz [N, C_out] by Winograd;
// weight [C_out, C_in, 3] contiguous.
at::Tensor wino_grad_x(const at::Tensor& gz, const at::Tensor& weight, int64_t B, int64_t T, int64_t dilation) {
  const int64_t C = weight.size(0), C_in = weight.size(1);
  auto gx = at::empty({B, T, C_in}, gz.options());
  const auto tiles = WinoTiles::of(B, T, dilation, /*reversed=*/true);
  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "causal_conv1d_backward_grad_x", [&] {
    using T_ = scalar_t;
    T_* out = gx.data_ptr<T_>();
    auto store = [&](int64_t r, int64_t n, const T_* coef, const T_* const* src, T_*) {
      combine_row<T_>(out + r * C_in, n, coef, src, nullptr, C_in);
    };
    wino_conv<T_>(gz.const_data_ptr<T_>(), weight, WinoProduct::kInputGrad, C, C_in, tiles, store);
  });
  return gx;
}

// ---- Weight gradient by Winograd F(3,2) ---------------------------------------------
// The transpose of F(2,3) (y = AT2 [(G2 g) . (BT2 d)], tiles of m = 2 outputs, a = 4):
// per tile of outputs t0, t0 + dil and inputs d_l = x[t0 + (l-2)*dil] (l < 4),
// U_i = (BT2 d)_i and Gz_i = sum_j AT2[j][i] gz[t0 + j*dil]; P_i = sum over tiles of
// Gz_i^T @ U_i ([C_out, C_in], a GEMM per chunk accumulated per thread) and
// grad_W_k = sum_i G2[i][k] P_i: 4 GEMMs of N/2 rows instead of 3 of N (2/3 of the FLOPs).
// Its points are 0, +-1 only (F(4,3)'s transpose, with +-2 and 1/24, was tried: 3x the
// direct sum's float32 error on grad_W, max 1.7e-4 against 6.2e-5, and over the tests'
// float32 tolerance of 1e-5 on small entries at C = 40). This one: see "Backward".
constexpr int kWino2M = 2, kWino2A = 4;
constexpr double kWino2BT[kWino2A][kWino2A] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
constexpr double kWino2GT[3][kWino2A] = {{1, 0.5, 0.5, 0}, {0, 0.5, -0.5, 0}, {0, 0.5, 0.5, 1}};  // G2 transposed
constexpr double kWino2A_[kWino2A][kWino2M] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};  // AT2 transposed

// grad_W [C, C_in, 3] (the weight's layout), grad_W[:, :, k] = sum_i G2[i][k] P_i, where
// P_i [C, C_in] is the sum in thread order of the partials parts[t][i] of the threads in
// `used`. Row by row: the planes' row sums and the three taps stay in L1 and are written
// interleaved, so no [3, C, C_in] intermediate and no transposed copy.
template <typename T>
void grad_w_from_partials(const T* parts, const std::vector<int64_t>& used, int64_t C, int64_t C_in, T* out) {
  const int64_t plane = C * C_in, part = kWino2A * plane;
  at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(C_in, 1)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf((kWino2A + 3) * C_in);
    T* taps = buf.data() + kWino2A * C_in;
    for (int64_t c = begin; c < end; ++c) {
      const T* src[kWino2A];
      for (int i = 0; i < kWino2A; ++i) {
        const T* first = parts + used[0] * part + i * plane + c * C_in;
        if (used.size() == 1) {
          src[i] = first;
          continue;
        }
        T* sum = buf.data() + i * C_in;
        copy_row(sum, first, C_in);
        for (size_t u = 1; u < used.size(); ++u) add_row(sum, parts + used[u] * part + i * plane + c * C_in, C_in);
        src[i] = sum;
      }
      transform_tile<T, 3, kWino2A>(src, kWino2GT, C_in, taps, C_in);
      T* o = out + c * C_in * 3;
      int64_t j = 0;
#ifdef CPREC_HAVE_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (have_avx2()) {
          j = C_in / 8 * 8;
          avx2::triples_from_taps(taps, C_in, j, o);
        }
      }
#endif
      for (; j < C_in; ++j)
        for (int k = 0; k < 3; ++k) o[3 * j + k] = taps[k * C_in + j];
    }
  });
}

// grad_W [C_out, C_in, 3] of a K = 3 conv: x [B, T, C_in], gz [B*T, C_out] (contiguous).
// Each thread keeps its own partial P_i, started by its first chunk's GEMM (no zero fill).
at::Tensor wino_grad_w(const at::Tensor& gz, const at::Tensor& x, int64_t dilation) {
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2), C = gz.size(1);
  const auto w = WinoTiles::of(B, T, dilation, false, kWino2M);
  const auto plan = WinoChunks::of(w);
  const int64_t threads = at::get_num_threads();
  auto P = thread_scratch(Scratch::kGradWParts, {threads, kWino2A, C, C_in}, x.options());
  std::vector<char> started(threads, 0);
  auto grad_w = at::empty({C, C_in, 3}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_grad_weight", [&] {
    using T_ = scalar_t;
    const T_ *px = x.const_data_ptr<T_>(), *pg = gz.const_data_ptr<T_>();
    const bool panels = use_panel_gemm<T_>(C_in);
    // panel::gemm reads both operands in place along the tiles, rows ld apart: a row
    // stride of a multiple of 1 KB (d = 256) would put a chunk's rows in a few L1 sets,
    // so its scratch rows are one panel width (16 floats) longer.
    const int64_t ld_u = panels ? C_in + kPanelColumns : C_in, ld_g = panels ? C + kPanelColumns : C;
    at::parallel_for(0, plan.count, 1, [&](int64_t c_begin, int64_t c_end) {
      at::AutoDispatchBelowAutograd below_autograd;
      auto U = thread_scratch(Scratch::kGradWIn, {kWino2A, plan.size, ld_u}, x.options());
      auto Gz = thread_scratch(Scratch::kGradWOut, {kWino2A, plan.size, ld_g}, x.options());
      const int64_t tid = at::get_thread_num();
      auto Pt = P[tid];
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t t_begin = c * plan.size, t_end = std::min(plan.n_tiles, t_begin + plan.size);
        for (int64_t tile = t_begin; tile < t_end; ++tile) {
          int64_t b, t0;
          w.start(tile, b, t0);
          const T_* d[kWino2A];
          for (int l = 0; l < kWino2A; ++l) {
            const int64_t t = t0 + (l - 2) * dilation;
            d[l] = (t >= 0 && t < T) ? px + w.row(b, t) * C_in : nullptr;
          }
          const T_* o[kWino2M];
          for (int j = 0; j < kWino2M; ++j) {
            const int64_t t = t0 + j * dilation;
            o[j] = t < T ? pg + w.row(b, t) * C : nullptr;  // outputs past T have no grad
          }
          transform_tile<T_, kWino2A, kWino2A>(d, kWino2BT, C_in, U.data_ptr<T_>() + (tile - t_begin) * ld_u,
                                                plan.size * ld_u);
          transform_tile<T_, kWino2A, kWino2M>(o, kWino2A_, C, Gz.data_ptr<T_>() + (tile - t_begin) * ld_g,
                                                plan.size * ld_g);
        }
        const int64_t n = t_end - t_begin;
        for (int i = 0; i < kWino2A; ++i) {
          auto Pi = Pt[i];
          // P_i [C, C_in] (+)= Gz_i^T @ U_i: A(r, k) = Gz_i[k, r], U_i's rows read in place
          if (panel_gemm_if<T_>(panels, C, C_in, n, Gz[i].const_data_ptr<T_>(), 1, ld_g, U[i].const_data_ptr<T_>(),
                                ld_u, kPanelColumns, Pi.data_ptr<T_>(), C_in, started[tid]))
            continue;
          const auto lhs = Gz[i].narrow(0, 0, n).t(), rhs = U[i].narrow(0, 0, n);
          if (started[tid]) {
            Pi.addmm_(lhs, rhs);
          } else {
            at::mm_out(Pi, lhs, rhs);
          }
        }
        started[tid] = 1;
      }
    });
    std::vector<int64_t> used;
    for (int64_t t = 0; t < threads; ++t)
      if (started[t]) used.push_back(t);
    if (used.empty()) {  // no tiles: nothing reached the weight
      grad_w.zero_();
      return;
    }
    grad_w_from_partials<T_>(P.const_data_ptr<T_>(), used, C, C_in, grad_w.data_ptr<T_>());
  });
  return grad_w;
}

// (grad_x, grad_W) of a conv from gz [N, C_out] (contiguous): pass B and F(3,2), or im2col.
std::tuple<at::Tensor, at::Tensor> conv_grads(const at::Tensor& gz, const at::Tensor& xc, const at::Tensor& wc,
                                              int64_t dilation) {
  const int64_t B = xc.size(0), T = xc.size(1), C = wc.size(0), K = wc.size(2);
  if (use_winograd_backward(B, T, xc.size(2), C, K, dilation)) {
    return {wino_grad_x(gz, wc, B, T, dilation), wino_grad_w(gz, xc, dilation)};
  }
  return im2col_backward(gz, im2col(xc, K, dilation), wc.view({C, -1}), xc, K, dilation);
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
  const int64_t B = x.size(0), T = x.size(1), C = weight.size(0);
  const auto gz = grad_y.to(x.scalar_type()).reshape({B * T, C}).contiguous();
  auto [grad_x, grad_w] = conv_grads(gz, x.contiguous(), weight.contiguous(), dilation);
  return {grad_x, grad_w, present(bias) ? gz.sum(0) : absent(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const std::optional<at::Tensor>& residual, int64_t dilation, double eps) {
  check_conv(x, weight, dilation);
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2), C = weight.size(0), K = weight.size(2);
  const int64_t N = B * T;
  const auto xc = x.contiguous();
  const auto bc = opt_contig(bias), lw = opt_contig(ln_weight), lb = opt_contig(ln_bias), res = opt_contig(residual);
  auto out = at::empty({B, T, C}, x.options());
  auto z = at::empty({B, T, C}, x.options());  // saved for the backward (no recompute there)
  auto mean = at::empty({B, T}, x.options());
  auto rstd = at::empty({B, T}, x.options());
  const bool wino = use_winograd(B, T, C_in, C, K, dilation);
  const bool unfold = !wino && use_im2col(B, T, C);
  at::Tensor Y;  // direct and im2col paths: the GEMM output the epilogue reads (see "Fused forward")
  int64_t k0 = 0;  // direct path: first tap with shift < T (earlier taps never reach a row)
  const auto wc = weight.contiguous();
  if (unfold) {  // (Winograd: wino_conv forms the weight planes)
    Y = at::mm(im2col(xc, K, dilation), wc.view({C, C_in * K}).t());  // [N, C_out]
  } else if (!wino) {
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
    T_ *po = out.data_ptr<T_>(), *pm = mean.data_ptr<T_>(), *ps = rstd.data_ptr<T_>(), *pz = z.data_ptr<T_>();
    if (wino) {
      auto row = [&](int64_t r, int64_t n, const T_* coef, const T_* const* src, T_*) {
        ln_relu_row<T_>(r, n, coef, src, C, pb, pg, pl, pr, po, pm, ps, eps, pz + r * C);
      };
      wino_conv<T_>(xc.const_data_ptr<T_>(), wc, WinoProduct::kConv, C_in, C, WinoTiles::of(B, T, dilation), row);
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
      fused_ln_relu_rows<T_>(N, C, std::max<int64_t>(K - k0, 1), gather, pb, pg, pl, pr, po, pm, ps, pz, eps);
    }
  });
  return {out, mean, rstd, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& z, int64_t dilation, double eps) {
  check_conv(x, weight, dilation);
  const int64_t B = x.size(0), T = x.size(1), C_in = x.size(2), C = weight.size(0), K = weight.size(2);
  const int64_t N = B * T;
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const auto bc = opt_contig(bias), lw = opt_contig(ln_weight), lb = opt_contig(ln_bias);
  const auto grad = grad_out.to(x.scalar_type()).contiguous();
  const auto m = mean.to(x.scalar_type()).contiguous(), rs = rstd.to(x.scalar_type()).contiguous();
  ColumnSums sums(C, bc.defined(), x.options());
  const auto grad_bias = [&] { return bc.defined() ? sums.bias.sum(0) : absent(x); };
  const auto grad_ln = [&](const at::Tensor& given, const at::Tensor& partial) {
    return given.defined() ? partial.sum(0) : absent(x);
  };
  if (present(z) && z->numel() > 0) {  // the forward's z: the row pass reads it, no pass A
    TORCH_CHECK(z->numel() == N * C, "causal_conv1d_ln_relu_backward: z must be [B, T, C_out] or empty");
    const auto zc = z->to(x.scalar_type()).reshape({N, C}).contiguous();
    const auto gz = thread_scratch(Scratch::kGradZ, {N, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_ln_relu_backward_saved_z", [&] {
      using T_ = scalar_t;
      // bias null: the saved z already holds it.
      const LnReluGradRows<T_> rows{gz.data_ptr<T_>(), grad.const_data_ptr<T_>(), m.const_data_ptr<T_>(),
                                    rs.const_data_ptr<T_>(), nullptr, ptr_or_null<T_>(lw), ptr_or_null<T_>(lb),
                                    sums.ln_w.data_ptr<T_>(), sums.ln_b.data_ptr<T_>(),
                                    bc.defined() ? sums.bias.data_ptr<T_>() : nullptr, C};
      ln_relu_grad_rows_from<T_>(zc.const_data_ptr<T_>(), N, rows);
    });
    auto [grad_x, grad_w] = conv_grads(gz, xc, wc, dilation);
    return {grad_x, grad_w, grad_bias(), grad_ln(lw, sums.ln_w), grad_ln(lb, sums.ln_b)};
  }
  const bool wino = use_winograd_backward(B, T, C_in, C, K, dilation);
  at::Tensor gz, grad_x, grad_w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_ln_relu_backward", [&] {
    using T_ = scalar_t;
    LnReluGradRows<T_> rows{nullptr, grad.const_data_ptr<T_>(), m.const_data_ptr<T_>(), rs.const_data_ptr<T_>(),
                            ptr_or_null<T_>(bc), ptr_or_null<T_>(lw), ptr_or_null<T_>(lb),
                            sums.ln_w.data_ptr<T_>(), sums.ln_b.data_ptr<T_>(),
                            bc.defined() ? sums.bias.data_ptr<T_>() : nullptr, C};
    if (wino) {
      gz = thread_scratch(Scratch::kGradZ, {N, C}, x.options());
      rows.gz = gz.data_ptr<T_>();
      wino_conv<T_>(xc.const_data_ptr<T_>(), wc, WinoProduct::kConv, C_in, C, WinoTiles::of(B, T, dilation), rows);
      grad_w = wino_grad_w(gz, xc, dilation);
      grad_x = wino_grad_x(gz, wc, B, T, dilation);
    } else {
      const auto cols = im2col(xc, K, dilation);
      const auto wf = wc.view({C, C_in * K});
      gz = at::mm(cols, wf.t());  // z without bias; the row pass turns it into gz in place
      rows.gz = gz.data_ptr<T_>();
      ln_relu_grad_rows_from<T_>(gz.const_data_ptr<T_>(), N, rows);
      std::tie(grad_x, grad_w) = im2col_backward(gz, cols, wf, xc, K, dilation);
    }
  });
  return {grad_x, grad_w, grad_bias(), grad_ln(lw, sums.ln_w), grad_ln(lb, sums.ln_b)};
}

}  // namespace cprec::cpu
