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
// Backward recomputes z with the same GEMMs, runs the LN/ReLU backward in one pass per
// row (per-thread partial sums for d ln_w, d ln_b, reduced in a fixed order), and
// feeds the K input-grad GEMMs and K weight-grad GEMMs from the same buffer.
#include "cpu/common.h"
#include "cpu/ops.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cmath>
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

// Sum of a row and sum of squared deviations from m (two passes over an L1-resident row).
template <typename T>
T row_sum(const T* z, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc += Vec::loadu(z + i);
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += z[i];
  return s;
}

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

// In place on z [rows, C]: z = relu((z - mean) * rstd * g + b) + res, with stats out.
template <typename T>
void ln_relu_epilogue(T* z, int64_t rows, int64_t C, const T* g, const T* b, const T* res, T* mean, T* rstd,
                      double eps) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = z + r * C;
      const T m = row_sum(row, C) / T(C);
      const T rs = T(1) / std::sqrt(row_sq_dev(row, m, C) / T(C) + T(eps));
      mean[r] = m;
      rstd[r] = rs;
      const Vec mv(m), rv(rs), zero(T(0));
      int64_t i = 0;
      for (; i + Vec::size() <= C; i += Vec::size()) {
        Vec h = (Vec::loadu(row + i) - mv) * rv;
        if (g) h = h * Vec::loadu(g + i);
        if (b) h = h + Vec::loadu(b + i);
        h = at::vec::maximum(h, zero);
        if (res) h = h + Vec::loadu(res + r * C + i);
        h.store(row + i);
      }
      for (; i < C; ++i) {
        T h = (row[i] - m) * rs;
        if (g) h *= g[i];
        if (b) h += b[i];
        h = h > T(0) ? h : T(0);
        if (res) h += res[r * C + i];
        row[i] = h;
      }
    }
  });
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
  const int64_t B = x.size(0), T = x.size(1), C = weight.size(0);
  auto z = conv_forward(x.contiguous(), weight.permute({2, 1, 0}).contiguous(), opt_contig(bias), dilation);
  const auto lw = opt_contig(ln_weight), lb = opt_contig(ln_bias), res = opt_contig(residual);
  auto mean = at::empty({B, T}, x.options());
  auto rstd = at::empty({B, T}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_ln_relu_forward", [&] {
    ln_relu_epilogue<scalar_t>(z.data_ptr<scalar_t>(), B * T, C, ptr_or_null<scalar_t>(lw),
                               ptr_or_null<scalar_t>(lb), ptr_or_null<scalar_t>(res), mean.data_ptr<scalar_t>(),
                               rstd.data_ptr<scalar_t>(), eps);
  });
  return {z.view({B, T, C}), mean, rstd};
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
