// Matrix products of the cpu kernels on tensors: panel::gemm (cpu/panel_gemm.h) for
// float32 on AVX2 + FMA machines, with B packed into panels once per call and the rows of
// C split across threads; BLAS (at::mm) for float64, fewer than 16 columns or fewer than
// 64 rows (where packing B costs more than the faster tile gains: one-user serving).
#pragma once

#include <ATen/core/Tensor.h>

namespace cprec::cpu {

// a [M, K] @ b [K, N] -> a fresh contiguous [M, N]; a and b in any strides.
at::Tensor panel_mm(const at::Tensor& a, const at::Tensor& b);

// c [M, N] = a @ b, or c += a @ b with accumulate; c's rows must be contiguous
// (stride(1) == 1), a and b in any strides.
void panel_mm_out(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace cprec::cpu
