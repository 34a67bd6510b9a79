// GEMMs with one short dimension, float32, AVX2 + FMA: the products of weight-heavy layers (a
// batch-1 decoder's deep levels: a few input pixels, a weight of tens of MiB), where MKL and
// brgemm, made for two long dimensions, ran 2-4x slower than the weight's own memory traffic.
//  - gemm_small_k: a short reduction (K <= kSmallK), C large: the weight gradient, whose time is
//    the write of dW. MKL packs for a long reduction there (1024 x 8192 from K = 16: 7.5 ms
//    against 3.3 here; K = 4: 6.4 against 1.7; 2 threads). B is packed once into panels of 16
//    columns.
//  - gemm_short_m: few rows (M <= kShortM), B large and read in place once: the forward's
//    GEMM first, C[pixels, (c_out, tap)] = X x W. brgemm tiles over W in place re-read rows 32
//    KiB apart (16 x 8192 from K = 1024, the GEMM alone: 9-13 ms; MKL, which packs W per call,
//    5.5 ms; pix2pix 1024-512's whole forward at 4x4 took 7.6 ms through brgemm, 5.2 through
//    this). Here each thread sweeps its columns of W in chunks of kShortMRows rows, so every
//    row of W is read once, in runs of consecutive lines; the thread's partial sums of C
//    (M x its columns: 256 KiB at 16 rows, 2 threads) are re-read from L2 for every chunk.
// Every element of C is one thread's sum in a fixed order: deterministic, and independent of
// the thread count.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include "blas.h"
#include "layout.h"

namespace kst {

namespace {

constexpr i64 kPanel = 16;        // columns of a tile: two AVX2 vectors
constexpr i64 kTileRows = 6;      // rows of a register tile (12 accumulators)
constexpr i64 kChunkPanels = 32;  // gemm_small_k: panels a work item sweeps (K x 512 floats)
constexpr i64 kBlockRows = 64;    // gemm_small_k: rows of C a work item writes
constexpr i64 kShortMRows = 16;   // gemm_short_m: rows of B per sweep (16 concurrent streams)
constexpr i64 kAheadStrips = 16;  // gemm_short_m: strips of B prefetched ahead (1 KiB a row)

// One row of a tile into C: 16 columns, or those of the masks m0, m1.
template <bool FULL>
__attribute__((target("avx2,fma"))) inline void put_row(float* cr, __m256 v0, __m256 v1,
                                                       __m256i m0, __m256i m1, bool accumulate) {
  if (FULL) {
    if (accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, v0);
    _mm256_storeu_ps(cr + 8, v1);
    return;
  }
  if (accumulate) {
    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(cr, m0));
    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(cr + 8, m1));
  }
  _mm256_maskstore_ps(cr, m0, v0);
  _mm256_maskstore_ps(cr + 8, m1, v1);
}

// One row of a tile, one step of k: (c0, c1) += a[0] x (b0, b1).
__attribute__((target("avx2,fma"))) inline void fma_row(const float* a, __m256 b0, __m256 b1,
                                                       __m256& c0, __m256& c1) {
  const __m256 av = _mm256_broadcast_ss(a);
  c0 = _mm256_fmadd_ps(av, b0, c0);
  c1 = _mm256_fmadd_ps(av, b1, c1);
}

// C[R rows, ncols <= 16] (+)= A[R, K] x B[K, ncols]: A element (r, k) at a[r * sam + k * sak],
// B row k at b + k * ldb (FULL: 16 columns, else ncols, masked loads). The accumulators are
// named registers, not an array: GCC kept an array of them on the stack, a store per FMA.
template <int R, bool FULL>
__attribute__((target("avx2,fma"))) void tile(i64 K, const float* a, i64 sam, i64 sak,
                                             const float* b, i64 ldb, i64 ncols, float* c,
                                             i64 ldc, bool accumulate) {
  __m256i m0 = _mm256_set1_epi32(-1), m1 = m0;
  if (!FULL) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(ncols)), idx);
    m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(ncols) - 8), idx);
  }
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z;
  __m256 c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  for (i64 k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    const float* ak = a + k * sak;
    const __m256 b0 = FULL ? _mm256_loadu_ps(bk) : _mm256_maskload_ps(bk, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(bk + 8) : _mm256_maskload_ps(bk + 8, m1);
    fma_row(ak, b0, b1, c00, c01);
    if constexpr (R > 1) fma_row(ak + sam, b0, b1, c10, c11);
    if constexpr (R > 2) fma_row(ak + 2 * sam, b0, b1, c20, c21);
    if constexpr (R > 3) fma_row(ak + 3 * sam, b0, b1, c30, c31);
    if constexpr (R > 4) fma_row(ak + 4 * sam, b0, b1, c40, c41);
    if constexpr (R > 5) fma_row(ak + 5 * sam, b0, b1, c50, c51);
  }
  put_row<FULL>(c, c00, c01, m0, m1, accumulate);
  if constexpr (R > 1) put_row<FULL>(c + ldc, c10, c11, m0, m1, accumulate);
  if constexpr (R > 2) put_row<FULL>(c + 2 * ldc, c20, c21, m0, m1, accumulate);
  if constexpr (R > 3) put_row<FULL>(c + 3 * ldc, c30, c31, m0, m1, accumulate);
  if constexpr (R > 4) put_row<FULL>(c + 4 * ldc, c40, c41, m0, m1, accumulate);
  if constexpr (R > 5) put_row<FULL>(c + 5 * ldc, c50, c51, m0, m1, accumulate);
}

