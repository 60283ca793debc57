// Launchers of the CUDA block-wise embedding kernels (csrc/cuda/embedding.cu).
//
// This header is shared by the kernels (compiled by nvcc with the CUDA toolkit's
// headers only) and by the ATen glue (embedding_glue.cpp, compiled against torch), so it
// includes nothing from torch: tensors cross as raw pointers plus the sizes below, and
// every launcher runs on the caller's stream and returns the first CUDA error.
//
//   out[n] = E_j[id_n - c_j] @ P_j^T     for the block j with c_j <= id_n < c_{j+1}
//
// ids: N ids (int32/int64, one stride), E_j: [c_{j+1}-c_j, d_j] row-major, P_j: [d, d_j]
// row-major or null (identity, d_j = d); all tables and projections share one dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cprec::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class IdType : int { kInt32 = 0, kInt64 = 1 };

// Blocks per call: the descriptors travel by value in the kernel parameters (32 x 48 B).
constexpr int kMaxBlocks = 32;
// The backward keeps one fp32 row of width d per warp in shared memory (4 warps/CTA).
constexpr int64_t kMaxBackwardDim = 4096;

struct EmbeddingBlock {
  const void* table = nullptr;  // E_j [hi - lo, width]
  const void* proj = nullptr;   // P_j [d, width], or null for the identity
  int64_t lo = 0;               // c_j
  int64_t hi = 0;               // c_{j+1}
  int64_t width = 0;            // d_j
};

struct EmbeddingProblem {
  const void* ids = nullptr;  // element n at ids[n * id_stride]
  IdType id_type = IdType::kInt64;
  int64_t id_stride = 1;
  int64_t n = 0;      // tokens
  int64_t d = 0;      // output width
  int64_t vocab = 0;  // V = c_n
  bool has_padding = false;
  int64_t padding_idx = 0;
  DType dtype = DType::kFloat32;
  int n_blocks = 0;
  EmbeddingBlock blocks[kMaxBlocks];
};

// out: [n, d] contiguous, every row written (zeros for padding / out-of-range ids).
cudaError_t blockwise_embedding_forward(const EmbeddingProblem& problem, void* out, cudaStream_t stream);

// Bytes of scratch the backward needs (sort buffers, chunk partials, split-K partials
// of the projection grads, CUB temp storage). Host-only: launches nothing.
size_t blockwise_embedding_backward_workspace(const EmbeddingProblem& problem);

// grad_out: [n, d] contiguous in the tables' dtype.
// grad_tables[j]: [hi - lo, d_j] contiguous and ZERO-FILLED by the caller (rows no id
//   hits stay zero; the kernels write only the rows that are looked up).
// grad_projs[j]: [d, d_j] contiguous (fully written), or null where P_j is null.
// workspace: at least blockwise_embedding_backward_workspace(problem) bytes, 256-aligned.
cudaError_t blockwise_embedding_backward(const EmbeddingProblem& problem, const void* grad_out,
                                         void* const* grad_tables, void* const* grad_projs, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream);

}  // namespace cprec::cuda
