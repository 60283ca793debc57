// Tail-cluster adaptive softmax on the CPU: loss (forward, backward), full log-probs
// (forward, backward) and a streaming top-k.
//
//   head  = h @ Wh^T + bh                                   [N, c1 + n_tails]
//   z_i   = h @ Q_i^T,  tail_i = z_i @ F_i^T                [N, d_i], [N, V_i]
//   log p(v) = log_softmax(head)[v]                                          v < c1
//   log p(v) = log_softmax(head)[c1 + i] + log_softmax(tail_i)[v - c_{i+1}]    v in tail i
//
// h: [N, d], Wh: [c1 + n_tails, d], Q_i: [d_i, d], F_i: [V_i, d_i].
//
// Memory traffic it is designed for. Loss: the head logits [N, H] once (H = c1 + n_tails
// is small), and for tail i only its n_i rows, whose logits [n_i, V_i] are produced in
// item tiles of ~1 MB (L2-resident) and reduced on the fly (online log-sum-exp), so
// neither [N, V] nor [n_i, V_i] is ever materialised. The rows are grouped by cluster
// in one pass over the targets here in C++ (no per-cluster host round trip).
// Training (a mean or sum loss that needs gradients) runs adaptive_softmax_loss_with_grads:
// the gradients are formed in the forward, as Liger-Kernel's fused linear cross-entropy
// does, so the head logits are computed once and turned into w * (softmax - onehot) in
// place (one exp per logit, row by row while the row is in L1) and each tail's tiles are formed
// twice (log-sum-exp, then gradients; with d_i small these GEMMs are cheap). The
// *_stats_* pair (no gradients needed in the forward, or reduction "none") saves the
// per-row head and tail-cluster log-sum-exps, [N] each, and its backward runs the same
// gradient pass with them given.
// Top-k: the same tiles for every row, each row keeping a min-heap of its k best
// raw tail logits per tail; the per-row constant log_softmax(head)[c1+i] - lse_i is
// added when the tail is done. Memory: O(N * (H + tile + k)), never O(N * V).
// The loss's exponentials run in the AVX2 row kernels below on cache-resident tiles. The
// float32 products run on panel_mm (cpu/panel_matmul.h), the conv's register-tile GEMM,
// not BLAS: at N = 4,096, d = 256, V = 100k it took the loss from 255-285 to 213-226 ms on
// one thread (the head's three products 127 ms against 165 ms on MKL).
#include "cpu/common.h"
#include "cpu/ops.h"
#include "cpu/panel_matmul.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <limits>
#include <utility>

namespace cprec::cpu {
namespace {

constexpr int64_t kTileElems = 1 << 18;  // logits per tile: 1 MB of float32, stays in L2

struct Params {
  at::Tensor hidden, head_weight, head_bias;  // head_bias undefined when absent
  std::vector<at::Tensor> proj, weight;       // Q_i [d_i, d], F_i [V_i, d_i]
  std::vector<int64_t> lo, hi;                // item range [lo_i, hi_i) of tail i
  int64_t c1 = 0;
  int64_t n_tails() const { return static_cast<int64_t>(proj.size()); }
};

Params make_params(const at::Tensor& hidden, const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                   at::TensorList tail_projections, at::TensorList tail_weights, at::IntArrayRef cutoffs) {
  check_float(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2, "adaptive softmax: hidden must be [N, d]");
  TORCH_CHECK(tail_projections.size() + 1 == cutoffs.size() && tail_weights.size() + 1 == cutoffs.size(),
              "adaptive softmax: need one projection and one weight per tail cluster");
  const auto dtype = hidden.scalar_type();
  auto same = [&](const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == dtype, "adaptive softmax: all tensors must have hidden's dtype ", dtype);
    return t.contiguous();
  };
  Params p;
  p.hidden = hidden.contiguous();
  p.head_weight = same(head_weight);
  if (present(head_bias)) p.head_bias = same(*head_bias);
  p.c1 = cutoffs[0];
  for (size_t i = 0; i < tail_projections.size(); ++i) {
    p.proj.push_back(same(tail_projections[i]));
    p.weight.push_back(same(tail_weights[i]));
    p.lo.push_back(cutoffs[i]);
    p.hi.push_back(cutoffs[i + 1]);
  }
  return p;
}

at::Tensor head_logits(const Params& p, const at::Tensor& h) {  // [n, H]
  auto out = at::empty({h.size(0), p.head_weight.size(0)}, h.options());
  if (p.head_bias.defined()) out.copy_(p.head_bias.expand_as(out));
  panel_mm_out(out, h, p.head_weight.t(), /*accumulate=*/p.head_bias.defined());
  return out;
}

int64_t tile_width(int64_t rows, int64_t items) {
  return std::min(items, std::max<int64_t>(256, kTileElems / std::max<int64_t>(rows, 1)));
}

at::Tensor long_tensor(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kLong).clone();
}

