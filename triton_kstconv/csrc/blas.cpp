// The GEMMs PyTorch ships, found by symbol in libtorch_cpu (see blas.h).
#include "blas.h"

#include <ATen/ATen.h>
#include <dlfcn.h>

namespace kst {

namespace {

// ATen's brgemm is a C++ function: its mangled name, as libtorch_cpu exports it.
constexpr const char* kBrgemmSymbol = "_ZN2at6native7cpublas6brgemmEllllllbPKfS3_Pfb";

Blas lookup(int mode) {
  Blas b;
  if (mode == kBlasAten) {
    b.own = false;
    return b;
  }
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) || !info.dli_fname) {
    TORCH_WARN_ONCE("triton_kstconv: libtorch_cpu not found; the C++ engine's GEMMs run "
                    "through at::mm (slower)");
    return b;
  }
  void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (!h) return b;
  b.brgemm = reinterpret_cast<brgemm_t>(dlsym(h, kBrgemmSymbol));
  if (!b.brgemm)
    TORCH_WARN_ONCE("triton_kstconv: ATen's brgemm (", kBrgemmSymbol, ") is not exported by "
                    "this PyTorch; the C++ engine runs without its brgemm strategies (slower)");
  b.sgemm = reinterpret_cast<sgemm_t>(dlsym(h, "sgemm_"));
  b.dgemm = reinterpret_cast<dgemm_t>(dlsym(h, "dgemm_"));
  if (!b.sgemm || !b.dgemm) {
    TORCH_WARN_ONCE("triton_kstconv: MKL's sgemm_/dgemm_ are not in libtorch_cpu; the C++ "
                    "engine's GEMMs run through at::mm (slower)");
    b.sgemm = nullptr, b.dgemm = nullptr;
    return b;
  }
  b.brgemm_gemm =
      b.brgemm && (mode == kBlasBrgemm || (mode == kBlasAuto && brgemm_gemm_default()));
  b.spack_size = reinterpret_cast<spack_size_t>(dlsym(h, "cblas_sgemm_pack_get_size"));
  b.spack = reinterpret_cast<spack_t>(dlsym(h, "cblas_sgemm_pack"));
  b.scompute = reinterpret_cast<scompute_t>(dlsym(h, "cblas_sgemm_compute"));
  if (!b.spack_size || !b.spack || !b.scompute)
    b.spack_size = nullptr, b.spack = nullptr, b.scompute = nullptr;
  return b;
}

// Column-major matrix `rows x cols` with leading dimension ld, as an ATen view.
template <typename T>
at::Tensor cm_view(const T* p, i64 rows, i64 cols, i64 ld) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t();
}

}  // namespace

const Blas& blas(int mode) {
  static const Blas b = lookup(mode);
  return b;
}

template <typename T>
void gemm_cm(bool ta, bool tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b,
             i64 ldb, T beta, T* c, i64 ldc) {
  if (m == 0 || n == 0) return;
  const Blas& bl = blas();
  if constexpr (std::is_same<T, float>::value) {
    if (bl.brgemm_gemm && alpha == 1.f && (beta == 0.f || beta == 1.f)) {
      // column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T
      gemm_brgemm(tb, ta, n, m, k, b, ldb, a, lda, beta != 0.f, c, ldc);
      return;
    }
  }
  const bool fits = m < INT32_MAX && n < INT32_MAX && k < INT32_MAX && lda < INT32_MAX &&
                    ldb < INT32_MAX && ldc < INT32_MAX;
  const bool have = std::is_same<T, float>::value ? bl.sgemm != nullptr : bl.dgemm != nullptr;
  if (have && fits && k > 0) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(std::max<i64>(lda, 1)),
              ildb = int(std::max<i64>(ldb, 1)), ildc = int(ldc);
    if constexpr (std::is_same<T, float>::value)
      bl.sgemm(&tra, &trb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    else
      bl.dgemm(&tra, &trb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  at::Tensor C = cm_view<T>(c, m, n, ldc);
  at::Tensor prod;
  if (k == 0) {
    prod = at::zeros({m, n}, C.options());
  } else {
    at::Tensor A = ta ? cm_view<T>(a, k, m, lda).t() : cm_view<T>(a, m, k, lda);
    at::Tensor B = tb ? cm_view<T>(b, n, k, ldb).t() : cm_view<T>(b, k, n, ldb);
    prod = at::mm(A, B);
  }
  if (beta == T(0)) C.copy_(prod.mul_(alpha));
  else C.mul_(beta).add_(prod, alpha);
}

template void gemm_cm<float>(bool, bool, i64, i64, i64, float, const float*, i64, const float*,
                             i64, float, float*, i64);
template void gemm_cm<double>(bool, bool, i64, i64, i64, double, const double*, i64,
                              const double*, i64, double, double*, i64);

}  // namespace kst
