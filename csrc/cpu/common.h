// Small helpers shared by the cpu kernels: argument checks and vectorised row loops.
#pragma once

// Per-operator headers instead of <ATen/ATen.h>: this keeps each translation unit's
// compile time down (CI builds on 2 cores); each kernel file includes the ops it calls.
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <optional>

namespace cprec::cpu {

// The kernels are templated over float and double; cpu.py upcasts half/bfloat16.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cprec cpu backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "cprec cpu backend: ", name, " must be float32 or float64, got ", t.scalar_type());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The absent-gradient placeholder of the Python glue (an empty tensor).
inline at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }

// dst[0:n] += src[0:n]
template <typename T>
inline void add_row(T* dst, const T* src, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, sizeof(T) * n);
}

template <typename T>
inline void zero_row(T* dst, int64_t n) {
  std::memset(dst, 0, sizeof(T) * n);
}

}  // namespace cprec::cpu