// ---- softmax row kernels ------------------------------------------------------------
// Every logit of the loss goes through exp once or twice, so exp is as costly as a third
// of the GEMMs with ATen's (Sleef, 1 ulp) on this 2-core machine. The float32 rows use
// Cephes' expf polynomial in AVX2 + FMA (max relative error ~2e-7, well inside the
// float32 tests' tolerance) fused with the shift, the scale and the sum, so a row is read
// and written once per pass while it is in L1; float64 (the tests' oracle dtype) and
// machines without AVX2 take the plain loops.
#ifdef CPREC_HAVE_AVX2
namespace avx2 {

__attribute__((target("avx2,fma"))) inline __m256 exp_ps(__m256 x) {
  // x <= 0 here (a logit minus its row's max or log-sum-exp): clamp where expf underflows.
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));  // y * 2^n
}

__attribute__((target("avx2,fma"))) float row_max(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  float out = _mm_cvtss_f32(h);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

// x = exp(x - shift) * scale -> the sum of exp(x - shift).
__attribute__((target("avx2,fma"))) float exp_row(float* x, int64_t n, float shift, float scale) {
  const __m256 sv = _mm256_set1_ps(shift), cv = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv));
    acc = _mm256_add_ps(acc, e);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(e, cv));
  }
  if (i < n) {  // the tail through the same polynomial, so every entry rounds alike
    alignas(32) float buf[8];
    for (int64_t j = 0; j < 8; ++j) buf[j] = i + j < n ? x[i + j] - shift : -100.f;
    _mm256_store_ps(buf, exp_ps(_mm256_load_ps(buf)));
    float rest = 0.f;
    for (int64_t j = 0; i + j < n; ++j) {
      rest += buf[j];
      x[i + j] = buf[j] * scale;
    }
    return hsum_avx2(acc) + rest;
  }
  return hsum_avx2(acc);
}

}  // namespace avx2
#endif

template <typename T>
T row_max(const T* x, int64_t n) {
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) return avx2::row_max(x, n);
  }
#endif
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x = exp(x - shift) * scale -> the sum of exp(x - shift).
template <typename T>
T exp_row(T* x, int64_t n, T shift, T scale) {
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) return avx2::exp_row(x, n, shift, scale);
  }
#endif
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T e = std::exp(x[i] - shift);
    sum += e;
    x[i] = e * scale;
  }
  return sum;
}

// Rows of a [n, width] logit matrix per parallel task: ~64 KB of logits.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// Online log-sum-exp of each row of tile [n, w] (overwritten) into (m, s): after every
// tile, lse = m + log(s).
template <typename T>
void accumulate_lse(at::Tensor& tile, T* m, T* s) {
  const int64_t n = tile.size(0), w = tile.size(1);
  T* tp = tile.data_ptr<T>();
  at::parallel_for(0, n, row_grain(w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = tp + r * w;
      const T mt = row_max(row, w);
      const T st = exp_row<T>(row, w, mt, T(1));
      if (mt > m[r]) {
        s[r] = s[r] * std::exp(m[r] - mt) + st;
        m[r] = mt;
      } else {
        s[r] += st * std::exp(mt - m[r]);
      }
    }
  });
}

