// The GEMMs PyTorch itself ships, found in libtorch_cpu at first use: MKL's sgemm_ / dgemm_ and
// its packed-operand API, and ATen's batch-reduce brgemm (oneDNN's micro-kernel where the CPU
// has one). Where a symbol is missing the engine says so once (a warning) and takes the next
// path: at::mm for the GEMMs, the non-brgemm strategies without brgemm.
#pragma once

#include <atomic>

#include "kstconv.h"

namespace kst {

typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*,
                        const float*, const float*, const int*, const float*, const int*,
                        const float*, float*, const int*);
typedef void (*dgemm_t)(const char*, const char*, const int*, const int*, const int*,
                        const double*, const double*, const int*, const double*, const int*,
                        const double*, double*, const int*);
// MKL's packed-operand API (cblas_sgemm_pack / _compute): an operand packed once and reused.
typedef size_t (*spack_size_t)(int, int, int, int);
typedef void (*spack_t)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*scompute_t)(int, int, int, int, int, int, const float*, int, const float*, int,
                           float, float*, int);
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161,
       kBMatrix = 162 };
// ATen's batch-reduce GEMM (at::native::cpublas::brgemm, f32):
// (M, N, K, lda, ldb, ldc, accumulate, A, B, C, is_vnni)
typedef void (*brgemm_t)(i64, i64, i64, i64, i64, i64, bool, const float*, const float*, float*,
                         bool);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  brgemm_t brgemm = nullptr;
  spack_size_t spack_size = nullptr;
  spack_t spack = nullptr;
  scompute_t scompute = nullptr;
  bool own = true;  // the engine's own short-dimension GEMMs (false under KSTCONV_BLAS=aten)
  // float32 GEMMs over brgemm tiles (gemm_brgemm) instead of MKL's sgemm and packed API: by
  // default where MKL runs below the CPU's widest vectors (brgemm_gemm_default)
  bool brgemm_gemm = false;
};

// KSTCONV_BLAS: auto (the engine's choice), aten (at::mm for every GEMM, no brgemm, none of
// the engine's own), mkl (MKL's sgemm wherever it is found), brgemm (float32 GEMMs over
// brgemm tiles wherever brgemm is found).
enum BlasMode : int { kBlasAuto = 0, kBlasAten = 1, kBlasMkl = 2, kBlasBrgemm = 3 };

// The GEMMs found (looked up once; `mode`, from KSTCONV_BLAS, given at the first call).
const Blas& blas(int mode = kBlasAuto);

// Whether this CPU's MKL runs below its widest vectors where brgemm does not: an AMD processor
// with AVX-512 (MKL's AMD path is AVX2).
bool brgemm_gemm_default();
// Row-major C[M, N] = op(A)[M, K] x op(B)[K, N] (+ C if accumulate), float32, over brgemm
// tiles (gemm_brgemm.cpp); needs blas().brgemm.
void gemm_brgemm(bool ta, bool tb, i64 M, i64 N, i64 K, const float* A, i64 lda, const float* B,
                 i64 ldb, bool accumulate, float* C, i64 ldc);

// Column-major GEMM: C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C (beta == 0: C not read).
template <typename T>
void gemm_cm(bool ta, bool tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b,
             i64 ldb, T beta, T* c, i64 ldc);

// GEMMs with one short dimension (gemm_skinny.cpp), float32, where the CPU has AVX2 and FMA
// and KSTCONV_BLAS is not aten (skinny_gemm_available()). A element (m, k) at
// a[m * sam + k * sak]; B and C row-major.
bool skinny_gemm_available();
// How many calls the two GEMMs below have served: the tests' check that they ran.
std::atomic<i64>& skinny_gemm_runs();
// C[M, N] (+)= A[M, K] x B[K, N], a short reduction (1 <= K <= kSmallK): weight gradients.
constexpr i64 kSmallK = 16;
void gemm_small_k(i64 M, i64 N, i64 K, const float* a, i64 sam, i64 sak, const float* b,
                  i64 ldb, float* c, i64 ldc, bool accumulate);
// C[M, N] = A[M, K] x B[K, N], few rows (M <= kShortM), B read in place once: GEMM first.
constexpr i64 kShortM = 32;
void gemm_short_m(i64 M, i64 N, i64 K, const float* a, i64 sam, i64 sak, const float* b,
                  i64 ldb, float* c, i64 ldc);

// Row-major GEMM: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
template <typename T>
inline void gemm_rm(bool ta, bool tb, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda,
                    const T* B, i64 ldb, T beta, T* C, i64 ldc) {
  // row-major C = col-major C^T = op(B)^T op(A)^T
  gemm_cm<T>(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// C[M, N] = op(A)[M, K] x B[K, N] + beta * C (beta 0 or 1), row-major: gemm_small_k where the
// reduction is short and T is float (and the CPU has it), else gemm_rm.
template <typename T>
inline void gemm_rm_short_k(bool ta, i64 M, i64 N, i64 K, const T* A, i64 lda, const T* B,
                            i64 ldb, T beta, T* C, i64 ldc) {
  if constexpr (std::is_same<T, float>::value) {
    if (K >= 1 && K <= kSmallK && (beta == 0.f || beta == 1.f) && skinny_gemm_available()) {
      gemm_small_k(M, N, K, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, C, ldc, beta != 0.f);
      return;
    }
  }
  gemm_rm<T>(ta, false, M, N, K, T(1), A, lda, B, ldb, beta, C, ldc);
}

}  // namespace kst
