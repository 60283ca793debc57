// The launcher of panel::gemm for tensors (see cpu/panel_matmul.h).
//
// Why not at::mm for the adaptive softmax's head products ([4096 x 256] @ [256 x 2003],
// [4096 x 2003] @ [2003 x 256] and [2003 x 4096] @ [4096 x 256] in the loss benchmark):
// they are three quarters of the loss's FLOPs, and on one core of the CI machine MKL ran
// them at 59, 89 and 90 GFLOP/s, panel::gemm at 93, 102 and 93 (the logits' 32 MB output
// costs MKL the most); the tails' products 60-95 against 89-109 (bench/RESULTS.md).
#include "cpu/panel_matmul.h"

#include "cpu/common.h"
#include "cpu/panel_gemm.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

namespace cprec::cpu {
namespace {

// Fewer rows of C than this go to BLAS: packing B costs more than panel::gemm's faster
// tile gains. Measured on one core (float32, d = 256): at 1 row the head's logits took
// 0.19 ms against 0.05 on MKL (H = 2,003) and 6.0 against 2.5 ms (H = 20,003, V = 1M),
// which is top-k serving for one user; at 32 rows 0.48 against 0.38 ms; from 64 to ~200
// rows the two are within 10% either way; at 4,096 rows panel_mm is 3-37% faster.
constexpr int64_t kMinRows = 64;

}  // namespace

void panel_mm_out(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
                  c.size(1) == b.size(1),
              "panel_mm: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", c.sizes(), " do not match");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
#ifdef CPREC_HAVE_AVX2
  if (a.is_cpu() && b.is_cpu() && c.is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      c.scalar_type() == at::kFloat && c.stride(1) == 1 && N >= kPanelColumns && M >= kMinRows && have_avx2()) {
    const int64_t panels = (N + kPanelColumns - 1) / kPanelColumns;
    // Packed panels [panels, K, 16]: read by every thread, so in the calling thread's
    // scratch and written before the products start.
    auto packed = thread_scratch(Scratch::kMatmulPanels, {std::max<int64_t>(1, panels * K * kPanelColumns)}, a.options());
    float* pp = packed.data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    at::parallel_for(0, panels, std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kPanelColumns, 1)),
                     [&](int64_t p0, int64_t p1) { panel::pack_panels(K, N, bp, b.stride(0), b.stride(1), pp, p0, p1); });
    // Row tiles shared evenly by the threads (a row's result does not depend on the cut).
    const int64_t tiles = (M + panel::kTileRows - 1) / panel::kTileRows;
    const int64_t per_thread = (tiles + at::get_num_threads() - 1) / at::get_num_threads();
    const float* ap = a.const_data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const int64_t a_row = a.stride(0), a_k = a.stride(1), ldc = c.stride(0);
    // Small products run on the calling thread: a fork costs more than they do.
    const int64_t grain = M * N * K < (int64_t{1} << 21) ? tiles : std::max<int64_t>(1, per_thread);
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      const int64_t r0 = t0 * panel::kTileRows, r1 = std::min(M, t1 * panel::kTileRows);
      panel::gemm(r1 - r0, N, K, ap + r0 * a_row, a_row, a_k, pp, kPanelColumns, K * kPanelColumns, cp + r0 * ldc,
                  ldc, accumulate);
    });
    return;
  }
#endif
  at::Tensor out = c;  // a handle on the same storage
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

at::Tensor panel_mm(const at::Tensor& a, const at::Tensor& b) {
  auto c = at::empty({a.size(0), b.size(1)}, a.options());
  panel_mm_out(c, a, b, /*accumulate=*/false);
  return c;
}

}  // namespace cprec::cpu