// log-sum-exp over the items of tail i for codes z: [n, d_i] -> [n], tile by tile.
at::Tensor tail_lse(const at::Tensor& z, const at::Tensor& weight) {
  const int64_t n = z.size(0), items = weight.size(0), width = tile_width(n, items);
  auto m = at::full({n}, -std::numeric_limits<double>::infinity(), z.options());
  auto s = at::zeros({n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "adaptive_tail_lse", [&] {
    for (int64_t t0 = 0; t0 < items; t0 += width) {
      auto tile = panel_mm(z, weight.narrow(0, t0, std::min(width, items - t0)).t());  // [n, w]
      accumulate_lse<scalar_t>(tile, m.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
    }
  });
  return s.log_().add_(m);
}

// A tail's rows' log-sum-exps and nll = lse - logit of the target, from their codes
// z [n_i, d_i] and targets within the tail -> (lse [n_i], nll [n_i]).
std::pair<at::Tensor, at::Tensor> tail_lse_and_nll(const at::Tensor& z, const at::Tensor& F,
                                                   const std::vector<int64_t>& local) {
  auto lse = tail_lse(z, F);
  auto nll = lse.sub(z.mul(F.index_select(0, long_tensor(local))).sum(1));
  return {lse, nll};
}

// Rows grouped by target cluster, in one pass over the targets.
struct Groups {
  std::vector<std::vector<int64_t>> rows;   // per tail: its rows, ascending
  std::vector<std::vector<int64_t>> local;  // per tail: each row's target minus lo_i
  std::vector<int64_t> head_col;            // [N] head column of the target, -1 if ignored
  int64_t kept = 0;
};

Groups group_rows(const Params& p, const at::Tensor& target, int64_t ignore_index) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == p.hidden.size(0), "adaptive softmax: target must be [N]");
  const auto t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const int64_t n = t.numel(), vocab = p.n_tails() ? p.hi.back() : p.c1;
  Groups g;
  g.rows.resize(p.n_tails());
  g.local.resize(p.n_tails());
  g.head_col.resize(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t v = tp[r];
    if (v == ignore_index) {
      g.head_col[r] = -1;
      continue;
    }
    TORCH_CHECK(v >= 0 && v < vocab, "adaptive softmax: target ", v, " is outside [0, ", vocab, ")");
    ++g.kept;
    if (v < p.c1) {
      g.head_col[r] = v;
      continue;
    }
    int64_t i = 0;
    while (v >= p.hi[i]) ++i;
    g.head_col[r] = p.c1 + i;
    g.rows[i].push_back(r);
    g.local[i].push_back(v - p.lo[i]);
  }
  return g;
}

// Per-row factor of d loss / d nll: grad_loss times 1 (none/sum) or 1/kept (mean), 0 if ignored.
at::Tensor row_weights(const at::Tensor& grad_loss, const Groups& g, const std::string& reduction,
                       const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(g.head_col.size());
  std::vector<double> keep(n);
  const double scale = reduction == "mean" ? 1.0 / std::max<int64_t>(g.kept, 1) : 1.0;
  for (int64_t r = 0; r < n; ++r) keep[r] = g.head_col[r] < 0 ? 0.0 : scale;
  auto w = at::from_blob(keep.data(), {n}, at::kDouble).to(opts.dtype(), /*non_blocking=*/false, /*copy=*/true);
  return w.mul_(grad_loss.to(opts.dtype()));  // grad_loss: [] or [N]
}

void check_reduction(const std::string& reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "adaptive softmax: reduction must be mean, sum or none, got ", reduction);
}

// ---- top-k helpers ------------------------------------------------------------------
template <typename T>
using Entry = std::pair<T, int64_t>;  // (score, item)

template <typename T>
struct MinFirst {
  bool operator()(const Entry<T>& a, const Entry<T>& b) const { return a.first > b.first; }
};

