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

#include <array>
#include <cstring>
#include <optional>
#include <type_traits>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace cprec::cpu {

// The kernels are templated over float and double; cpu.py upcasts half/bfloat16.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cprec cpu backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "cprec cpu backend: ", name, " must be float32 or float64, got ", t.scalar_type());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Scratch buffers that never leave an op: a tensor of the calling thread, kept across
// calls in its slot and grown when too small. A fresh multi-megabyte at::empty goes back
// to the OS when freed (glibc maps large blocks), so each call page-faulted its scratch
// in again on first touch: ~0.2 ms a call for the 1.5 MB of Winograd weights at d = 256,
// a tenth of the conv's forward at B = 16, T = 50. The returned view is valid until the
// same thread asks for the same slot again (kernels use each slot for one buffer).
enum class Scratch {
  kWinoWeights, kWinoPanels, kTransformIn, kTransformOut, kGradWParts, kGradWIn, kGradWOut, kGradZ, kMatmulPanels,
  kCount
};

inline at::Tensor thread_scratch(Scratch slot, at::IntArrayRef shape, const at::TensorOptions& opt) {
  thread_local std::array<at::Tensor, static_cast<size_t>(Scratch::kCount)> cache;
  int64_t numel = 1;
  for (const int64_t n : shape) numel *= n;
  auto& t = cache[static_cast<size_t>(slot)];
  if (!t.defined() || t.dtype() != opt.dtype() || t.numel() < numel) t = at::empty({numel}, opt);
  return t.narrow(0, 0, numel).view(shape);
}

// The absent-gradient placeholder of the Python glue (an empty tensor).
inline at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The extension is built for baseline x86-64, where at::vec::Vectorized is its generic
// code; the hottest float loops get an AVX2 + FMA version (target attributes) that
// every kernel file guards with this one macro and picks at run time with have_avx2().
#define CPREC_HAVE_AVX2 1

inline bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// The sum of the 8 lanes.
__attribute__((target("avx2"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) inline void add_row_avx2(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] += src[i];
}
#endif

// dst[0:n] += src[0:n]
template <typename T>
inline void add_row(T* dst, const T* src, int64_t n) {
#ifdef CPREC_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) return add_row_avx2(dst, src, n);
  }
#endif
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
