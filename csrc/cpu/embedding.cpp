// Block-wise factorized embedding on the CPU.
//
//   out[n] = E_j[id_n - c_j] @ P_j^T     for the block j with c_j <= id_n < c_{j+1}
//
// ids: N ids (any shape, int32/int64), E_j: [c_{j+1}-c_j, d_j], P_j: [d, d_j] or empty
// (identity, d_j = d), padding ids give zero rows -> out: [N, d].
//
// Design: item popularity is Zipf-like, so N tokens hit only U << N distinct rows
// (N = 16k tokens over V = 100k items touch ~5k rows, most of them in the head).
// One O(N) pass over the ids groups the tokens by distinct row (a first-seen map of
// size V, no sort), every projection then runs ONCE per distinct row as a GEMM
// [U_j, d_j] x [d_j, d], and a single parallel pass copies each token's projected
// row into the output. Memory traffic: ids (N), the touched table rows (U_j * d_j),
// the projected rows (U * d), the output once (N * d) -- instead of the eager
// loop's mask + nonzero + gather + matmul + scatter per block.
//
// Backward is the same plan read the other way: the grad rows of each distinct
// row are summed in token order (a fixed order, so the result is deterministic and
// independent of the thread count), then
//   grad_P_j = S_j^T @ E_j[rows_j]  [d, d_j],   grad_E_j[rows_j] = S_j @ P_j  [U_j, d_j]
// where S_j: [U_j, d] are those sums (sum_n g_n @ P = (sum_n g_n) @ P). Each dense
// table grad is written in one parallel pass over its rows (zeros for untouched rows,
// fused with the scatter); an identity block's sums go straight into its table's grad.
#include "cpu/common.h"
#include "cpu/ops.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>

namespace cprec::cpu {
namespace {

// Tokens grouped by (block, distinct row).
struct Plan {
  int64_t n_tokens = 0;
  std::vector<int64_t> block;             // [N] block of each token, -1 for padding
  std::vector<int64_t> unique;            // [N] global index of the token's distinct row
  std::vector<std::vector<int64_t>> rows; // per block: its distinct local rows, first-seen order
  std::vector<int64_t> base;              // per block: global index of its first distinct row
  std::vector<int32_t> seen;              // [V] slot of item v among its block's distinct rows, -1 if absent
  int64_t n_unique = 0;
};

Plan make_plan(const at::Tensor& ids, at::IntArrayRef cutoffs, std::optional<int64_t> padding_idx) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "blockwise_embedding: ids must be int32 or int64, got ", ids.scalar_type());
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* id = flat.data_ptr<int64_t>();
  const int64_t n_blocks = static_cast<int64_t>(cutoffs.size());
  const int64_t vocab = cutoffs.back();
  Plan plan;
  plan.n_tokens = flat.numel();
  plan.block.resize(plan.n_tokens);
  plan.unique.resize(plan.n_tokens);
  plan.rows.resize(n_blocks);
  // seen[v]: index of item v among its block's distinct rows, -1 if not seen yet.
  plan.seen.assign(vocab, -1);
  auto& seen = plan.seen;
  for (int64_t n = 0; n < plan.n_tokens; ++n) {
    const int64_t v = id[n];
    if (padding_idx.has_value() && v == *padding_idx) {
      plan.block[n] = -1;
      continue;
    }
    TORCH_CHECK(v >= 0 && v < vocab, "blockwise_embedding: id ", v, " is outside [0, ", vocab, ")");
    int64_t j = 0;
    while (v >= cutoffs[j]) ++j;  // a handful of blocks: a scan beats a binary search
    if (seen[v] < 0) {
      seen[v] = static_cast<int32_t>(plan.rows[j].size());
      plan.rows[j].push_back(v - (j == 0 ? 0 : cutoffs[j - 1]));
    }
    plan.block[n] = j;
    plan.unique[n] = seen[v];  // block-local for now, made global below
  }
  plan.base.resize(n_blocks);
  for (int64_t j = 0; j < n_blocks; ++j) {
    plan.base[j] = plan.n_unique;
    plan.n_unique += static_cast<int64_t>(plan.rows[j].size());
  }
  for (int64_t n = 0; n < plan.n_tokens; ++n)
    if (plan.block[n] >= 0) plan.unique[n] += plan.base[plan.block[n]];
  return plan;
}