// A row's k best (score, item), as a min-heap whose root is the one to evict.
template <typename T>
struct TopK {
  int64_t k;
  std::vector<Entry<T>> heap;
  void offer(T score, int64_t item) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.emplace_back(score, item);
      std::push_heap(heap.begin(), heap.end(), MinFirst<T>());
    } else if (score > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), MinFirst<T>());
      heap.back() = {score, item};
      std::push_heap(heap.begin(), heap.end(), MinFirst<T>());
    }
  }
  bool full_and_beats(T score) const { return static_cast<int64_t>(heap.size()) >= k && score <= heap.front().first; }
};

// Sorted excluded ids per row (negatives are padding and dropped).
std::vector<std::vector<int64_t>> excluded_ids(const std::optional<at::Tensor>& exclude, int64_t n) {
  std::vector<std::vector<int64_t>> out(n);
  if (!present(exclude) || exclude->numel() == 0) return out;
  const auto e = exclude->to(at::kLong).contiguous();
  TORCH_CHECK(e.dim() == 2 && e.size(0) == n, "adaptive_topk: exclude must be [N, m]");
  const int64_t m = e.size(1);
  const int64_t* ep = e.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < m; ++j)
      if (ep[r * m + j] >= 0) out[r].push_back(ep[r * m + j]);
    std::sort(out[r].begin(), out[r].end());
  }
  return out;
}

bool is_excluded(const std::vector<int64_t>& sorted_ids, int64_t item) {
  return !sorted_ids.empty() && std::binary_search(sorted_ids.begin(), sorted_ids.end(), item);
}

// Offer row r's scores[0:w] (items first_item + j) to its heap.
template <typename T>
void offer_row(TopK<T>& top, const T* scores, int64_t w, int64_t first_item, const std::vector<int64_t>& excl) {
  for (int64_t j = 0; j < w; ++j) {
    const T s = scores[j];
    if (top.full_and_beats(s) || s == -std::numeric_limits<T>::infinity()) continue;
    if (is_excluded(excl, first_item + j)) continue;
    top.offer(s, first_item + j);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_impl(const Params& p, int64_t k,
                                             const std::vector<std::vector<int64_t>>& excl) {
  const auto& h = p.hidden;
  const int64_t n = h.size(0);
  const auto head_lp = at::log_softmax(head_logits(p, h), 1).contiguous();  // [N, H]
  const int64_t width_h = head_lp.size(1);
  std::vector<TopK<T>> best(n, TopK<T>{k, {}});
  const T* hp = head_lp.template const_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) offer_row<T>(best[r], hp + r * width_h, p.c1, 0, excl[r]);
  });
  for (int64_t i = 0; i < p.n_tails(); ++i) {
    const auto z = at::mm(h, p.proj[i].t());  // [N, d_i]
    const int64_t items = p.weight[i].size(0), width = tile_width(n, items);
    std::vector<TopK<T>> tail(n, TopK<T>{k, {}});  // best raw tail logits of this tail
    at::Tensor lse;
    for (int64_t t0 = 0; t0 < items; t0 += width) {
      const int64_t w = std::min(width, items - t0);
      const auto tile = at::mm(z, p.weight[i].narrow(0, t0, w).t()).contiguous();  // [N, w]
      const auto part = at::logsumexp(tile, {1});
      lse = lse.defined() ? at::logaddexp(lse, part) : part;
      const T* tp = tile.template const_data_ptr<T>();
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) offer_row<T>(tail[r], tp + r * w, w, p.lo[i] + t0, excl[r]);
      });
    }
    const auto offset = head_lp.select(1, p.c1 + i).sub(lse).contiguous();  // [N]
    const T* op = offset.template const_data_ptr<T>();
    for (int64_t r = 0; r < n; ++r)
      for (const auto& [score, item] : tail[r].heap) best[r].offer(score + op[r], item);
  }
  auto values = at::full({n, k}, -std::numeric_limits<T>::infinity(), h.options());
  auto ids = at::zeros({n, k}, h.options().dtype(at::kLong));
  T* vp = values.template data_ptr<T>();
  int64_t* ip = ids.template data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    auto& heap = best[r].heap;
    std::sort_heap(heap.begin(), heap.end(), MinFirst<T>());  // best first
    for (size_t j = 0; j < heap.size(); ++j) {
      vp[r * k + j] = heap[j].first;
      ip[r * k + j] = heap[j].second;
    }
  }
  return {values, ids};
}

