// ATen glue of the CUDA block-wise embedding: argument checks, the current device and
// stream, output and workspace allocation, and the registration of the ops as
// torch.ops.cprec_cuda.* for the CUDA dispatch key (wrapped by cprec_kernels/cuda.py).
//
// Built only when torch is a CUDA build and nvcc is present (setup.py, or the JIT path of
// cprec_kernels/cuda.py); the kernels themselves are in embedding.cu behind the raw-pointer
// launchers of embedding.h. The schemas are those of the cpu backend (csrc/bindings.cpp):
// an identity projection, and the absent grad of one, cross as empty tensors.
//
//   forward:  ids [*] int32/int64, weights[j] [c_{j+1}-c_j, d_j], projections[j] [d, d_j]
//             or empty, cutoffs [c1, ..., V], padding_idx -> out [*ids.shape, d]
//   backward: grad_out [*ids.shape, d] -> (grad weights[j] [c_{j+1}-c_j, d_j],
//             grad projections[j] [d, d_j] or empty)
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/embedding.h"

namespace cprec::cuda {
namespace {

using TensorVec = std::vector<at::Tensor>;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "cprec cuda backend: tables must be float32, bfloat16 or float16, got ", t);
  return DType::kFloat32;  // unreachable
}

// The problem description plus the tensors whose pointers it holds (kept alive by the caller).
struct Prepared {
  EmbeddingProblem problem;
  at::Tensor flat_ids;
  TensorVec tables, projections;
  std::vector<int64_t> out_shape;
};

Prepared prepare(const at::Tensor& ids, at::TensorList weights, at::TensorList projections, at::IntArrayRef cutoffs,
                 std::optional<int64_t> padding_idx) {
  TORCH_CHECK(!cutoffs.empty() && weights.size() == cutoffs.size() && projections.size() == cutoffs.size(),
              "blockwise_embedding: need one table and one projection (empty = identity) per cutoff");
  TORCH_CHECK(static_cast<int64_t>(cutoffs.size()) <= kMaxBlocks, "blockwise_embedding: the cuda backend takes at most ",
              kMaxBlocks, " blocks, got ", cutoffs.size());
  TORCH_CHECK(ids.is_cuda(), "cprec cuda backend: ids must be a CUDA tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "blockwise_embedding: ids must be int32 or int64, got ", ids.scalar_type());
  Prepared out;
  EmbeddingProblem& pr = out.problem;
  // A flat view where the strides allow one (a 1-D slice keeps its stride), else a copy.
  out.flat_ids = ids.reshape({-1});
  pr.ids = out.flat_ids.const_data_ptr();
  pr.id_type = ids.scalar_type() == at::kLong ? IdType::kInt64 : IdType::kInt32;
  pr.id_stride = out.flat_ids.numel() > 1 ? out.flat_ids.stride(0) : 1;
  pr.n = out.flat_ids.numel();
  TORCH_CHECK(pr.n < (int64_t{1} << 31), "blockwise_embedding: the cuda backend takes fewer than 2^31 ids, got ", pr.n);
  const bool head_projected = projections[0].numel() > 0;
  TORCH_CHECK(weights[0].dim() == 2, "blockwise_embedding: weights[0] must be 2-D, got ", weights[0].sizes());
  pr.d = head_projected ? projections[0].size(0) : weights[0].size(1);
  pr.vocab = cutoffs.back();
  TORCH_CHECK(pr.vocab < (int64_t{1} << 32) - 1, "blockwise_embedding: the cuda backend takes V < 2^32 - 1, got ",
              pr.vocab);
  pr.has_padding = padding_idx.has_value();
  pr.padding_idx = padding_idx.value_or(0);
  pr.dtype = dtype_of(weights[0].scalar_type());
  pr.n_blocks = static_cast<int>(cutoffs.size());
  int64_t lo = 0;
  for (size_t j = 0; j < weights.size(); ++j) {
    const at::Tensor& w = weights[j];
    TORCH_CHECK(w.device() == ids.device(), "blockwise_embedding: weights[", j, "] is on ", w.device(), ", ids on ",
                ids.device());
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), "blockwise_embedding: mixed table dtypes");
    TORCH_CHECK(w.dim() == 2 && w.size(0) == cutoffs[j] - lo, "blockwise_embedding: weights[", j, "] must be [",
                cutoffs[j] - lo, ", d_j], got ", w.sizes());
    out.tables.push_back(w.contiguous());
    EmbeddingBlock& b = pr.blocks[j];
    b.table = out.tables.back().const_data_ptr();
    b.lo = lo;
    b.hi = cutoffs[j];
    b.width = w.size(1);
    const at::Tensor& p = projections[j];
    if (p.numel() > 0) {
      TORCH_CHECK(p.device() == ids.device() && p.scalar_type() == w.scalar_type(), "blockwise_embedding: projections[",
                  j, "] must be a ", w.scalar_type(), " tensor on ", ids.device());
      TORCH_CHECK(p.dim() == 2 && p.size(0) == pr.d && p.size(1) == b.width, "blockwise_embedding: projections[", j,
                  "] must be [", pr.d, ", ", b.width, "], got ", p.sizes());
      out.projections.push_back(p.contiguous());
      b.proj = out.projections.back().const_data_ptr();
    } else {
      TORCH_CHECK(b.width == pr.d, "blockwise_embedding: projections[", j, "] is the identity but weights[", j,
                  "] has width ", b.width, ", not d = ", pr.d);
      out.projections.push_back(p);
      b.proj = nullptr;
    }
    lo = cutoffs[j];
  }
  out.out_shape = ids.sizes().vec();
  out.out_shape.push_back(pr.d);
  return out;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cprec cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& ids, at::TensorList weights, at::TensorList projections, at::IntArrayRef cutoffs,
                   std::optional<int64_t> padding_idx) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const Prepared prep = prepare(ids, weights, projections, cutoffs, padding_idx);
  auto out = at::empty({prep.problem.n, prep.problem.d}, weights[0].options().memory_format(at::MemoryFormat::Contiguous));
  check(blockwise_embedding_forward(prep.problem, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
        "blockwise_embedding_forward");
  return out.view(prep.out_shape);
}