at::Tensor rows_tensor(const std::vector<int64_t>& rows) {
  return at::from_blob(const_cast<int64_t*>(rows.data()), {static_cast<int64_t>(rows.size())}, at::kLong).clone();
}

bool has_projection(at::TensorList projections, size_t j) { return projections[j].numel() > 0; }

int64_t output_dim(at::TensorList weights, at::TensorList projections) {
  return has_projection(projections, 0) ? projections[0].size(0) : weights[0].size(1);
}

void check_args(at::TensorList weights, at::TensorList projections, at::IntArrayRef cutoffs) {
  TORCH_CHECK(!cutoffs.empty() && weights.size() == cutoffs.size() && projections.size() == cutoffs.size(),
              "blockwise_embedding: need one table and one projection (empty = identity) per cutoff");
  for (size_t j = 0; j < weights.size(); ++j) {
    check_float(weights[j], "weights[j]");
    TORCH_CHECK(weights[j].scalar_type() == weights[0].scalar_type(), "blockwise_embedding: mixed table dtypes");
    if (has_projection(projections, j))
      TORCH_CHECK(projections[j].scalar_type() == weights[0].scalar_type(),
                  "blockwise_embedding: projections must have the tables' dtype");
  }
}

// Copy each token's source row to out; padding tokens get zeros.
// src[j]: base of block j's rows; indirect[j]: rows of block j are table rows
// (identity: the row index is rows[j][slot]) rather than projected rows (slot).
template <typename T>
void scatter_rows(const Plan& plan, const std::vector<const T*>& src, const std::vector<bool>& indirect, int64_t d,
                  T* out) {
  at::parallel_for(0, plan.n_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t j = plan.block[n];
      if (j < 0) {
        zero_row(out + n * d, d);
        continue;
      }
      const int64_t slot = plan.unique[n] - plan.base[j];
      const int64_t row = indirect[j] ? plan.rows[j][slot] : slot;
      copy_row(out + n * d, src[j] + row * d, d);
    }
  });
}

// The tokens of each distinct row u, in token order: tokens[offsets[u] .. offsets[u+1]).
struct Groups {
  std::vector<int64_t> offsets, tokens;
};

Groups group_tokens(const Plan& plan) {
  Groups g;  // a counting sort of the tokens by distinct row; token order kept
  g.offsets.assign(plan.n_unique + 1, 0);
  for (int64_t n = 0; n < plan.n_tokens; ++n)
    if (plan.block[n] >= 0) ++g.offsets[plan.unique[n] + 1];
  for (int64_t u = 0; u < plan.n_unique; ++u) g.offsets[u + 1] += g.offsets[u];
  g.tokens.resize(g.offsets.back());
  std::vector<int64_t> fill(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t n = 0; n < plan.n_tokens; ++n)
    if (plan.block[n] >= 0) g.tokens[fill[plan.unique[n]]++] = n;
  return g;
}

// dst = sum of the grad rows of the tokens of distinct row u, in token order (so the
// result does not depend on the thread count).
template <typename T>
void sum_group(const Groups& g, int64_t u, const T* grad, int64_t d, T* dst) {
  copy_row(dst, grad + g.tokens[g.offsets[u]] * d, d);
  for (int64_t i = g.offsets[u] + 1; i < g.offsets[u + 1]; ++i) add_row(dst, grad + g.tokens[i] * d, d);
}

// S[u] for the distinct rows [u_begin, u_end) (rows of projected blocks).
template <typename T>
void segment_sums(const Groups& g, int64_t u_begin, int64_t u_end, const T* grad, int64_t d, T* sums) {
  at::parallel_for(u_begin, u_end, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) sum_group(g, u, grad, d, sums + u * d);
  });
}

// The dense grad of block j's table [rows, width] in ONE write pass (the zero fill
// fused with the scatter): row r gets src(slot) for its distinct slot, zeros if the
// block's tokens never touched it.
template <typename T, typename Write>
void fill_table(const Plan& plan, int64_t j, int64_t lo, int64_t rows, int64_t width, T* table, const Write& write) {
  const int32_t* seen = plan.seen.data() + lo;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (seen[r] < 0)
        zero_row(table + r * width, width);
      else
        write(seen[r], table + r * width);
    }
  });
}

}  // namespace