// A saved statistic: [N] in hidden's dtype, on the CPU.
at::Tensor checked_stats(const at::Tensor& stats, const at::Tensor& hidden, const char* name) {
  TORCH_CHECK(stats.device().is_cpu(), "adaptive softmax: ", name, " must be a CPU tensor, got ", stats.device());
  TORCH_CHECK_TYPE(stats.scalar_type() == hidden.scalar_type(), "adaptive softmax: ", name, " must have hidden's dtype ",
                   hidden.scalar_type(), ", got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 1 && stats.size(0) == hidden.size(0), "adaptive softmax: ", name, " must be [",
                    hidden.size(0), "], got ", stats.sizes());
  return stats.contiguous();
}

// In place on logits [n, W], row r's target in column cols[r] (-1: ignored, w_r = 0):
// each row becomes w_r * (softmax(row) - onehot(cols[r])), one exp per logit. lse [n]:
// the rows' log-sum-exps if known (the stats backward), else undefined and computed
// here. -> nll [n] = lse - row[cols[r]] (lse alone on ignored rows).
at::Tensor softmax_grad_(at::Tensor& logits, const int64_t* cols, const at::Tensor& w, const at::Tensor& lse) {
  const int64_t n = logits.size(0), width = logits.size(1);
  auto nll = at::empty({n}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "adaptive_loss_softmax_grad", [&] {
    using T = scalar_t;
    T* lp = logits.data_ptr<T>();
    T* np = nll.data_ptr<T>();
    const T* wp = w.const_data_ptr<T>();
    const T* sp = lse.defined() ? lse.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, n, row_grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = lp + r * width;
        const int64_t c = cols[r];
        const T target = c >= 0 ? row[c] : T(0);
        T row_lse;
        if (sp) {
          row_lse = sp[r];
          exp_row<T>(row, width, row_lse, wp[r]);
        } else {
          const T m = row_max(row, width);
          const T sum = exp_row<T>(row, width, m, T(1));
          const T scale = wp[r] / sum;
          for (int64_t j = 0; j < width; ++j) row[j] *= scale;
          row_lse = m + std::log(sum);
        }
        np[r] = row_lse - target;
        if (c >= 0) row[c] -= wp[r];
      }
    });
  });
  return nll;
}

// One tail's share of the loss pass, on its n_i rows: their nll [n_i] (undefined when the
// log-sum-exps were given), d/dz [n_i, d_i] and d/dF [V_i, d_i].
struct TailPass {
  at::Tensor nll, grad_z, grad_F;
};