// Rows [0, M) of a 16-column strip, kTileRows at a time.
void strip(i64 M, i64 K, const float* a, i64 sam, i64 sak, const float* b, i64 ldb, i64 ncols,
           float* c, i64 ldc, bool accumulate) {
  for (i64 r = 0; r < M; r += kTileRows) {
    const float* ar = a + r * sam;
    float* cr = c + r * ldc;
    const i64 R = std::min(kTileRows, M - r);
    const bool full = ncols == kPanel;
#define KST_TILE(RR)                                                             \
  (full ? tile<RR, true>(K, ar, sam, sak, b, ldb, ncols, cr, ldc, accumulate)    \
        : tile<RR, false>(K, ar, sam, sak, b, ldb, ncols, cr, ldc, accumulate))
    switch (R) {
      case 1: KST_TILE(1); break;
      case 2: KST_TILE(2); break;
      case 3: KST_TILE(3); break;
      case 4: KST_TILE(4); break;
      case 5: KST_TILE(5); break;
      default: KST_TILE(6); break;
    }
#undef KST_TILE
  }
}

}  // namespace

bool skinny_gemm_available() { return have_fma() && blas().own; }

std::atomic<i64>& skinny_gemm_runs() {
  static std::atomic<i64> n{0};
  return n;
}

void gemm_small_k(i64 M, i64 N, i64 K, const float* a, i64 sam, i64 sak, const float* b,
                  i64 ldb, float* c, i64 ldc, bool accumulate) {
  TORCH_CHECK(K >= 1 && K <= kSmallK && have_fma(), "kstconv: gemm_small_k needs 1 <= K <= ",
              kSmallK, " and AVX2 with FMA (K = ", K, ")");
  skinny_gemm_runs().fetch_add(1, std::memory_order_relaxed);
  if (M == 0 || N == 0) return;
  // B in panels [N / 16][K][16], the last one zero-padded
  const i64 np = ceil_div(N, kPanel);
  std::vector<float> bp(size_t(np * K * kPanel));
  at::parallel_for(0, np, 64, [&](i64 p0, i64 p1) {
    for (i64 p = p0; p < p1; ++p)
      for (i64 k = 0; k < K; ++k) {
        float* o = bp.data() + (p * K + k) * kPanel;
        const i64 j0 = p * kPanel, nj = std::min(kPanel, N - j0);
        std::copy(b + k * ldb + j0, b + k * ldb + j0 + nj, o);
        std::fill(o + nj, o + kPanel, 0.f);
      }
  });
  // items: column chunks (outer, so that a thread's consecutive items share their B chunk) x
  // row blocks
  const i64 nchunks = ceil_div(np, kChunkPanels), nblocks = ceil_div(M, kBlockRows);
  at::parallel_for(0, nchunks * nblocks, 1, [&](i64 i0, i64 i1) {
    for (i64 it = i0; it < i1; ++it) {
      const i64 ch = it / nblocks, r0 = (it % nblocks) * kBlockRows;
      const i64 r1 = std::min(M, r0 + kBlockRows);
      for (i64 p = ch * kChunkPanels; p < std::min(np, (ch + 1) * kChunkPanels); ++p)
        strip(r1 - r0, K, a + r0 * sam, sam, sak, bp.data() + p * K * kPanel, kPanel,
              std::min(kPanel, N - p * kPanel), c + r0 * ldc + p * kPanel, ldc, accumulate);
    }
  });
}

void gemm_short_m(i64 M, i64 N, i64 K, const float* a, i64 sam, i64 sak, const float* b,
                  i64 ldb, float* c, i64 ldc) {
  TORCH_CHECK(M <= kShortM && have_fma(), "kstconv: gemm_short_m needs M <= ", kShortM,
              " and AVX2 with FMA (M = ", M, ")");
  skinny_gemm_runs().fetch_add(1, std::memory_order_relaxed);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (i64 r = 0; r < M; ++r) std::fill(c + r * ldc, c + r * ldc + N, 0.f);
    return;
  }
  // threads split the 16-column strips; each sweeps its strips kShortMRows rows of B at a time
  at::parallel_for(0, ceil_div(N, kPanel), 8, [&](i64 s0, i64 s1) {
    for (i64 k0 = 0; k0 < K; k0 += kShortMRows) {
      const i64 kc = std::min(kShortMRows, K - k0);
      for (i64 s = s0; s < s1; ++s) {
        // the hardware prefetchers did not keep up with kShortMRows streams (the load of B
        // stalled a third of the time): fetch kAheadStrips strips ahead
        if (s + kAheadStrips < s1)
          for (i64 k = 0; k < kc; ++k)
            __builtin_prefetch(b + (k0 + k) * ldb + (s + kAheadStrips) * kPanel);
        strip(M, kc, a + k0 * sak, sam, sak, b + k0 * ldb + s * kPanel, ldb,
              std::min(kPanel, N - s * kPanel), c + s * kPanel, ldc, k0 > 0);
      }
    }
  });
}

}  // namespace kst