std::tuple<TensorVec, TensorVec> backward(const at::Tensor& grad_out, const at::Tensor& ids, at::TensorList weights,
                                          at::TensorList projections, at::IntArrayRef cutoffs,
                                          std::optional<int64_t> padding_idx) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const Prepared prep = prepare(ids, weights, projections, cutoffs, padding_idx);
  const EmbeddingProblem& pr = prep.problem;
  TORCH_CHECK(pr.d <= kMaxBackwardDim, "blockwise_embedding: the cuda backward takes d <= ", kMaxBackwardDim,
              ", got ", pr.d);
  TORCH_CHECK(grad_out.device() == ids.device() && grad_out.numel() == pr.n * pr.d,
              "blockwise_embedding: grad_out must hold [", pr.n, ", ", pr.d, "] on ", ids.device(), ", got ",
              grad_out.sizes());
  const auto grad = grad_out.reshape({pr.n, pr.d}).to(weights[0].scalar_type()).contiguous();
  TensorVec grad_weights, grad_projections;
  std::vector<void*> table_ptrs, proj_ptrs;
  for (size_t j = 0; j < weights.size(); ++j) {
    grad_weights.push_back(at::zeros(weights[j].sizes(), weights[j].options().memory_format(at::MemoryFormat::Contiguous)));
    table_ptrs.push_back(grad_weights.back().data_ptr());
    if (pr.blocks[j].proj != nullptr) {
      grad_projections.push_back(at::empty({pr.d, pr.blocks[j].width}, weights[j].options()));
      proj_ptrs.push_back(grad_projections.back().data_ptr());
    } else {
      grad_projections.push_back(at::empty({0}, weights[j].options()));
      proj_ptrs.push_back(nullptr);
    }
  }
  const size_t bytes = blockwise_embedding_backward_workspace(pr);
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, grad.options().dtype(at::kByte));
  check(blockwise_embedding_backward(pr, grad.const_data_ptr(), table_ptrs.data(), proj_ptrs.data(),
                                     bytes > 0 ? workspace.data_ptr() : nullptr, bytes,
                                     c10::cuda::getCurrentCUDAStream().stream()),
        "blockwise_embedding_backward");
  return {grad_weights, grad_projections};
}

}  // namespace
}  // namespace cprec::cuda

// Own namespace beside the cpu backend's cprec_cpu: this library can then be loaded (or
// not) independently of cprec_kernels._C, and the C++ CMake build stays CPU-only.
TORCH_LIBRARY(cprec_cuda, m) {
  m.def(
      "blockwise_embedding_forward(Tensor ids, Tensor[] weights, Tensor[] projections, int[] cutoffs, "
      "int? padding_idx) -> Tensor");
  m.def(
      "blockwise_embedding_backward(Tensor grad_out, Tensor ids, Tensor[] weights, Tensor[] projections, "
      "int[] cutoffs, int? padding_idx) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(cprec_cuda, CUDA, m) {
  m.impl("blockwise_embedding_forward", &cprec::cuda::forward);
  m.impl("blockwise_embedding_backward", &cprec::cuda::backward);
}

#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cprec-kernels cuda backend: registers torch.ops.cprec_cuda.*";
}
#endif