// z [n_i, d_i]: the rows' codes; local: their targets within the tail; w_i [n_i]: their
// weights; lse_i [n_i]: their log-sum-exps if known, else computed here (a first pass
// over the item tiles). The logits are then formed again tile by tile (L2-resident;
// with d_i small these GEMMs cost little, while a whole [n_i, V_i] block would go through
// DRAM four times), turned into w * (softmax - onehot) in place and fed to the tile's two
// GEMMs (grad_z += G @ F_tile, grad_F_tile = G^T @ z) while still in cache.
TailPass tail_pass(const at::Tensor& z, const at::Tensor& F, const std::vector<int64_t>& local, const at::Tensor& w_i,
                   at::Tensor lse_i) {
  TailPass out;
  if (!lse_i.defined()) std::tie(lse_i, out.nll) = tail_lse_and_nll(z, F, local);
  lse_i = lse_i.contiguous();
  out.grad_z = at::zeros_like(z);
  out.grad_F = at::empty_like(F);  // every tile writes its rows below
  const int64_t items = F.size(0), width = tile_width(z.size(0), items);
  for (int64_t t0 = 0; t0 < items; t0 += width) {
    const int64_t tw = std::min(width, items - t0);
    const auto F_tile = F.narrow(0, t0, tw);                             // [w, d_i]
    auto G = panel_mm(z, F_tile.t());                                     // [n_i, w]
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "adaptive_loss_tail_grad", [&] {
      using T = scalar_t;
      T* gp = G.data_ptr<T>();
      const T *wp = w_i.const_data_ptr<T>(), *sp = lse_i.const_data_ptr<T>();
      at::parallel_for(0, G.size(0), row_grain(tw), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          exp_row<T>(gp + r * tw, tw, sp[r], wp[r]);  // w * softmax
          const int64_t c = local[r] - t0;
          if (c >= 0 && c < tw) gp[r * tw + c] -= wp[r];
        }
      });
    });
    panel_mm_out(out.grad_z, G, F_tile, /*accumulate=*/true);
    auto grad_F_tile = out.grad_F.narrow(0, t0, tw);
    panel_mm_out(grad_F_tile, G.t(), z, /*accumulate=*/false);
  }
  return out;
}

struct LossPass {
  AdaptiveGrads grads;
  at::Tensor nll;  // [N]: each row's negative log-likelihood (not yet weighted)
};

// The gradients for per-row weights w [N] (d loss / d nll), and each row's nll. head_lse,
// tail_lse [N]: the forward's statistics (the stats backward), or undefined to compute
// them here (the loss with its gradients: every logit is then formed once).
LossPass loss_pass(const Params& p, const Groups& g, const at::Tensor& w, const at::Tensor& head_lse,
                   const at::Tensor& tail_lse_rows) {
  const auto& h = p.hidden;
  auto G = head_logits(p, h);  // [N, H], becomes w * (softmax - onehot)
  auto nll = softmax_grad_(G, g.head_col.data(), w, head_lse);
  auto grad_h = panel_mm(G, p.head_weight);  // [N, d]
  auto grad_hw = panel_mm(G.t(), h);         // [H, d]
  auto grad_hb = p.head_bias.defined() ? G.sum(0) : absent(h);
  TensorVec grad_proj, grad_weight;
  for (int64_t i = 0; i < p.n_tails(); ++i) {
    if (g.rows[i].empty()) {  // an empty cluster: no rows, no gradient
      grad_proj.push_back(at::zeros_like(p.proj[i]));
      grad_weight.push_back(at::zeros_like(p.weight[i]));
      continue;
    }
    const auto rows = long_tensor(g.rows[i]);
    const auto h_i = h.index_select(0, rows);  // [n_i, d]
    const auto lse_i = tail_lse_rows.defined() ? tail_lse_rows.index_select(0, rows) : tail_lse_rows;
    auto t = tail_pass(panel_mm(h_i, p.proj[i].t()), p.weight[i], g.local[i], w.index_select(0, rows), lse_i);
    if (t.nll.defined()) nll.index_add_(0, rows, t.nll);
    grad_proj.push_back(panel_mm(t.grad_z.t(), h_i));            // [d_i, d]
    grad_h.index_add_(0, rows, panel_mm(t.grad_z, p.proj[i]));   // [n_i, d]
    grad_weight.push_back(t.grad_F);
  }
  return {{grad_h, grad_hw, grad_hb, grad_proj, grad_weight}, nll};
}

// The loss backward; head_lse / tail_lse [N]: the forward's statistics.
AdaptiveGrads loss_backward(const at::Tensor& grad_loss, const Params& p, const Groups& g, const std::string& reduction,
                            const at::Tensor& head_lse, const at::Tensor& tail_lse_rows) {
  const auto w = row_weights(grad_loss, g, reduction, p.hidden.options());  // [N]
  return loss_pass(p, g, w, head_lse, tail_lse_rows).grads;
}