at::Tensor blockwise_embedding_forward(const at::Tensor& ids, at::TensorList weights, at::TensorList projections,
                                       at::IntArrayRef cutoffs, std::optional<int64_t> padding_idx) {
  check_args(weights, projections, cutoffs);
  const Plan plan = make_plan(ids, cutoffs, padding_idx);
  const int64_t d = output_dim(weights, projections);
  const auto n_blocks = weights.size();
  std::vector<at::Tensor> keep(n_blocks);  // owns the projected rows while they are copied
  std::vector<bool> indirect(n_blocks);
  for (size_t j = 0; j < n_blocks; ++j) {
    indirect[j] = !has_projection(projections, j);
    if (indirect[j]) {
      keep[j] = weights[j].contiguous();
    } else if (plan.rows[j].empty()) {
      keep[j] = at::empty({0, d}, weights[j].options());
    } else {
      // [U_j, d_j] x [d_j, d]: each distinct row is projected once.
      keep[j] = at::mm(weights[j].index_select(0, rows_tensor(plan.rows[j])), projections[j].t()).contiguous();
    }
  }
  auto out = at::empty({plan.n_tokens, d}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "blockwise_embedding_forward", [&] {
    std::vector<const scalar_t*> src(n_blocks);
    for (size_t j = 0; j < n_blocks; ++j) src[j] = keep[j].const_data_ptr<scalar_t>();
    scatter_rows<scalar_t>(plan, src, indirect, d, out.data_ptr<scalar_t>());
  });
  auto shape = ids.sizes().vec();
  shape.push_back(d);
  return out.view(shape);
}

std::tuple<TensorVec, TensorVec> blockwise_embedding_backward(const at::Tensor& grad_out, const at::Tensor& ids,
                                                              at::TensorList weights, at::TensorList projections,
                                                              at::IntArrayRef cutoffs,
                                                              std::optional<int64_t> padding_idx) {
  check_args(weights, projections, cutoffs);
  const Plan plan = make_plan(ids, cutoffs, padding_idx);
  const int64_t d = output_dim(weights, projections);
  const auto grad = grad_out.reshape({plan.n_tokens, d}).to(weights[0].scalar_type()).contiguous();
  const Groups groups = group_tokens(plan);
  // Identity blocks sum straight into their table's grad; projected blocks need their
  // sums S_j for two GEMMs (rows of identity blocks in `sums` are never touched).
  auto sums = at::empty({plan.n_unique, d}, grad.options());  // [U, d]
  TensorVec grad_weights, grad_projections;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "blockwise_embedding_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    int64_t lo = 0;
    for (size_t j = 0; j < weights.size(); ++j) {
      const int64_t n_rows = weights[j].size(0), width = weights[j].size(1);
      const int64_t u0 = plan.base[j], uj = static_cast<int64_t>(plan.rows[j].size());
      auto grad_table = at::empty({n_rows, width}, grad.options());
      scalar_t* gt = grad_table.data_ptr<scalar_t>();
      if (has_projection(projections, j)) {
        at::Tensor h;  // [U_j, d_j] = S_j @ P_j: the grad of each distinct table row
        if (uj > 0) {
          segment_sums<scalar_t>(groups, u0, u0 + uj, g, d, sums.data_ptr<scalar_t>());
          const auto s = sums.narrow(0, u0, uj);  // [U_j, d]
          const auto rows = rows_tensor(plan.rows[j]);
          grad_projections.push_back(at::mm(s.t(), weights[j].index_select(0, rows)));  // [d, d_j]
          h = at::mm(s, projections[j]).contiguous();
        } else {
          grad_projections.push_back(at::zeros_like(projections[j], at::MemoryFormat::Contiguous));
        }
        const scalar_t* hp = uj > 0 ? h.const_data_ptr<scalar_t>() : nullptr;
        fill_table<scalar_t>(plan, j, lo, n_rows, width, gt,
                             [&](int64_t slot, scalar_t* dst) { copy_row(dst, hp + slot * width, width); });
      } else {
        grad_projections.push_back(absent(grad));
        fill_table<scalar_t>(plan, j, lo, n_rows, width, gt,
                             [&](int64_t slot, scalar_t* dst) { sum_group(groups, u0 + slot, g, d, dst); });
      }
      grad_weights.push_back(grad_table);
      lo += n_rows;
    }
  });
  return {grad_weights, grad_projections};
}

}  // namespace cprec::cpu
