// A C++ user of the cpu backend: calls the registered operators through the
// dispatcher (torch.ops.cprec_cpu.* from C++) and checks them against plain ATen.
// Exit status 0 on success; run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

#include "cpu/ops.h"

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol = 1e-4) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, tol, tol);
  std::printf("%-40s %s\n", what, ok ? "ok" : "MISMATCH");
  if (!ok) ++failures;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void check_conv() {
  // y = conv1d(left-padded x^T) : the definition of the causal conv.
  const auto x = at::randn({2, 9, 5}), w = at::randn({6, 5, 3}), b = at::randn({6});
  const int64_t dil = 2;
  const std::vector<int64_t> stride{1}, padding{0}, dilation{dil};
  const auto padded = at::constant_pad_nd(x.transpose(1, 2), {2 * dil, 0});
  const auto want = at::conv1d(padded, w, b, stride, padding, dilation).transpose(1, 2);
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t);
  expect_close("causal_conv1d_forward (dispatcher)", op<Sig>("cprec_cpu::causal_conv1d_forward").call(x, w, b, dil), want);
  const auto [out, mean, rstd, z] = cprec::cpu::causal_conv1d_ln_relu_forward(x, w, b, std::nullopt, std::nullopt,
                                                                             std::nullopt, dil, 1e-8);
  expect_close("causal_conv1d_ln_relu_forward", out, at::relu(at::layer_norm(want, {6}, {}, {}, 1e-8)));
  expect_close("causal_conv1d_ln_relu_forward z", z, want);
  // The backward from the saved z and the one that recomputes it agree.
  const auto g = at::randn_like(out);
  const auto saved = cprec::cpu::causal_conv1d_ln_relu_backward(g, x, w, b, std::nullopt, std::nullopt, mean, rstd,
                                                                z, dil, 1e-8);
  const auto recomputed = cprec::cpu::causal_conv1d_ln_relu_backward(g, x, w, b, std::nullopt, std::nullopt, mean,
                                                                     rstd, std::nullopt, dil, 1e-8);
  expect_close("causal_conv1d_ln_relu_backward grad_x (saved z)", std::get<0>(saved), std::get<0>(recomputed));
  expect_close("causal_conv1d_ln_relu_backward grad_w (saved z)", std::get<1>(saved), std::get<1>(recomputed));
  expect_close("causal_conv1d_ln_relu_backward grad_b (saved z)", std::get<2>(saved), std::get<2>(recomputed));
}

void check_embedding() {
  // Two blocks: head [0, 4) identity of width 6, tail [4, 10) of width 2 projected to 6.
  const auto e0 = at::randn({4, 6}), e1 = at::randn({6, 2}), p1 = at::randn({6, 2});
  const auto ids = at::tensor({0, 5, 3, 9, 5}, at::kLong);
  const auto got = cprec::cpu::blockwise_embedding_forward(ids, {e0, e1}, {at::empty({0}), p1}, {4, 10}, std::nullopt);
  const auto tail = at::mm(e1, p1.t());
  const auto want = at::stack({e0[0], tail[1], e0[3], tail[5], tail[1]});
  expect_close("blockwise_embedding_forward", got, want);
}

void check_topk() {
  const auto h = at::randn({3, 8}), hw = at::randn({5, 8}), hb = at::randn({5});
  const auto q = at::randn({2, 8}), f = at::randn({30, 2});
  const std::vector<int64_t> cutoffs{4, 34};
  const auto lp = cprec::cpu::adaptive_log_prob_forward(h, hw, hb, {q}, {f}, cutoffs);
  expect_close("adaptive_log_prob sums to 1", lp.exp().sum(1), at::ones({3}));
  const auto [values, ids] = cprec::cpu::adaptive_topk_forward(h, hw, hb, {q}, {f}, cutoffs, 5, std::nullopt);
  const auto want = at::topk(lp, 5);
  expect_close("adaptive_topk_forward values", values, std::get<0>(want));
  expect_close("adaptive_topk_forward ids", ids.to(at::kDouble), std::get<1>(want).to(at::kDouble), 0);
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_conv();
  check_embedding();
  check_topk();
  std::printf("%s\n", failures == 0 ? "all ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