// The scalar loss and, in the same pass, its gradients for grad_loss = 1, as
// Liger-Kernel's fused linear cross-entropy does: every logit is formed once (the
// backward would recompute the head logits, a third of the head's GEMM work) and the
// autograd backward only scales what this returns by the incoming scalar.
std::tuple<at::Tensor, AdaptiveGrads> loss_with_grads(const Params& p, const Groups& g, const std::string& reduction) {
  const auto w = row_weights(at::ones({}, p.hidden.options()), g, reduction, p.hidden.options());  // [N]
  auto pass = loss_pass(p, g, w, at::Tensor(), at::Tensor());
  return {pass.nll.mul_(w).sum(), std::move(pass.grads)};  // w: 1 or 1/kept on kept rows, 0 on ignored ones
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_softmax_loss_stats_forward(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& head_weight,
    const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections, at::TensorList tail_weights,
    at::IntArrayRef cutoffs, int64_t ignore_index, const std::string& reduction) {
  check_reduction(reduction);
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  const Groups g = group_rows(p, target, ignore_index);
  const auto& h = p.hidden;
  // Head: nll = lse(head) - head[col] on the rows kept.
  const auto logits = head_logits(p, h);  // [N, H]
  const auto col = long_tensor(g.head_col).clamp_min_(0);
  const auto head_lse = at::logsumexp(logits, {1});                                    // [N]
  auto nll = head_lse.sub(logits.gather(1, col.unsqueeze(1)).squeeze(1));               // [N]
  auto tail_lse_rows = at::zeros_like(head_lse);  // 0 on rows whose target is in the head or ignored
  // Tail i on its rows: nll += lse(tail_i) - tail_i[target].
  for (int64_t i = 0; i < p.n_tails(); ++i) {
    if (g.rows[i].empty()) continue;
    const auto rows = long_tensor(g.rows[i]);
    const auto z = panel_mm(h.index_select(0, rows), p.proj[i].t());                            // [n_i, d_i]
    const auto [lse, tail_nll] = tail_lse_and_nll(z, p.weight[i], g.local[i]);                  // [n_i] each
    tail_lse_rows.index_copy_(0, rows, lse);
    nll.index_add_(0, rows, tail_nll);
  }
  nll.mul_(long_tensor(g.head_col).ge(0).to(nll.scalar_type()));  // ignored rows give 0
  if (reduction != "none") {
    auto total = nll.sum();
    nll = reduction == "mean" ? total.div_(static_cast<double>(std::max<int64_t>(g.kept, 1))) : total;
  }
  return {nll, head_lse, tail_lse_rows};
}

AdaptiveGrads adaptive_softmax_loss_stats_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                   const at::Tensor& target, const at::Tensor& head_weight,
                                                   const std::optional<at::Tensor>& head_bias,
                                                   at::TensorList tail_projections, at::TensorList tail_weights,
                                                   at::IntArrayRef cutoffs, int64_t ignore_index,
                                                   const std::string& reduction, const at::Tensor& head_lse,
                                                   const at::Tensor& tail_lse) {
  check_reduction(reduction);
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  return loss_backward(grad_loss, p, group_rows(p, target, ignore_index), reduction,
                       checked_stats(head_lse, p.hidden, "head_lse"), checked_stats(tail_lse, p.hidden, "tail_lse"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, TensorVec, TensorVec> adaptive_softmax_loss_with_grads(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& head_weight,
    const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections, at::TensorList tail_weights,
    at::IntArrayRef cutoffs, int64_t ignore_index, const std::string& reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "adaptive_softmax_loss_with_grads: reduction must be mean or sum (a scalar loss), got ", reduction);
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  auto [loss, grads] = loss_with_grads(p, group_rows(p, target, ignore_index), reduction);
  auto& [gh, ghw, ghb, gtp, gtw] = grads;
  return {loss, gh, ghw, ghb, gtp, gtw};
}

at::Tensor adaptive_log_prob_forward(const at::Tensor& hidden, const at::Tensor& head_weight,
                                     const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections,
                                     at::TensorList tail_weights, at::IntArrayRef cutoffs) {
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  const auto& h = p.hidden;
  const int64_t vocab = cutoffs.back();
  auto out = at::empty({h.size(0), vocab}, h.options());  // [N, V]: what this op returns
  const auto head_lp = at::log_softmax(head_logits(p, h), 1);
  out.narrow(1, 0, p.c1).copy_(head_lp.narrow(1, 0, p.c1));
  for (int64_t i = 0; i < p.n_tails(); ++i) {
    // The tail's logits are written straight into their columns of the output,
    // then shifted in place by the row constant log p(cluster) - lse.
    auto part = out.narrow(1, p.lo[i], p.hi[i] - p.lo[i]);
    at::mm_out(part, at::mm(h, p.proj[i].t()), p.weight[i].t());
    const auto shift = head_lp.select(1, p.c1 + i).sub(at::logsumexp(part, {1}));
    part.add_(shift.unsqueeze(1));
  }
  return out;
}

AdaptiveGrads adaptive_log_prob_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                         const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                                         at::TensorList tail_projections, at::TensorList tail_weights,
                                         at::IntArrayRef cutoffs) {
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  const auto& h = p.hidden;
  const auto g = grad.to(h.scalar_type());  // [N, V]
  const auto head = head_logits(p, h);
  auto g_head_lp = at::zeros_like(head);  // d loss / d log_softmax(head), [N, H]
  g_head_lp.narrow(1, 0, p.c1).copy_(g.narrow(1, 0, p.c1));
  auto grad_h = at::zeros_like(h);
  TensorVec grad_proj, grad_weight;
  for (int64_t i = 0; i < p.n_tails(); ++i) {
    const auto g_tail = g.narrow(1, p.lo[i], p.hi[i] - p.lo[i]);  // [N, V_i]
    const auto g_sum = g_tail.sum(1, true);                        // [N, 1]
    g_head_lp.select(1, p.c1 + i).copy_(g_sum.squeeze(1));
    const auto z = at::mm(h, p.proj[i].t());                       // [N, d_i]
    // d/d logits of log_softmax: g - softmax * sum(g).
    const auto g_logits = at::softmax(at::mm(z, p.weight[i].t()), 1).mul_(g_sum).neg_().add_(g_tail);
    const auto g_z = at::mm(g_logits, p.weight[i]);
    grad_weight.push_back(at::mm(g_logits.t(), z));
    grad_proj.push_back(at::mm(g_z.t(), h));
    grad_h.addmm_(g_z, p.proj[i]);
  }
  const auto g_head = at::softmax(head, 1).mul_(g_head_lp.sum(1, true)).neg_().add_(g_head_lp);
  grad_h.addmm_(g_head, p.head_weight);
  auto grad_hb = p.head_bias.defined() ? g_head.sum(0) : absent(h);
  return {grad_h, at::mm(g_head.t(), h), grad_hb, grad_proj, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> adaptive_topk_forward(const at::Tensor& hidden, const at::Tensor& head_weight,
                                                         const std::optional<at::Tensor>& head_bias,
                                                         at::TensorList tail_projections,
                                                         at::TensorList tail_weights, at::IntArrayRef cutoffs,
                                                         int64_t k, const std::optional<at::Tensor>& exclude) {
  const Params p = make_params(hidden, head_weight, head_bias, tail_projections, tail_weights, cutoffs);
  TORCH_CHECK(k >= 1 && k <= cutoffs.back(), "adaptive_topk: k must be in [1, V], got ", k);
  const auto excl = excluded_ids(exclude, p.hidden.size(0));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(p.hidden.scalar_type(), "adaptive_topk", [&] { out = topk_impl<scalar_t>(p, k, excl); });
  return out;
}

}  // namespace cprec::cpu
