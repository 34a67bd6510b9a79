// The engine's float32 GEMMs over ATen's brgemm tiles, where MKL runs below the CPU's widest
// vectors: MKL takes an AVX2 path on AMD processors, also on those with AVX-512 (Zen 4), while
// oneDNN's JIT brgemm uses AVX-512 there. Measured on a 2-core Zen 4 (AVX-512), GF/s: MKL sgemm
// 175-181 against oneDNN's own 1x1 convolution 182-215 on the same products, and the strategies
// built on MKL ran at 0.55-0.85x oneDNN's transposed convolution where the brgemm ones ran at
// 0.83-1.0x (perf/results, twelfth session).
//
// C[M, N] (+)= op(A)[M, K] x op(B)[K, N], row-major. C is cut into tiles of kTileM x kTileN,
// each one brgemm reduction over K in blocks of kBlockK; a transposed operand is first copied
// whole into the layout brgemm reads (rows of K for A, rows of N for B). Outside a parallel
// region the tiles are spread over the threads; inside one (a strategy's work item) the call
// runs on its own thread. Every element of C is one tile's sum in a fixed order: deterministic,
// independent of the thread count. ATen compiles and keeps one brgemm kernel per (M, N, K, lda,
// ldb, ldc) and thread: the fixed tile and block sizes leave the tails and the leading
// dimensions to make new ones. Not done: splitting K where C has fewer tiles than threads (a
// 64 x 64 product of a long reduction runs on one thread).
#include <ATen/Parallel.h>

#include <cpuid.h>

#include "blas.h"
#include "layout.h"

namespace kst {

namespace {

constexpr i64 kTileM = 64;
constexpr i64 kTileN = 64;
constexpr i64 kBlockK = 512;

bool amd_with_avx512() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  // vendor string "AuthenticAMD" in ebx, edx, ecx
  const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
  return amd && __builtin_cpu_supports("avx512f");
}

}  // namespace

bool brgemm_gemm_default() {
  static const bool v = amd_with_avx512();
  return v;
}

void gemm_brgemm(bool ta, bool tb, i64 M, i64 N, i64 K, const float* A, i64 lda, const float* B,
                 i64 ldb, bool accumulate, float* C, i64 ldc) {
  if (M <= 0 || N <= 0) return;
  const brgemm_t brg = blas().brgemm;
  TORCH_CHECK(brg != nullptr, "kstconv: gemm_brgemm needs ATen's brgemm");
  const bool outer = !at::in_parallel_region();
  auto spread = [&](i64 n, auto&& fn) {
    if (outer && n > 1) at::parallel_for(0, n, 1, fn);
    else fn(0, n);
  };
  // A transposed operand is copied once into the layout brgemm reads: src [rows, cols] (leading
  // dimension ld) into [cols, rows], 8 x 8 transposes in blocks of kTileM columns
  // (row_to_channels_last: element (c, w) at src[c * cst + w] to dst[w * C + c]).
  std::unique_ptr<float[]> at_, bt_;
  auto transposed = [&](const float* src, i64 ld, i64 rows, i64 cols) {
    std::unique_ptr<float[]> dst(new float[rows * cols]);
    spread(ceil_div(cols, kTileM), [&](i64 b0, i64 b1) {
      for (i64 b = b0; b < b1; ++b) {
        const i64 c0 = b * kTileM;
        row_to_channels_last(src + c0, ld, 1, rows, std::min(kTileM, cols - c0),
                             dst.get() + c0 * rows);
      }
    });
    return dst;
  };
  if (ta && K > 0) {  // A stored [K, M] -> [M, K]
    at_ = transposed(A, lda, K, M);
    A = at_.get(), lda = K;
  }
  if (tb && K > 0) {  // B stored [N, K] -> [K, N]
    bt_ = transposed(B, ldb, N, K);
    B = bt_.get(), ldb = N;
  }
  const i64 mt = ceil_div(M, kTileM), nt = ceil_div(N, kTileN);
  spread(mt * nt, [&](i64 t0, i64 t1) {
    for (i64 t = t0; t < t1; ++t) {
      // n-tiles outer: consecutive tiles of a thread share B's column panel
      const i64 n0 = (t / mt) * kTileN, m0 = (t % mt) * kTileM;
      const i64 mb = std::min(kTileM, M - m0), nb = std::min(kTileN, N - n0);
      float* c = C + m0 * ldc + n0;
      if (K == 0 && !accumulate)
        for (i64 i = 0; i < mb; ++i) std::fill(c + i * ldc, c + i * ldc + nb, 0.f);
      for (i64 k0 = 0; k0 < K; k0 += kBlockK)
        brg(mb, nb, std::min(kBlockK, K - k0), lda, ldb, ldc, accumulate || k0 > 0,
            A + m0 * lda + k0, B + k0 * ldb + n0, c, false);
    }
  });
}

}  // namespace kst
