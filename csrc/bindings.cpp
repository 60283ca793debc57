// The one bindings file of the C++ backend.
//
// TORCH_LIBRARY(cprec_cpu) registers the kernels as dispatcher operators, so the
// same ops are reachable from Python (torch.ops.cprec_cpu.<name>, wrapped by
// cprec_kernels/cpu.py) and from C++ (c10::Dispatcher, see csrc/cpp_test). The public
// autograd-aware ops live in the `cprec` namespace (registered from Python); these
// are their cpu-backend forward/backward halves, hence the separate namespace.
//
// The pybind11 module only exists so `import cprec_kernels._C` loads this library
// (and with it the registrations); it is compiled only by setup.py, which defines
// TORCH_EXTENSION_NAME, and left out of the CMake build for C++ users.
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(cprec_cpu, m) {
  using namespace cprec::cpu;
  m.def(
      "blockwise_embedding_forward(Tensor ids, Tensor[] weights, Tensor[] projections, int[] cutoffs, "
      "int? padding_idx) -> Tensor",
      &blockwise_embedding_forward);
  m.def(
      "blockwise_embedding_backward(Tensor grad_out, Tensor ids, Tensor[] weights, Tensor[] projections, "
      "int[] cutoffs, int? padding_idx) -> (Tensor[], Tensor[])",
      &blockwise_embedding_backward);

  // The adaptive softmax's parameters, in the order of every op below.
#define CPREC_ADAPTIVE_PARAMS \
  "Tensor head_weight, Tensor? head_bias, Tensor[] tail_projections, Tensor[] tail_weights, int[] cutoffs"
#define CPREC_ADAPTIVE_GRADS "(Tensor, Tensor, Tensor, Tensor[], Tensor[])"
  m.def("adaptive_softmax_loss_stats_forward(Tensor hidden, Tensor target, " CPREC_ADAPTIVE_PARAMS
        ", int ignore_index, str reduction) -> (Tensor, Tensor, Tensor)",
        &adaptive_softmax_loss_stats_forward);
  m.def("adaptive_softmax_loss_stats_backward(Tensor grad_loss, Tensor hidden, Tensor target, " CPREC_ADAPTIVE_PARAMS
        ", int ignore_index, str reduction, Tensor head_lse, Tensor tail_lse) -> " CPREC_ADAPTIVE_GRADS,
        &adaptive_softmax_loss_stats_backward);
  m.def("adaptive_softmax_loss_with_grads(Tensor hidden, Tensor target, " CPREC_ADAPTIVE_PARAMS
        ", int ignore_index, str reduction) -> (Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[])",
        &adaptive_softmax_loss_with_grads);
  m.def("adaptive_log_prob_forward(Tensor hidden, " CPREC_ADAPTIVE_PARAMS ") -> Tensor", &adaptive_log_prob_forward);
  m.def("adaptive_log_prob_backward(Tensor grad, Tensor hidden, " CPREC_ADAPTIVE_PARAMS ") -> " CPREC_ADAPTIVE_GRADS,
        &adaptive_log_prob_backward);
  m.def("adaptive_topk_forward(Tensor hidden, " CPREC_ADAPTIVE_PARAMS ", int k, Tensor? exclude) -> (Tensor, Tensor)",
        &adaptive_topk_forward);

  m.def("causal_conv1d_forward(Tensor x, Tensor weight, Tensor? bias, int dilation) -> Tensor", &causal_conv1d_forward);
  m.def("causal_conv1d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, int dilation) "
        "-> (Tensor, Tensor, Tensor)",
        &causal_conv1d_backward);
  m.def("causal_conv1d_ln_relu_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, "
        "Tensor? residual, int dilation, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
        &causal_conv1d_ln_relu_forward);
  m.def("causal_conv1d_ln_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? ln_weight, "
        "Tensor? ln_bias, Tensor mean, Tensor rstd, Tensor? z, int dilation, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &causal_conv1d_ln_relu_backward);
#undef CPREC_ADAPTIVE_PARAMS
#undef CPREC_ADAPTIVE_GRADS
}

#ifdef TORCH_EXTENSION_NAME
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include "cpu/panel_matmul.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cprec-kernels cpu backend: registers torch.ops.cprec_cpu.*";
  // Which threading backend at::parallel_for uses in this build (for bug reports).
  m.def("parallel_info", [] { return at::get_parallel_info(); });
  // The kernels' matrix product (cpu/panel_matmul.h), for its tests: a @ b, or acc + a @ b
  // (acc copied first; the sums are added to it as the kernels' accumulating calls do).
  m.def(
      "panel_mm",
      [](const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& acc) {
        if (!acc.has_value()) return cprec::cpu::panel_mm(a, b);
        auto c = acc->clone();
        cprec::cpu::panel_mm_out(c, a, b, /*accumulate=*/true);
        return c;
      },
      pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("acc") = pybind11::none());
}
#endif
