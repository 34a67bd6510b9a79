// C++ CPU engine of triton_kstconv: kernel-segregated transposed convolution and its gradients.
//
// One mechanism serves the forward pass and grad_input: "gather, GEMM, scatter" over a plan that
// the Python geometry module computes (triton_kstconv/geometry.py, encoded by cpp_engine.py).
// Per spatial axis (always three here; 1D/2D calls add unit axes) the plan lists phases; a phase
// writes destination positions  dst_stride * q + dst_off  for q in [0, Q) and reads, for tap t,
// source position  src_stride * q + src_off[t]  with weight index widx[t].
//   forward:    src = input,  dst = output, one phase per residue r: dst_stride = s, dst_off = r,
//               src_stride = 1, taps T_r with src_off = (r + p - j*d) / s.
//   grad_input: src = grad_out, dst = grad_in, one phase: dst_stride = 1, src_stride = s,
//               all taps with src_off = j*d - p  (an ordinary strided convolution).
// Each phase is split into validity classes (runs of q with the same valid tap range), so no
// multiply-add ever touches an absent input: the patch matrix of a class holds only real inputs,
// and is never larger than one phase's patch matrix for one block of the output. grad_weight
// reuses the forward plan: per phase, dW_r += dY_r x patches^T, reduced over batch and space
// into one private accumulator per thread and summed in thread order (deterministic, no atomics).
//
// The inner products go to the BLAS that PyTorch itself uses (MKL's sgemm_/dgemm_, found in
// libtorch_cpu); where that symbol is absent, or KSTCONV_BLAS=aten, to at::mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace kst {

using i64 = int64_t;

// ------------------------------------------------------------------------------------------ BLAS
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*,
                        const float*, const float*, const int*, const float*, const int*,
                        const float*, float*, const int*);
typedef void (*dgemm_t)(const char*, const char*, const int*, const int*, const int*,
                        const double*, const double*, const int*, const double*, const int*,
                        const double*, double*, const int*);

// MKL's packed-operand API (cblas_sgemm_pack / _compute): a weight is packed once per call and
// reused by every block, instead of being re-packed inside each sgemm call.
typedef size_t (*spack_size_t)(int, int, int, int);
typedef void (*spack_t)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*scompute_t)(int, int, int, int, int, int, const float*, int, const float*, int,
                           float, float*, int);
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161,
       kBMatrix = 162 };

// ATen's batch-reduce GEMM (at::native::cpublas::brgemm, f32): oneDNN's ukernel where the CPU
// has one, else ATen's gemm. Small tiles straight from the input, no patch matrix.
typedef void (*brgemm_t)(i64, i64, i64, i64, i64, i64, bool, const float*, const float*, float*,
                         bool);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  brgemm_t brgemm = nullptr;
  spack_size_t spack_size = nullptr;
  spack_t spack = nullptr;
  scompute_t scompute = nullptr;
  Blas() {
    const char* force = std::getenv("KSTCONV_BLAS");
    if (force && std::string(force) == "aten") return;
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) || !info.dli_fname) return;
    void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return;
    const char* nobrg = std::getenv("KSTCONV_NO_BRGEMM");
    if (!(nobrg && std::string(nobrg) == "1"))
      brgemm = reinterpret_cast<brgemm_t>(dlsym(h, "_ZN2at6native7cpublas6brgemmEllllllbPKfS3_Pfb"));
    sgemm = reinterpret_cast<sgemm_t>(dlsym(h, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(h, "dgemm_"));
    if (!sgemm || !dgemm) {
      sgemm = nullptr, dgemm = nullptr;
      return;
    }
    const char* nopack = std::getenv("KSTCONV_NO_PACKED_GEMM");
    if (nopack && std::string(nopack) == "1") return;
    spack_size = reinterpret_cast<spack_size_t>(dlsym(h, "cblas_sgemm_pack_get_size"));
    spack = reinterpret_cast<spack_t>(dlsym(h, "cblas_sgemm_pack"));
    scompute = reinterpret_cast<scompute_t>(dlsym(h, "cblas_sgemm_compute"));
    if (!spack_size || !spack || !scompute) spack_size = nullptr, spack = nullptr, scompute = nullptr;
  }
};

const Blas& blas() {
  static Blas b;
  return b;
}

// Column-major matrix `rows x cols` with leading dimension ld, as an ATen view.
template <typename T>
at::Tensor cm_view(const T* p, i64 rows, i64 cols, i64 ld) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t();
}

// Column-major GEMM: C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C (beta == 0: C not read).
template <typename T>
void gemm_cm(bool ta, bool tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b,
             i64 ldb, T beta, T* c, i64 ldc) {
  if (m == 0 || n == 0) return;
  const Blas& bl = blas();
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

// Row-major GEMM: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
template <typename T>
inline void gemm_rm(bool ta, bool tb, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda,
                    const T* B, i64 ldb, T beta, T* C, i64 ldc) {
  // row-major C = col-major C^T = op(B)^T op(A)^T
  gemm_cm<T>(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// ------------------------------------------------------------------------------------------ plan
struct AxisPhase {
  i64 dst_off = 0, Q = 0;
  std::vector<i64> widx, soff;
  i64 T() const { return i64(widx.size()); }
};

struct Axis {
  i64 L_src = 1, L_dst = 1, a = 1, s = 1;  // a: source stride, s: destination stride
  std::vector<AxisPhase> ph;
};

// A run of q in [q0, q1) whose patches use taps [t0, t1) (t0 == t1: bias only).
struct Cls {
  i64 q0, q1, t0, t1;
};

inline i64 ceil_div(i64 a, i64 b) {  // b > 0, any sign of a
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

struct Plan {
  Axis ax[3];
  std::vector<std::vector<Cls>> cls[3];  // per axis, per phase
  i64 P = 1;                             // number of n-d phases

  // Flat encoding (see cpp_engine.encode_plan): per axis
  //   L_src, L_dst, src_stride, dst_stride, n_phases, then per phase: dst_off, Q, T, widx[T], soff[T]
  Plan(const std::vector<i64>& flat, double merge_tau, bool trim_taps = true, double tau_w = -1) {
    size_t i = 0;
    auto next = [&]() {
      TORCH_CHECK(i < flat.size(), "kstconv: truncated plan");
      return flat[i++];
    };
    for (int d = 0; d < 3; ++d) {
      Axis& A = ax[d];
      A.L_src = next(); A.L_dst = next(); A.a = next(); A.s = next();
      i64 n = next();
      TORCH_CHECK(n >= 1 && A.a >= 1 && A.s >= 1, "kstconv: bad plan");
      A.ph.resize(n);
      for (auto& ph : A.ph) {
        ph.dst_off = next(); ph.Q = next();
        i64 T = next();
        ph.widx.resize(T); ph.soff.resize(T);
        for (auto& v : ph.widx) v = next();
        for (auto& v : ph.soff) v = next();
      }
      P *= n;
      for (auto& ph : A.ph) {
        cls[d].push_back(classes(A, ph, (d == 2 && tau_w >= 0) ? tau_w : merge_tau));
        if (trim_taps) trim(ph, cls[d].back());
      }
    }
    TORCH_CHECK(i == flat.size(), "kstconv: plan has trailing entries");
  }

  // Valid tap range for q: taps t with 0 <= a*q + soff[t] < L_src. soff is monotone, so a range.
  static void valid_range(const Axis& A, const AxisPhase& ph, i64 q, i64& t0, i64& t1) {
    t0 = 0; t1 = 0;
    bool found = false;
    for (i64 t = 0; t < ph.T(); ++t) {
      i64 s = A.a * q + ph.soff[t];
      if (s >= 0 && s < A.L_src) {
        if (!found) t0 = t, found = true;
        t1 = t + 1;
      }
    }
  }

  // Exact classes, then neighbours merged greedily while the zero taps that a merge adds stay
  // under merge_tau of the useful taps (fewer, larger GEMMs for a little padded work).
  static std::vector<Cls> classes(const Axis& A, const AxisPhase& ph, double tau) {
    std::vector<Cls> exact;
    for (i64 q = 0; q < ph.Q; ++q) {
      i64 t0, t1;
      valid_range(A, ph, q, t0, t1);
      if (!exact.empty() && exact.back().q1 == q && exact.back().t0 == t0 && exact.back().t1 == t1)
        exact.back().q1 = q + 1;
      else
        exact.push_back({q, q + 1, t0, t1});
    }
    if (tau <= 0 || exact.size() <= 1) return exact;
    std::vector<Cls> out;
    i64 useful = 0;
    for (const Cls& c : exact) {
      const i64 u = (c.q1 - c.q0) * (c.t1 - c.t0);
      if (!out.empty()) {
        Cls& m = out.back();
        const bool m_empty = m.t0 == m.t1, c_empty = c.t0 == c.t1;
        const i64 t0 = m_empty ? c.t0 : (c_empty ? m.t0 : std::min(m.t0, c.t0));
        const i64 t1 = m_empty ? c.t1 : (c_empty ? m.t1 : std::max(m.t1, c.t1));
        const i64 cost = (c.q1 - m.q0) * (t1 - t0);
        if (double(cost - useful - u) <= tau * double(useful + u)) {
          m = {m.q0, c.q1, t0, t1};
          useful += u;
          continue;
        }
      }
      out.push_back(c);
      useful = u;
    }
    return out;
  }

  // Drop the taps that no class uses (they never meet a real input) and rebase the classes.
  static void trim(AxisPhase& ph, std::vector<Cls>& cs) {
    i64 lo = ph.T(), hi = 0;
    for (const Cls& c : cs)
      if (c.t1 > c.t0) lo = std::min(lo, c.t0), hi = std::max(hi, c.t1);
    if (hi <= lo) lo = hi = 0;
    ph.widx = std::vector<i64>(ph.widx.begin() + lo, ph.widx.begin() + hi);
    ph.soff = std::vector<i64>(ph.soff.begin() + lo, ph.soff.begin() + hi);
    for (Cls& c : cs) {
      if (c.t1 > c.t0) c.t0 -= lo, c.t1 -= lo;
      else c.t0 = c.t1 = 0;
    }
  }

  void phase_coords(i64 p, i64 c[3]) const {
    c[2] = p % i64(ax[2].ph.size()); p /= i64(ax[2].ph.size());
    c[1] = p % i64(ax[1].ph.size()); p /= i64(ax[1].ph.size());
    c[0] = p;
  }
  i64 taps(i64 p) const {
    i64 c[3];
    phase_coords(p, c);
    return ax[0].ph[c[0]].T() * ax[1].ph[c[1]].T() * ax[2].ph[c[2]].T();
  }
};

// ------------------------------------------------------------------------------------- epilogue
enum Act { NONE = 0, RELU, LEAKY, SILU, GELU, GELU_TANH, TANH, SIGMOID };

template <typename T, int ACT>
inline T act_fn(T v, T slope) {
  if constexpr (ACT == RELU) return v > T(0) ? v : T(0);
  else if constexpr (ACT == LEAKY) return v > T(0) ? v : v * slope;
  else if constexpr (ACT == SILU) return v / (T(1) + std::exp(-v));
  else if constexpr (ACT == GELU) return T(0.5) * v * (T(1) + std::erf(v * T(M_SQRT1_2)));
  else if constexpr (ACT == GELU_TANH) {
    const T k = T(M_2_SQRTPI * M_SQRT1_2);  // sqrt(2/pi)
    return T(0.5) * v * (T(1) + std::tanh(k * (v + T(0.044715) * v * v * v)));
  } else if constexpr (ACT == TANH) return std::tanh(v);
  else if constexpr (ACT == SIGMOID) return T(1) / (T(1) + std::exp(-v));
  else return v;
}

// ---------------------------------------------------------------------------------- tensor views
template <typename T>
struct View5 {
  T* p;
  i64 size[5], st[5];
  explicit View5(const at::Tensor& t)
      : p(t.defined() ? t.data_ptr<std::remove_const_t<T>>() : nullptr) {
    for (int i = 0; i < 5; ++i) {
      size[i] = t.defined() ? t.size(i) : 0;
      st[i] = t.defined() ? t.stride(i) : 0;
    }
  }
};

// The pixels one class covers: images [n0, n1) x q ranges per axis, and its tap ranges.
struct Block {
  i64 g, n0, n1;
  i64 q0[3], q1[3], t0[3], t1[3];
  i64 r[3];  // phase coordinate per axis
  i64 M() const { return (n1 - n0) * (q1[0] - q0[0]) * (q1[1] - q0[1]) * (q1[2] - q0[2]); }
  i64 nt(int d) const { return t1[d] - t0[d]; }
  bool no_taps() const { return nt(0) == 0 || nt(1) == 0 || nt(2) == 0; }
};

// The block widened to every tap of a one-phase plan (the patch matrix zero-filled where a tap
// falls outside), for the paths that multiply in the weight's own order.
inline Block every_tap(const Plan& GI, Block b) {
  for (int d = 0; d < 3; ++d) b.t0[d] = 0, b.t1[d] = GI.ax[d].ph[0].T();
  return b;
}

// Patch matrix of a block. KM layout: cols[k][m] (m contiguous), for a source whose innermost
// spatial stride is small; MK layout: cols[m][k] (channels contiguous), for channels-last sources.
// k runs over (td, th, tw, c) of the block's tap ranges, m over (n, qd, qh, qw).
// chan_outer: k runs over (c, td, th, tw) instead (the ConvTranspose weight's own order).
inline i64 env_int(const char* name, i64 dflt) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : dflt;
}

template <typename T>
void im2col(const View5<const T>& X, const Plan& P, const Block& b, i64 Cg, bool mk, T* cols,
            bool chan_outer = false) {
  const i64 Tn = b.nt(0) * b.nt(1) * b.nt(2);
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const AxisPhase &pd = Ad.ph[b.r[0]], &ph = Ah.ph[b.r[1]], &pw = Aw.ph[b.r[2]];
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 Kc = b.nt(0) * b.nt(1) * b.nt(2) * Cg;
  const T* base_g = X.p + b.g * Cg * X.st[1];
  if (!mk) {
    i64 tflat = 0;
    for (i64 td = b.t0[0]; td < b.t1[0]; ++td)
      for (i64 th = b.t0[1]; th < b.t1[1]; ++th)
        for (i64 tw = b.t0[2]; tw < b.t1[2]; ++tw, ++tflat) {
          const i64 bw = pw.soff[tw];
          // valid qw: 0 <= a*qw + bw < L
          const i64 lo = std::max(b.q0[2], ceil_div(-bw, Aw.a));
          const i64 hi = std::min(b.q1[2], ceil_div(Aw.L_src - bw, Aw.a));
          for (i64 c = 0; c < Cg; ++c) {
            T* row = cols + (chan_outer ? c * Tn + tflat : tflat * Cg + c) * M;
            const T* base_c = base_g + c * X.st[1];
            for (i64 n = b.n0; n < b.n1; ++n)
              for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd) {
                const i64 sd = Ad.a * qd + pd.soff[td];
                for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, row += nqw) {
                  const i64 sh = Ah.a * qh + ph.soff[th];
                  if (sd < 0 || sd >= Ad.L_src || sh < 0 || sh >= Ah.L_src || lo >= hi) {
                    std::fill(row, row + nqw, T(0));
                    continue;
                  }
                  const T* src = base_c + n * X.st[0] + sd * X.st[2] + sh * X.st[3];
                  std::fill(row, row + (lo - b.q0[2]), T(0));
                  const i64 sw0 = Aw.a * lo + bw, step = Aw.a * X.st[4];
                  T* o = row + (lo - b.q0[2]);
                  if (step == 1) {
                    std::memcpy(o, src + sw0, sizeof(T) * (hi - lo));
                  } else {
                    const T* s = src + sw0 * X.st[4];
                    for (i64 i = 0; i < hi - lo; ++i) o[i] = s[i * step];
                  }
                  std::fill(row + (hi - b.q0[2]), row + nqw, T(0));
                }
              }
          }
        }
    return;
  }
  // MK: one row of Kc per pixel, channels contiguous
  T* row = cols;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh)
        for (i64 qw = b.q0[2]; qw < b.q1[2]; ++qw, row += Kc) {
          i64 tflat = 0;
          for (i64 td = b.t0[0]; td < b.t1[0]; ++td) {
            const i64 sd = Ad.a * qd + pd.soff[td];
            for (i64 th = b.t0[1]; th < b.t1[1]; ++th) {
              const i64 sh = Ah.a * qh + ph.soff[th];
              for (i64 tw = b.t0[2]; tw < b.t1[2]; ++tw, ++tflat) {
                const i64 sw = Aw.a * qw + pw.soff[tw];
                const bool ok = sd >= 0 && sd < Ad.L_src && sh >= 0 && sh < Ah.L_src && sw >= 0 &&
                                sw < Aw.L_src;
                const T* src = base_g + n * X.st[0] + sd * X.st[2] + sh * X.st[3] + sw * X.st[4];
                if (chan_outer) {
                  for (i64 c = 0; c < Cg; ++c) row[c * Tn + tflat] = ok ? src[c * X.st[1]] : T(0);
                  continue;
                }
                T* o = row + tflat * Cg;
                if (!ok) std::fill(o, o + Cg, T(0));
                else if (X.st[1] == 1) std::memcpy(o, src, sizeof(T) * Cg);
                else for (i64 c = 0; c < Cg; ++c) o[c] = src[c * X.st[1]];
              }
            }
          }
        }
}

// Destination rows of a block: C is [Cg, M] (KM) or [M, Cg] (MK); nullptr means zero (bias
// only). out = act(C + bias), pre = C + bias where wanted.
template <typename T, int ACT>
void scatter(const T* C, bool mk, const View5<T>& Y, const View5<T>& Pre, const T* bias,
             const Plan& P, const Block& b, i64 Cg, T slope) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 rd = Ad.ph[b.r[0]].dst_off, rh = Ah.ph[b.r[1]].dst_off, rw = Aw.ph[b.r[2]].dst_off;
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 cbase = b.g * Cg;
  const i64 wst = Aw.s * Y.st[4], pwst = Aw.s * Pre.st[4];
  if (!mk) {
    for (i64 o = 0; o < Cg; ++o) {
      const T bv = bias ? bias[cbase + o] : T(0);
      const T* crow = C ? C + o * M : nullptr;
      i64 m = 0;
      for (i64 n = b.n0; n < b.n1; ++n)
        for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
          for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, m += nqw) {
            const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow0 = Aw.s * b.q0[2] + rw;
            T* y = Y.p + n * Y.st[0] + (cbase + o) * Y.st[1] + od * Y.st[2] + oh * Y.st[3] +
                   ow0 * Y.st[4];
            T* pr = Pre.p ? Pre.p + n * Pre.st[0] + (cbase + o) * Pre.st[1] + od * Pre.st[2] +
                                oh * Pre.st[3] + ow0 * Pre.st[4]
                          : nullptr;
            for (i64 i = 0; i < nqw; ++i) {
              const T v = (crow ? crow[m + i] : T(0)) + bv;
              y[i * wst] = act_fn<T, ACT>(v, slope);
              if (pr) pr[i * pwst] = v;
            }
          }
    }
    return;
  }
  i64 m = 0;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh)
        for (i64 qw = b.q0[2]; qw < b.q1[2]; ++qw, ++m) {
          const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow = Aw.s * qw + rw;
          T* y = Y.p + n * Y.st[0] + cbase * Y.st[1] + od * Y.st[2] + oh * Y.st[3] + ow * Y.st[4];
          T* pr = Pre.p ? Pre.p + n * Pre.st[0] + cbase * Pre.st[1] + od * Pre.st[2] +
                              oh * Pre.st[3] + ow * Pre.st[4]
                        : nullptr;
          const T* crow = C ? C + m * Cg : nullptr;
          for (i64 o = 0; o < Cg; ++o) {
            const T v = (crow ? crow[o] : T(0)) + (bias ? bias[cbase + o] : T(0));
            y[o * Y.st[1]] = act_fn<T, ACT>(v, slope);
            if (pr) pr[o * Pre.st[1]] = v;
          }
        }
}

template <typename T>
void scatter_dispatch(int act, const T* C, bool mk, const View5<T>& Y, const View5<T>& Pre,
                      const T* bias, const Plan& P, const Block& b, i64 Cg, T slope) {
  switch (act) {
    case RELU: return scatter<T, RELU>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case LEAKY: return scatter<T, LEAKY>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case SILU: return scatter<T, SILU>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case GELU: return scatter<T, GELU>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case GELU_TANH: return scatter<T, GELU_TANH>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case TANH: return scatter<T, TANH>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    case SIGMOID: return scatter<T, SIGMOID>(C, mk, Y, Pre, bias, P, b, Cg, slope);
    default: return scatter<T, NONE>(C, mk, Y, Pre, bias, P, b, Cg, slope);
  }
}

// Gather a destination-shaped operand (grad_out of one phase) into G: [Cg, M] or [M, Cg].
template <typename T>
void gather_dst(const View5<const T>& Y, const Plan& P, const Block& b, i64 Cg, bool mk, T* G) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 rd = Ad.ph[b.r[0]].dst_off, rh = Ah.ph[b.r[1]].dst_off, rw = Aw.ph[b.r[2]].dst_off;
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 cbase = b.g * Cg, wst = Aw.s * Y.st[4];
  i64 m = 0;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, m += nqw) {
        const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow0 = Aw.s * b.q0[2] + rw;
        const T* y = Y.p + n * Y.st[0] + cbase * Y.st[1] + od * Y.st[2] + oh * Y.st[3] +
                     ow0 * Y.st[4];
        if (!mk) {
          for (i64 o = 0; o < Cg; ++o) {
            const T* yo = y + o * Y.st[1];
            T* g = G + o * M + m;
            if (wst == 1) std::memcpy(g, yo, sizeof(T) * nqw);
            else for (i64 i = 0; i < nqw; ++i) g[i] = yo[i * wst];
          }
        } else {
          for (i64 i = 0; i < nqw; ++i) {
            const T* yp = y + i * wst;
            T* g = G + (m + i) * Cg;
            if (Y.st[1] == 1) std::memcpy(g, yp, sizeof(T) * Cg);
            else for (i64 o = 0; o < Cg; ++o) g[o] = yp[o * Y.st[1]];
          }
        }
      }
}

// --------------------------------------------------------------------------- weight packing
// Packed layout per (group, phase): Wt[td][th][tw][c_src][c_dst] (the reduction index k runs over
// (taps, c_src), destination channels contiguous), phases consecutive within a group, groups
// consecutive. w5 is the ConvTranspose weight [C_in, C_out/g, kd, kh, kw]. swap=false (forward,
// grad_weight): source channels are C_in (dim 0), destination channels C_out/g (dim 1);
// swap=true (grad_input): the other way round. Only taps that meet a real input are packed.
struct PackIndex {
  std::vector<i64> off;  // per phase: offset of its block within a group, size P + 1
  std::vector<i64> K;    // per phase: reduction length
  i64 Csrc_g, Cdst_g, per_group;
  PackIndex(const Plan& P, i64 Csrc_g_, i64 Cdst_g_) : Csrc_g(Csrc_g_), Cdst_g(Cdst_g_) {
    off.push_back(0);
    for (i64 p = 0; p < P.P; ++p) {
      K.push_back(P.taps(p) * Csrc_g);
      off.push_back(off.back() + Cdst_g * K[p]);
    }
    per_group = off.back();
  }
  i64 at(i64 g, i64 p) const { return g * per_group + off[p]; }
};

// Copies between the weight and the packed buffer (unpack=true: buffer -> weight), tiled over
// (c_in, c_out) so that reads and writes both use whole cache lines.
template <typename T>
void pack_or_unpack(bool unpack, const View5<T>& W, T* buf, const Plan& P, const PackIndex& pi,
                    i64 groups, bool swap, bool dst_major = false) {
  const i64 kd = W.size[2], kh = W.size[3], kw = W.size[4], KK = kd * kh * kw;
  std::vector<i64> map(KK, -1);  // kernel tap -> offset of its [c_src][c_dst] block in a group
  for (i64 p = 0; p < P.P; ++p) {
    i64 c3[3];
    P.phase_coords(p, c3);
    const AxisPhase &pd = P.ax[0].ph[c3[0]], &ph = P.ax[1].ph[c3[1]], &pw = P.ax[2].ph[c3[2]];
    i64 t = 0;
    for (i64 td = 0; td < pd.T(); ++td)
      for (i64 th = 0; th < ph.T(); ++th)
        for (i64 tw = 0; tw < pw.T(); ++tw, ++t)
          map[(pd.widx[td] * kh + ph.widx[th]) * kw + pw.widx[tw]] =
              pi.off[p] + t * pi.Csrc_g * pi.Cdst_g;
  }
  std::vector<i64> jst(KK);  // element offset of each tap in w
  for (i64 a = 0; a < kd; ++a)
    for (i64 b = 0; b < kh; ++b)
      for (i64 c = 0; c < kw; ++c) jst[(a * kh + b) * kw + c] = a * W.st[2] + b * W.st[3] + c * W.st[4];
  const i64 Cin_g = swap ? pi.Cdst_g : pi.Csrc_g, Cout_g = swap ? pi.Csrc_g : pi.Cdst_g;
  // packed index of (ci, co) within a tap block: [c_src][c_dst], or [c_dst][c_src] (dst_major)
  const i64 s_src = dst_major ? 1 : pi.Cdst_g, s_dst = dst_major ? pi.Csrc_g : 1;
  const i64 s_ci = swap ? s_dst : s_src, s_co = swap ? s_src : s_dst;
  const bool co_inner = s_co == 1;
  std::vector<i64> used;
  for (i64 j = 0; j < KK; ++j)
    if (map[j] >= 0) used.push_back(j);
  constexpr i64 TB = 16;  // block of the channel that is strided in the packed buffer
  const i64 nci = co_inner ? Cin_g : (Cin_g + TB - 1) / TB;
  at::parallel_for(0, groups * nci, 1, [&](i64 begin, i64 end) {
    for (i64 it = begin; it < end; ++it) {
      const i64 g = it / nci, c = it % nci;
      T* gb = buf + g * pi.per_group;
      if (co_inner) {  // one input channel: co contiguous in the buffer
        T* w = W.p + (g * Cin_g + c) * W.st[0];
        for (i64 j : used) {
          T* b = gb + map[j] + c * s_ci;
          T* wj = w + jst[j];
          for (i64 co = 0; co < Cout_g; ++co) {
            if (unpack) wj[co * W.st[1]] = b[co];
            else b[co] = wj[co * W.st[1]];
          }
        }
      } else {      // a block of input channels: ci contiguous in the buffer
        const i64 ci0 = c * TB, ci1 = std::min(Cin_g, ci0 + TB);
        for (i64 j : used)
          for (i64 co = 0; co < Cout_g; ++co) {
            T* b = gb + map[j] + co * s_co;
            T* w = W.p + (g * Cin_g) * W.st[0] + co * W.st[1] + jst[j];
            for (i64 ci = ci0; ci < ci1; ++ci) {
              if (unpack) w[ci * W.st[0]] = b[ci];
              else b[ci] = w[ci * W.st[0]];
            }
          }
      }
    }
  });
}

// --------------------------------------------------------------------------- work decomposition
// Work items: (group, [phase,] block of images, block of destination positions along the split
// axis). An item aims at about `Mt` destination pixels per phase (GEMMs large enough to run near
// peak) within a memory cap for its patch matrix; when that leaves fewer items than threads, the
// phases become separate items too.
struct Items {
  i64 groups, N, nb, split, rows, nblk_n, nblk_o, nph;  // nph: 1 (all phases per item) or P
  i64 count() const { return groups * nph * nblk_n * nblk_o; }
};


// Destination pixels per phase that an item of a phase-im2col pass aims at.
i64 im2col_target(i64 Kmax, i64 Cdst_g) {
  const i64 cap = env_int("KSTCONV_COLS_CAP", i64(1) << 21);  // elements of a patch matrix
  const i64 Mt = env_int("KSTCONV_MT", 1024);
  return std::max<i64>(64, std::min({Mt, cap / std::max<i64>(Kmax, 1), cap / std::max<i64>(Cdst_g, 1)}));
}

Items make_items(const Plan& P, i64 groups, i64 N, i64 Mt, int nthreads, bool phase_items) {
  Items it;
  it.groups = groups;
  it.N = std::max<i64>(N, 1);
  it.split = 2;
  for (int d = 0; d < 3; ++d)
    if (P.ax[d].L_dst > 1) { it.split = d; break; }
  const i64 pix_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  const i64 Ls = P.ax[it.split].L_dst, s = P.ax[it.split].s;
  const i64 target = Mt * P.P;  // destination pixels per item, all phases
  if (pix_img <= target || Ls <= s) {
    it.nb = std::max<i64>(1, std::min<i64>(it.N, target / std::max<i64>(pix_img, 1)));
    it.rows = Ls;
  } else {
    it.nb = 1;
    const i64 row = std::max<i64>(1, pix_img / Ls);
    it.rows = std::min(Ls, std::max<i64>(s, (target / row) / s * s));
  }
  it.nblk_n = (it.N + it.nb - 1) / it.nb;
  it.nblk_o = (Ls + it.rows - 1) / it.rows;
  // Few items: round their number up to a multiple of the threads, for balance.
  i64 items = groups * it.nblk_n * it.nblk_o;
  if (items < 4 * nthreads && items % nthreads != 0 && items >= nthreads) {
    const i64 want = (items + nthreads - 1) / nthreads * nthreads;
    if (it.nblk_o == 1 && it.nblk_n > 1) {
      it.nblk_n = std::min(it.N, (want + groups - 1) / groups);
      it.nb = (it.N + it.nblk_n - 1) / it.nblk_n;
      it.nblk_n = (it.N + it.nb - 1) / it.nb;
    } else if (it.nblk_o >= 1) {
      const i64 nbo = std::min(ceil_div(Ls, s), (want + groups * it.nblk_n - 1) / (groups * it.nblk_n));
      it.rows = std::max<i64>(s, ceil_div(ceil_div(Ls, nbo), s) * s);
      it.nblk_o = (Ls + it.rows - 1) / it.rows;
    }
  }
  it.nph = (phase_items && groups * it.nblk_n * it.nblk_o < nthreads && P.P > 1) ? P.P : 1;
  return it;
}

// For one item, call f(Block) for each (phase, class combination) that it covers.
template <typename F>
void for_each_block(const Plan& P, const Items& it, i64 item, F&& f) {
  const i64 per_g = it.nph * it.nblk_n * it.nblk_o;
  const i64 g = item / per_g;
  i64 rest = item % per_g;
  const i64 ph_item = rest / (it.nblk_n * it.nblk_o);
  rest %= it.nblk_n * it.nblk_o;
  const i64 bn = rest / it.nblk_o, bo = rest % it.nblk_o;
  const i64 n0 = bn * it.nb, n1 = std::min(it.N, n0 + it.nb);
  const i64 o0 = bo * it.rows, o1 = std::min(P.ax[it.split].L_dst, o0 + it.rows);
  const i64 p_begin = it.nph == 1 ? 0 : ph_item, p_end = it.nph == 1 ? P.P : ph_item + 1;
  for (i64 p = p_begin; p < p_end; ++p) {
    Block b;
    b.g = g; b.n0 = n0; b.n1 = n1;
    P.phase_coords(p, b.r);
    i64 lo[3], hi[3];
    bool empty = false;
    for (int d = 0; d < 3; ++d) {
      const AxisPhase& ph = P.ax[d].ph[b.r[d]];
      lo[d] = 0; hi[d] = ph.Q;
      if (d == it.split) {  // destination o = s*q + r in [o0, o1)
        const i64 s = P.ax[d].s;
        lo[d] = std::max<i64>(0, ceil_div(o0 - ph.dst_off, s));
        hi[d] = std::min<i64>(ph.Q, ceil_div(o1 - ph.dst_off, s));
      }
      if (lo[d] >= hi[d]) empty = true;
    }
    if (empty) continue;
    for (const Cls& cd : P.cls[0][b.r[0]]) {
      if (cd.q1 <= lo[0] || cd.q0 >= hi[0]) continue;
      for (const Cls& ch : P.cls[1][b.r[1]]) {
        if (ch.q1 <= lo[1] || ch.q0 >= hi[1]) continue;
        for (const Cls& cw : P.cls[2][b.r[2]]) {
          if (cw.q1 <= lo[2] || cw.q0 >= hi[2]) continue;
          const Cls* cs[3] = {&cd, &ch, &cw};
          for (int d = 0; d < 3; ++d) {
            b.q0[d] = std::max(cs[d]->q0, lo[d]);
            b.q1[d] = std::min(cs[d]->q1, hi[d]);
            b.t0[d] = cs[d]->t0;
            b.t1[d] = cs[d]->t1;
          }
          f(b);
        }
      }
    }
  }
}

// Calls gemm(k_offset_in_packed, k_offset_in_cols, K_block) for the maximal runs of the block's
// taps that are contiguous in both the packed weight and the patch matrix.
template <typename F>
void for_each_k_run(const Plan& P, const Block& b, i64 Cg, F&& gemm) {
  const i64 Th = P.ax[1].ph[b.r[1]].T(), Tw = P.ax[2].ph[b.r[2]].T();
  const bool full_w = b.nt(2) == Tw, full_h = full_w && b.nt(1) == Th;
  i64 kc = 0;
  if (full_h) {
    const i64 K = b.nt(0) * Th * Tw * Cg;
    gemm(b.t0[0] * Th * Tw * Cg, i64(0), K);
    return;
  }
  for (i64 td = b.t0[0]; td < b.t1[0]; ++td) {
    if (full_w) {
      const i64 K = b.nt(1) * Tw * Cg;
      gemm(((td * Th) + b.t0[1]) * Tw * Cg, kc, K);
      kc += K;
      continue;
    }
    for (i64 th = b.t0[1]; th < b.t1[1]; ++th) {
      const i64 K = b.nt(2) * Cg;
      gemm(((td * Th + th) * Tw + b.t0[2]) * Cg, kc, K);
      kc += K;
    }
  }
}

inline bool channels_last_like(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

// --------------------------------------------------------------------------- layout

// A channels-last (N, D, H, W, C) copy of a 5-d tensor, transposed in 16 x 16 tiles (ATen's
// generic strided copy is several times slower for this permutation). Already channels-last
// tensors are returned as they are.
// 8 x 8 float transpose in AVX2 registers: dst[j][i] = src[i][j].
__attribute__((target("avx2"))) static void transpose8x8(const float* src, i64 lds, float* dst,
                                                          i64 ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// o0[i] = y[2i], o1[i] = y[2i + 1] for i < q, 8 at a time in AVX2; returns how many were done
__attribute__((target("avx2"))) static i64 deinterleave2(const float* y, i64 q, float* o0,
                                                          float* o1) {
  i64 i = 0;
  for (; i + 8 <= q; i += 8) {
    const __m256 a = _mm256_loadu_ps(y + 2 * i), b = _mm256_loadu_ps(y + 2 * i + 8);
    // a = y0..y7, b = y8..y15; within 128-bit lanes pick evens / odds, then fix lane order
    const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // 0 2 8 10 | 4 6 12 14
    const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));  // 1 3 9 11 | 5 7 13 15
    const __m256i perm = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    _mm256_storeu_ps(o0 + i, _mm256_permutevar8x32_ps(ev, perm));
    _mm256_storeu_ps(o1 + i, _mm256_permutevar8x32_ps(od, perm));
  }
  return i;
}

inline bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

// One row of C channels x W pixels, element (c, w) at src[c * cst + w * wst], into channels-last
// dst[w * C + c]: 8 x 8 register transposes where the pixels are contiguous, then the tails.
inline void row_to_channels_last(const float* src, i64 cst, i64 wst, i64 C, i64 W, float* dst) {
  i64 c8 = 0, w8 = 0;
  if (wst == 1 && have_avx2()) {
    c8 = C / 8 * 8;
    w8 = W / 8 * 8;
    for (i64 c = 0; c < c8; c += 8)
      for (i64 w = 0; w < w8; w += 8) transpose8x8(src + c * cst + w, cst, dst + w * C + c, C);
  }
  for (i64 w = 0; w < W; ++w)
    for (i64 c = (w < w8 ? c8 : 0); c < C; ++c) dst[w * C + c] = src[c * cst + w * wst];
}

// A channels-last (N, D, H, W, C) copy of a 5-d tensor, optionally with zero columns added on
// both sides of w. Already channels-last tensors (unpadded) are returned as they are.
template <typename T>
at::Tensor to_channels_last(const at::Tensor& t, i64 pad_lo = 0, i64 pad_hi = 0) {
  if (pad_lo == 0 && pad_hi == 0 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return t;
  const i64 N = t.size(0), C = t.size(1), D = t.size(2), H = t.size(3), W = t.size(4);
  const i64 Wp = W + pad_lo + pad_hi;
  at::Tensor out = at::empty({N, C, D, H, Wp},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  View5<const T> X(t);
  T* o = out.data_ptr<T>();
  // items: (n, d, block of RB rows); an item walks 8 channels at a time through all of its
  // rows, so that each channel plane is read in longer contiguous runs, while the rows it
  // writes stay within about 32 KiB (wide rows of many channels: one row per item)
  const int nthreads = at::get_num_threads();
  i64 RB = std::min<i64>(H, std::max<i64>(1, (i64(32) << 10) / std::max<i64>(1, Wp * C * i64(sizeof(T)))));
  while (RB > 1 && N * D * ceil_div(H, RB) < 4 * nthreads) RB = ceil_div(RB, 2);
  const i64 nrb = ceil_div(H, RB);
  bool fast = false;
  if constexpr (std::is_same<T, float>::value) fast = X.st[4] == 1 && have_avx2();
  const bool cl_in = X.st[1] == 1 && X.st[4] == C;
  at::parallel_for(0, N * D * nrb, 1, [&](i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
      const i64 nd = b / nrb, h0 = (b % nrb) * RB, h1 = std::min(H, h0 + RB);
      const i64 n = nd / D, d = nd % D;
      const T* xd = X.p + n * X.st[0] + d * X.st[2];
      T* od = o + (nd * H) * Wp * C;
      for (i64 h = h0; h < h1; ++h) {
        T* orow = od + h * Wp * C;
        std::fill(orow, orow + pad_lo * C, T(0));
        std::fill(orow + (pad_lo + W) * C, orow + Wp * C, T(0));
        if (cl_in) std::memcpy(orow + pad_lo * C, xd + h * X.st[3], sizeof(T) * W * C);
      }
      if (cl_in) continue;
      i64 c8 = 0, w8 = 0;
      if constexpr (std::is_same<T, float>::value) {
        if (fast) {
          c8 = C / 8 * 8;
          w8 = W / 8 * 8;
          for (i64 c = 0; c < c8; c += 8)
            for (i64 h = h0; h < h1; ++h) {
              const T* xr = xd + h * X.st[3] + c * X.st[1];
              T* ob = od + (h * Wp + pad_lo) * C + c;
              for (i64 w = 0; w < w8; w += 8) transpose8x8(xr + w, X.st[1], ob + w * C, C);
            }
        }
      }
      // what the 8 x 8 blocks left: the channel tail, and the pixel tail of every channel
      for (i64 h = h0; h < h1; ++h) {
        const T* xr = xd + h * X.st[3];
        T* ob = od + (h * Wp + pad_lo) * C;
        for (i64 w = 0; w < W; ++w) {
          T* op = ob + w * C;
          const T* xp = xr + w * X.st[4];
          for (i64 c = (w < w8 ? c8 : 0); c < C; ++c) op[c] = xp[c * X.st[1]];
        }
      }
    }
  });
  return out;
}

// --------------------------------------------------------------------------- forward / grad_input
inline i64 phase_index(const Plan& P, const Block& b) {
  return (b.r[0] * i64(P.ax[1].ph.size()) + b.r[1]) * i64(P.ax[2].ph.size()) + b.r[2];
}

inline bool full_taps(const Plan& P, const Block& b) {
  return b.nt(0) == P.ax[0].ph[b.r[0]].T() && b.nt(1) == P.ax[1].ph[b.r[1]].T() &&
         b.nt(2) == P.ax[2].ph[b.r[2]].T();
}

// Per (group, phase): the packed weight in MKL's packed-operand format (float only), all in one
// byte tensor at 64-byte aligned offsets (-1: that phase is multiplied from the plain packing).
// Made once per weight version and cached by the Python side (weight_cache.py).
struct MklPacked {
  at::Tensor bytes, off;  // uint8 [total]; int64 [groups * phases]
  const float* at(i64 i) const {
    if (!off.defined()) return nullptr;
    const i64 o = off.data_ptr<i64>()[i];
    return o < 0 ? nullptr : reinterpret_cast<const float*>(bytes.data_ptr<uint8_t>() + o);
  }
};

template <typename T>
MklPacked mkl_pack_weights(const T* packed, const PackIndex& pi, i64 groups, i64 nP, bool mk) {
  MklPacked out;
  if constexpr (std::is_same<T, float>::value) {
    const Blas& bl = blas();
    if (!bl.spack || pi.Cdst_g < 16) return out;
    std::vector<i64> off(groups * nP, -1);
    i64 total = 64;  // room to align the first matrix
    for (i64 g = 0; g < groups; ++g)
      for (i64 p = 0; p < nP; ++p) {
        const i64 K = pi.K[p], C = pi.Cdst_g;
        if (K < 16 || K >= INT32_MAX || C * K < 4096) continue;
        // KM: A = Wt^T [C, K]; MK: B = Wt [K, C]
        const size_t bytes = mk ? bl.spack_size(kBMatrix, 1, int(C), int(K))
                                : bl.spack_size(kAMatrix, int(C), 1, int(K));
        off[g * nP + p] = total;
        total += i64((bytes + 63) / 64 * 64);
      }
    if (total == 64) return out;
    out.bytes = at::empty({total}, at::kByte);
    const i64 shift = i64((64 - reinterpret_cast<uintptr_t>(out.bytes.data_ptr<uint8_t>()) % 64) % 64);
    out.off = at::empty({groups * nP}, at::kLong);
    i64* o = out.off.data_ptr<i64>();
    for (i64 i = 0; i < groups * nP; ++i) o[i] = off[i] < 0 ? -1 : off[i] - 64 + shift;
    for (i64 g = 0; g < groups; ++g)
      for (i64 p = 0; p < nP; ++p) {
        float* dst = const_cast<float*>(out.at(g * nP + p));
        if (!dst) continue;
        const i64 K = pi.K[p], C = pi.Cdst_g;
        const float* wt = packed + pi.at(g, p);  // [K, C] row-major
        if (mk) bl.spack(kRowMajor, kBMatrix, kNoTrans, 1, int(C), int(K), 1.0f, wt, int(C), dst);
        else bl.spack(kRowMajor, kAMatrix, kTrans, int(C), 1, int(K), 1.0f, wt, int(C), dst);
      }
  }
  return out;
}

// A weight prepared for one conv method: the plain packing (pack_or_unpack layout), MKL's
// packed operands (method 1, float), or a contiguous copy (methods 2 and 6). Either made by
// pack_weight (once per weight version, cached in Python) or, where absent, per call.
struct Prepared {
  at::Tensor packed;  // T [groups * per_group], or the contiguous weight (methods 2, 6)
  MklPacked mkl;
  static Prepared from(const std::vector<at::Tensor>& v) {
    Prepared p;
    if (v.size() >= 1) p.packed = v[0];
    if (v.size() >= 3) p.mkl.bytes = v[1], p.mkl.off = v[2];
    return p;
  }
  std::vector<at::Tensor> to_list() const {
    std::vector<at::Tensor> v;
    if (packed.defined()) v.push_back(packed);
    if (packed.defined() && mkl.off.defined()) v.push_back(mkl.bytes), v.push_back(mkl.off);
    return v;
  }
};

template <typename T>
at::Tensor pack_plain(const at::Tensor& weight, const Plan& P, i64 groups, i64 Csrc_g,
                      i64 Cdst_g, bool swap, bool dst_major) {
  PackIndex pi(P, Csrc_g, Cdst_g);
  at::Tensor packed = at::empty({std::max<i64>(groups * pi.per_group, 1)}, weight.options());
  View5<T> W(weight);
  pack_or_unpack<T>(false, W, packed.data_ptr<T>(), P, pi, groups, swap, dst_major);
  return packed;
}

// use_brg (float): the patch matrix is built channels-last ([pixels, taps x c_src]) from a
// channels-last copy of the source and multiplied tile by tile with brgemm, which reads the packed
// weight in place (no per-call re-packing by the BLAS).
template <typename T>
void conv_impl(const at::Tensor& src_in, const at::Tensor& weight, const at::Tensor& bias,
               at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap, int act,
               double slope, bool use_brg, Prepared prep) {
  const i64 N = src_in.size(0), Csrc = src_in.size(1), Cdst = dst.size(1);
  const i64 Csrc_g = Csrc / groups, Cdst_g = Cdst / groups;
  if (dst.numel() == 0) return;
  brgemm_t brg = nullptr;
  if constexpr (std::is_same<T, float>::value) brg = use_brg ? blas().brgemm : nullptr;
  const at::Tensor src = brg ? to_channels_last<T>(src_in) : src_in;
  View5<const T> X(src);
  View5<T> Y(dst), Pre(pre);
  const T* bptr = bias.defined() ? bias.data_ptr<T>() : nullptr;
  const bool mk = brg ? true : channels_last_like(src);

  PackIndex pi(P, Csrc_g, Cdst_g);
  if (!prep.packed.defined()) {
    prep.packed = pack_plain<T>(weight, P, groups, Csrc_g, Cdst_g, swap, false);
    if (!brg) prep.mkl = mkl_pack_weights<T>(prep.packed.data_ptr<T>(), pi, groups, P.P, mk);
  }
  const T* packed = prep.packed.data_ptr<T>();
  const MklPacked& mp = prep.mkl;

  const int nthreads = at::get_num_threads();
  const i64 Kmax = *std::max_element(pi.K.begin(), pi.K.end());
  const Items items = make_items(P, groups, N, im2col_target(Kmax, Cdst_g), nthreads, true);
  const i64 n_items = items.count();
  const bool outer_parallel = n_items >= nthreads && nthreads > 1;

  auto run = [&](i64 begin, i64 end) {
    std::vector<T> cols, cbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(P, items, item, [&](const Block& b) {
        const i64 M = b.M();
        if (b.no_taps() || Csrc_g == 0) {
          scatter_dispatch<T>(act, nullptr, mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
          return;
        }
        const i64 p = phase_index(P, b);
        const i64 Kc = b.nt(0) * b.nt(1) * b.nt(2) * Csrc_g;
        if (i64(cols.size()) < Kc * M) cols.resize(Kc * M);
        if (i64(cbuf.size()) < Cdst_g * M) cbuf.resize(Cdst_g * M);
        im2col<T>(X, P, b, Csrc_g, mk, cols.data());
        const T* wt = packed + pi.at(b.g, p);  // [Kp, Cdst_g]
        const float* mkl_w = mp.at(b.g * P.P + p);
        if constexpr (std::is_same<T, float>::value) {
          if (brg) {  // C[M, Cdst_g] = cols[M, Kc] x Wt, 32-row tiles
            constexpr i64 MB = 32;
            for (i64 m0 = 0; m0 < M; m0 += MB) {
              const i64 mt = std::min(MB, M - m0);
              bool first = true;
              for_each_k_run(P, b, Csrc_g, [&](i64 kw, i64 kc, i64 Kb) {
                brg(mt, Cdst_g, Kb, Kc, Cdst_g, Cdst_g, !first, cols.data() + m0 * Kc + kc,
                    wt + kw * Cdst_g, cbuf.data() + m0 * Cdst_g, false);
                first = false;
              });
            }
            scatter_dispatch<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
            return;
          }
          if (mkl_w && full_taps(P, b) && M < INT32_MAX) {
            const Blas& bl = blas();
            if (!mk)  // C[Cdst_g, M] = packed(Wt^T) x cols[Kc, M]
              bl.scompute(kRowMajor, kPacked, kNoTrans, int(Cdst_g), int(M), int(Kc), mkl_w,
                          int(Kc), cols.data(), int(M), 0.0f, cbuf.data(), int(M));
            else      // C[M, Cdst_g] = cols[M, Kc] x packed(Wt)
              bl.scompute(kRowMajor, kNoTrans, kPacked, int(M), int(Cdst_g), int(Kc), cols.data(),
                          int(Kc), mkl_w, int(Cdst_g), 0.0f, cbuf.data(), int(Cdst_g));
            scatter_dispatch<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
            return;
          }
        }
        bool first = true;
        for_each_k_run(P, b, Csrc_g, [&](i64 kw, i64 kc, i64 Kb) {
          const T beta = first ? T(0) : T(1);
          first = false;
          if (!mk)  // C[Cdst_g, M] = Wt[Kb, Cdst_g]^T x cols[Kb, M]
            gemm_rm<T>(true, false, Cdst_g, M, Kb, T(1), wt + kw * Cdst_g, Cdst_g,
                       cols.data() + kc * M, M, beta, cbuf.data(), M);
          else      // C[M, Cdst_g] = cols[M, Kb] x Wt[Kb, Cdst_g]
            gemm_rm<T>(false, false, M, Cdst_g, Kb, T(1), cols.data() + kc, Kc, wt + kw * Cdst_g,
                       Cdst_g, beta, cbuf.data(), Cdst_g);
        });
        scatter_dispatch<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
      });
    }
  };
  if (outer_parallel) at::parallel_for(0, n_items, 1, run);
  else run(0, n_items);
}

// --------------------------------------------------------------------------- grad_weight
template <typename T>
void grad_weight_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                      i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  View5<const T> X(x), DY(dy);
  View5<T> DW(dw);
  const bool mk = channels_last_like(x);
  PackIndex pi(P, Cin_g, Cout_g);
  const i64 total = std::max<i64>(groups * pi.per_group, 1);

  const int nthreads = at::get_num_threads();
  const i64 Kmax = *std::max_element(pi.K.begin(), pi.K.end());
  const Items items = make_items(P, groups, N, im2col_target(Kmax, Cout_g), nthreads, true);
  const i64 n_items = dy.numel() == 0 ? 0 : items.count();
  const bool outer_parallel = n_items >= nthreads && nthreads > 1;
  std::vector<std::vector<T>> acc(outer_parallel ? nthreads : 1);

  auto run = [&](i64 begin, i64 end) {
    const int tid = outer_parallel ? at::get_thread_num() : 0;
    std::vector<T>& A = acc[tid];
    if (A.empty()) A.assign(total, T(0));
    std::vector<T> cols, gbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(P, items, item, [&](const Block& b) {
        if (b.no_taps() || Cin_g == 0) return;
        const i64 M = b.M();
        const i64 p = phase_index(P, b);
        const i64 Kc = b.nt(0) * b.nt(1) * b.nt(2) * Cin_g;
        if (i64(cols.size()) < Kc * M) cols.resize(Kc * M);
        if (i64(gbuf.size()) < Cout_g * M) gbuf.resize(Cout_g * M);
        im2col<T>(X, P, b, Cin_g, mk, cols.data());
        gather_dst<T>(DY, P, b, Cout_g, mk, gbuf.data());
        T* dwt = A.data() + pi.at(b.g, p);  // [Kp, Cout_g]
        for_each_k_run(P, b, Cin_g, [&](i64 kw, i64 kc, i64 Kb) {
          if (!mk)  // dWt[Kb, Cout_g] += cols[Kb, M] x G[Cout_g, M]^T
            gemm_rm<T>(false, true, Kb, Cout_g, M, T(1), cols.data() + kc * M, M, gbuf.data(), M,
                       T(1), dwt + kw * Cout_g, Cout_g);
          else      // dWt += cols[M, Kb]^T x G[M, Cout_g]
            gemm_rm<T>(true, false, Kb, Cout_g, M, T(1), cols.data() + kc, Kc, gbuf.data(),
                       Cout_g, T(1), dwt + kw * Cout_g, Cout_g);
        });
      });
    }
  };
  if (n_items > 0) {
    if (outer_parallel) at::parallel_for(0, n_items, 1, run);
    else run(0, n_items);
  }
  // Fixed-order reduction of the per-thread partial sums.
  std::vector<T> sum(total, T(0));
  for (auto& A : acc) {
    if (A.empty()) continue;
    for (i64 i = 0; i < total; ++i) sum[i] += A[i];
  }
  // taps that meet no input are not packed: their gradient is zero
  std::fill(dw.data_ptr<T>(), dw.data_ptr<T>() + dw.numel(), T(0));
  pack_or_unpack<T>(true, DW, sum.data(), P, pi, groups, false);
}

// --------------------------------------------------------------------------- implicit GEMM (brgemm)
// The phase product without any patch matrix: for a run of destination pixels along w, every
// valid tap adds  x[pixels + offset, c_src] x Wt[tap][c_src][c_dst]  into an on-chip tile, the
// A operand read in place from a channels-last copy of the source (rows of c_src contiguous, one
// pixel apart along w). Only exact validity classes are used, so no tap ever reads outside the
// input and no zero is multiplied. The tile is finished by the epilogue (bias, activation) and
// stored into the destination at stride s along w.
inline i64 class_taps(const std::vector<Cls>& cs, i64 q, i64& t0, i64& t1) {
  for (const Cls& c : cs)
    if (q >= c.q0 && q < c.q1) { t0 = c.t0; t1 = c.t1; return t1 - t0; }
  t0 = t1 = 0;
  return 0;
}

// Epilogue of a tile: element (pixel m, channel c) of `acc` sits at acc[m * sm + c * sc] (null:
// zero); destination pixel m is (n, od, oh, ow0 + m * wstep), channel cbase + c.
template <int ACT>
void store_tile(const float* acc, i64 sm, i64 sc, i64 mt, i64 Cg, const View5<float>& Y,
                const View5<float>& Pre, const float* bias, i64 n, i64 cbase, i64 od, i64 oh,
                i64 ow0, i64 wstep, float slope) {
  float* y = Y.p + n * Y.st[0] + cbase * Y.st[1] + od * Y.st[2] + oh * Y.st[3] + ow0 * Y.st[4];
  float* pr = Pre.p ? Pre.p + n * Pre.st[0] + cbase * Pre.st[1] + od * Pre.st[2] + oh * Pre.st[3] +
                          ow0 * Pre.st[4]
                    : nullptr;
  const i64 ys = wstep * Y.st[4], ps = wstep * Pre.st[4];
  auto one = [&](i64 m, i64 c) {
    const float v = (acc ? acc[m * sm + c * sc] : 0.f) + (bias ? bias[cbase + c] : 0.f);
    y[m * ys + c * Y.st[1]] = act_fn<float, ACT>(v, slope);
    if (pr) pr[m * ps + c * Pre.st[1]] = v;
  };
  if (Y.st[1] == 1) {  // channels-last destination: channels innermost
    for (i64 m = 0; m < mt; ++m)
      for (i64 c = 0; c < Cg; ++c) one(m, c);
    return;
  }
  i64 c8 = 0, m8 = 0;
  if (acc && sc == 1 && have_avx2()) {
    // pixel-major tile into a channel-major destination: 8 x 8 blocks through registers, so
    // that each channel's run of pixels is written in one sweep
    c8 = Cg / 8 * 8;
    m8 = mt / 8 * 8;
    alignas(32) float t[64];
    for (i64 c = 0; c < c8; c += 8)
      for (i64 m = 0; m < m8; m += 8) {
        transpose8x8(acc + m * sm + c, sm, t, 8);  // t[cc][mm]
        for (i64 cc = 0; cc < 8; ++cc) {
          const float b = bias ? bias[cbase + c + cc] : 0.f;
          float* yc = y + (c + cc) * Y.st[1] + m * ys;
          float* pc = pr ? pr + (c + cc) * Pre.st[1] + m * ps : nullptr;
          for (i64 mm = 0; mm < 8; ++mm) {
            const float v = t[cc * 8 + mm] + b;
            yc[mm * ys] = act_fn<float, ACT>(v, slope);
            if (pc) pc[mm * ps] = v;
          }
        }
      }
  }
  for (i64 c = 0; c < Cg; ++c)
    for (i64 m = (c < c8 ? m8 : 0); m < mt; ++m) one(m, c);
}

void conv_implicit_impl(const at::Tensor& src_in, const at::Tensor& weight, const at::Tensor& bias,
                        at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap,
                        int act, double slope, bool km, at::Tensor packed_t) {
  const i64 N = src_in.size(0), Csrc = src_in.size(1), Cdst = dst.size(1);
  const i64 Csrc_g = Csrc / groups, Cdst_g = Cdst / groups;
  if (dst.numel() == 0) return;
  // MK: A = source pixels [run, c_src] from a channels-last copy, B = Wt[tap] [c_src, c_dst].
  // KM: A = Wt[tap]^T [c_dst, c_src], B = source [c_src, run] read in place (W contiguous).
  // MK reads a channels-last copy padded with zeros along w, so that a run of pixels may use
  // taps that reach past the border (the plan's w classes may be merged; d/h stay exact).
  const Axis& Aw0 = P.ax[2];
  i64 pad_lo = 0, pad_hi = 0;
  if (!km)
    for (size_t r = 0; r < Aw0.ph.size(); ++r)
      for (const Cls& c : P.cls[2][r]) {
        if (c.t1 <= c.t0) continue;
        const AxisPhase& ph = Aw0.ph[r];
        const i64 smin = std::min(ph.soff[c.t0], ph.soff[c.t1 - 1]);
        const i64 smax = std::max(ph.soff[c.t0], ph.soff[c.t1 - 1]);
        pad_lo = std::max(pad_lo, -(Aw0.a * c.q0 + smin));
        pad_hi = std::max(pad_hi, Aw0.a * (c.q1 - 1) + smax - (Aw0.L_src - 1));
      }
  const at::Tensor src = km ? src_in : to_channels_last<float>(src_in, pad_lo, pad_hi);
  View5<const float> X(src);
  X.p += pad_lo * X.st[4];  // source w = 0
  View5<float> Y(dst), Pre(pre);
  const float* bptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  PackIndex pi(P, Csrc_g, Cdst_g);
  if (!packed_t.defined()) packed_t = pack_plain<float>(weight, P, groups, Csrc_g, Cdst_g, swap, km);
  const float* packed = packed_t.data_ptr<float>();
  const brgemm_t brg = blas().brgemm;
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 MT = km ? std::max<i64>(1, env_int("KSTCONV_BRG_NT", 64))
                    : std::max<i64>(1, std::min<i64>(env_int("KSTCONV_BRG_MT", 32),
                                                     (i64(1) << 13) / std::max<i64>(Cdst_g, 1)));
  const i64 CB = km ? std::max<i64>(1, std::min<i64>(Cdst_g, env_int("KSTCONV_BRG_CB", 128))) : Cdst_g;
  // items: (group, n, od, oh, chunk of w)
  const i64 rows = N * Ad.L_dst * Ah.L_dst;
  const int nthreads = at::get_num_threads();
  i64 wchunk = Aw.L_dst;
  if (rows * groups < 4 * nthreads) {
    const i64 want = (4 * nthreads + rows * groups - 1) / (rows * groups);
    wchunk = std::max<i64>(Aw.s * MT, ceil_div(ceil_div(Aw.L_dst, want), Aw.s) * Aw.s);
  }
  const i64 nch = ceil_div(Aw.L_dst, wchunk);
  const i64 n_items = groups * rows * nch;
  at::parallel_for(0, n_items, 1, [&](i64 begin, i64 end) {
    std::vector<float> acc(MT * std::max<i64>(CB, 1));
    for (i64 item = begin; item < end; ++item) {
      const i64 g = item / (rows * nch);
      i64 r = item % (rows * nch);
      const i64 ch = r % nch;
      r /= nch;
      const i64 oh = r % Ah.L_dst, od = (r / Ah.L_dst) % Ad.L_dst, n = r / (Ah.L_dst * Ad.L_dst);
      const i64 rd = od % Ad.s, qd = od / Ad.s, rh = oh % Ah.s, qh = oh / Ah.s;
      const i64 ow0 = ch * wchunk, ow1 = std::min(Aw.L_dst, ow0 + wchunk);
      i64 td0, td1, th0, th1;
      class_taps(P.cls[0][rd], qd, td0, td1);
      class_taps(P.cls[1][rh], qh, th0, th1);
      const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh];
      const float* xn = X.p + n * X.st[0] + g * Csrc_g * X.st[1];
      for (i64 rw = 0; rw < i64(Aw.ph.size()); ++rw) {
        const AxisPhase& pw = Aw.ph[rw];
        const i64 qa = std::max<i64>(0, ceil_div(ow0 - pw.dst_off, Aw.s));
        const i64 qb = std::min<i64>(pw.Q, ceil_div(ow1 - pw.dst_off, Aw.s));
        if (qa >= qb) continue;
        const i64 p = (rd * i64(Ah.ph.size()) + rh) * i64(Aw.ph.size()) + rw;
        const float* wt = packed + pi.at(g, p);
        const i64 Th = ph.T(), Tw = pw.T();
        for (const Cls& cw : P.cls[2][rw]) {
          const i64 c0 = std::max(cw.q0, qa), c1 = std::min(cw.q1, qb);
          for (i64 q0 = c0; q0 < c1; q0 += MT) {
            const i64 mt = std::min(MT, c1 - q0);
            for (i64 cb = 0; cb < Cdst_g; cb += CB) {
              const i64 cn = std::min(CB, Cdst_g - cb);
              bool first = true;
              if (Csrc_g > 0)
                for (i64 td = td0; td < td1; ++td) {
                  const i64 sd = Ad.a * qd + pd.soff[td];
                  for (i64 th = th0; th < th1; ++th) {
                    const i64 sh = Ah.a * qh + ph.soff[th];
                    // Taps along w that read neighbouring pixels in ascending order form one
                    // reduction of nt * c_src (rows overlap: lda = pixel step < K).
                    const i64 ntw = cw.t1 - cw.t0;
                    const bool merge = !km && ntw > 1 && X.st[4] == Csrc_g &&
                                       pw.soff[cw.t0 + 1] - pw.soff[cw.t0] == 1;
                    if (merge) {
                      const float* xs = xn + sd * X.st[2] + sh * X.st[3] +
                                        (Aw.a * q0 + pw.soff[cw.t0]) * X.st[4];
                      const float* wtap = wt + ((td * Th + th) * Tw + cw.t0) * Csrc_g * Cdst_g;
                      brg(mt, cn, ntw * Csrc_g, Aw.a * X.st[4], Cdst_g, cn, !first, xs, wtap + cb,
                          acc.data(), false);
                      first = false;
                      continue;
                    }
                    for (i64 tw = cw.t0; tw < cw.t1; ++tw) {
                      const float* xs = xn + sd * X.st[2] + sh * X.st[3] +
                                        (Aw.a * q0 + pw.soff[tw]) * X.st[4];
                      const float* wtap = wt + ((td * Th + th) * Tw + tw) * Csrc_g * Cdst_g;
                      if (!km)  // acc[mt, cn] (+)= xs[mt, Csrc_g] x wtap[Csrc_g, cb:cb+cn]
                        brg(mt, cn, Csrc_g, Aw.a * X.st[4], Cdst_g, cn, !first, xs, wtap + cb,
                            acc.data(), false);
                      else      // acc[cn, mt] (+)= wtap[cb:cb+cn, Csrc_g] x xs[Csrc_g, mt]
                        brg(cn, mt, Csrc_g, Csrc_g, X.st[1], mt, !first, wtap + cb * Csrc_g, xs,
                            acc.data(), false);
                      first = false;
                    }
                  }
                }
              const float* a = first ? nullptr : acc.data();
              const i64 sm = km ? 1 : cn, sc = km ? mt : 1;
              const i64 oww = Aw.s * q0 + pw.dst_off, cbase = g * Cdst_g + cb;
              switch (act) {
#define KST_ST(A) case A: store_tile<A>(a, sm, sc, mt, cn, Y, Pre, bptr, n, cbase, od, oh, oww, Aw.s, float(slope)); break;
                KST_ST(RELU) KST_ST(LEAKY) KST_ST(SILU) KST_ST(GELU) KST_ST(GELU_TANH) KST_ST(TANH)
                KST_ST(SIGMOID)
#undef KST_ST
                default: store_tile<NONE>(a, sm, sc, mt, cn, Y, Pre, bptr, n, cbase, od, oh, oww, Aw.s, float(slope));
              }
            }
          }
        }
      }
    }
  });
}

// --------------------------------------------------------------------------- GEMM first, then gather
// The other segregated order, for when the output has fewer channels than the input: multiply
// the real input by the whole weight first, C[(c_out, tap), pixel] = W^T x (no patch matrix of
// the input at all), then let every output phase gather-sum its own taps from C (each output
// element adds exactly the taps of its phase, in a fixed order: no zero, no atomics). With
// k == s and no padding every phase has one tap: one GEMM and a pixel shuffle.
//
// Items are (group, block of images, block of output rows along the split axis); each computes
// the input rows its outputs need (a halo of ceil(k*d/s) rows is recomputed between blocks).

// The source pixels of an item, (n, d, h, w) in [n0, n1) x [lo, hi), as GEMM operands: KM
// [Cg, m] (ld = channel stride) or MK [m, Cg] (ld = pixel stride). Calls f(ptr, ld, m_offset,
// m_count) for runs that are one strided matrix in place (the whole block, else one image at a
// time); a block that is neither is copied into `buf` once.
template <typename T, typename F>
void for_each_source_run(const View5<const T>& X, i64 g, i64 Cg, i64 n0, i64 n1, const i64 lo[3],
                         const i64 hi[3], bool mk, std::vector<T>& buf, F&& f) {
  const i64 nd = hi[0] - lo[0], nh = hi[1] - lo[1], nw = hi[2] - lo[2];
  const i64 Mi = nd * nh * nw, M = (n1 - n0) * Mi;
  if (M == 0) return;
  const T* base = X.p + g * Cg * X.st[1] + lo[0] * X.st[2] + lo[1] * X.st[3] + lo[2] * X.st[4];
  // Do the pixels of one image (and of all images) sit at one uniform stride u?
  auto uniform = [&](bool with_n, i64& u) {
    const i64 sz[4] = {with_n ? n1 - n0 : 1, nd, nh, nw};
    const i64 st[4] = {X.st[0], X.st[2], X.st[3], X.st[4]};
    u = -1;
    i64 expect = -1;
    for (int i = 3; i >= 0; --i) {
      if (sz[i] == 1) continue;
      if (u < 0) u = st[i], expect = st[i] * sz[i];
      else if (st[i] != expect) return false;
      else expect *= sz[i];
    }
    if (u < 0) u = mk ? Cg : 1;  // a single pixel: any stride will do
    return true;
  };
  auto fits = [&](i64 u, i64 m) { return mk ? (X.st[1] == 1 && u >= Cg) : (u == 1 && X.st[1] >= m); };
  i64 u;
  if (uniform(true, u) && fits(u, M)) {
    f(base + n0 * X.st[0], mk ? u : X.st[1], i64(0), M);
    return;
  }
  if (uniform(false, u) && fits(u, Mi)) {
    for (i64 n = n0; n < n1; ++n) f(base + n * X.st[0], mk ? u : X.st[1], (n - n0) * Mi, Mi);
    return;
  }
  if (i64(buf.size()) < M * Cg) buf.resize(M * Cg);
  T* out = buf.data();
  i64 m = 0;
  for (i64 n = n0; n < n1; ++n)
    for (i64 d = lo[0]; d < hi[0]; ++d)
      for (i64 h = lo[1]; h < hi[1]; ++h, m += nw) {
        const T* row = X.p + g * Cg * X.st[1] + n * X.st[0] + d * X.st[2] + h * X.st[3] + lo[2] * X.st[4];
        if (!mk) {
          for (i64 c = 0; c < Cg; ++c) {
            const T* r = row + c * X.st[1];
            T* o = out + c * M + m;
            for (i64 w = 0; w < nw; ++w) o[w] = r[w * X.st[4]];
          }
        } else {
          for (i64 w = 0; w < nw; ++w) {
            const T* px = row + w * X.st[4];
            T* o = out + (m + w) * Cg;
            for (i64 c = 0; c < Cg; ++c) o[c] = px[c * X.st[1]];
          }
        }
      }
  f(static_cast<const T*>(out), mk ? Cg : M, i64(0), M);
}

// Input range [lo, hi) on axis d that the destination positions [o0, o1) of a forward plan read.
inline void needed_inputs(const Axis& A, i64 o0, i64 o1, i64& lo, i64& hi) {
  lo = A.L_src; hi = 0;
  for (const AxisPhase& ph : A.ph) {
    const i64 q0 = std::max<i64>(0, ceil_div(o0 - ph.dst_off, A.s));
    const i64 q1 = std::min<i64>(ph.Q, ceil_div(o1 - ph.dst_off, A.s));
    if (q0 >= q1) continue;
    for (i64 off : ph.soff) {
      lo = std::min(lo, std::max<i64>(0, q0 + off));
      hi = std::max(hi, std::min<i64>(A.L_src, q1 - 1 + off + 1));
    }
  }
  if (hi <= lo) lo = hi = 0;
}

// Gather-sum of one item's output rows [r0, r1) (rows enumerate (n, od, oh) of the item's
// output box) from C, which holds W^T x for the item's input box: C[(c, tap), m] (KM) or
// C[m, (c, tap)] (MK), tap = (jd * kh + jh) * kw + jw, m over (n, id, ih, iw) of the box.
template <typename T, int ACT>
void col2im_rows(const T* C, bool mk, i64 M, i64 CK, const View5<T>& Y, const View5<T>& Pre,
                 const T* bias, const Plan& P, i64 g, i64 Cg, i64 n0, i64 r0, i64 r1,
                 const i64 ob0[3], const i64 ob1[3], const i64 ib0[3], const i64 ib1[3],
                 const i64 kk[3], T slope, std::vector<T>& acc) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 KK = kk[0] * kk[1] * kk[2];
  const i64 nid = ib1[0] - ib0[0], nih = ib1[1] - ib0[1], niw = ib1[2] - ib0[2];
  const i64 nod = ob1[0] - ob0[0], noh = ob1[1] - ob0[1], nw_out = ob1[2] - ob0[2];
  if (i64(acc.size()) < nw_out * Cg) acc.resize(nw_out * Cg);
  for (i64 row = r0; row < r1; ++row) {
    const i64 oh = ob0[1] + row % noh, od = ob0[0] + (row / noh) % nod, n = n0 + row / (noh * nod);
    const AxisPhase& pd = Ad.ph[od % Ad.s];
    const AxisPhase& ph = Ah.ph[oh % Ah.s];
    const i64 qd = od / Ad.s, qh = oh / Ah.s;
    std::fill(acc.begin(), acc.begin() + nw_out * Cg, T(0));  // [c][w] (KM) or [w][c] (MK)
    for (i64 td = 0; td < pd.T(); ++td) {
      const i64 id = qd + pd.soff[td];
      if (id < ib0[0] || id >= ib1[0]) continue;
      for (i64 th = 0; th < ph.T(); ++th) {
        const i64 ih = qh + ph.soff[th];
        if (ih < ib0[1] || ih >= ib1[1]) continue;
        const i64 jdh = (pd.widx[td] * kk[1] + ph.widx[th]) * kk[2];
        const i64 m0 = (((n - n0) * nid + (id - ib0[0])) * nih + (ih - ib0[1])) * niw - ib0[2];
        for (const AxisPhase& pw : Aw.ph) {
          const i64 rw = pw.dst_off;
          const i64 qa = std::max<i64>(0, ceil_div(ob0[2] - rw, Aw.s));
          const i64 qb = std::min<i64>(pw.Q, ceil_div(ob1[2] - rw, Aw.s));
          for (i64 tw = 0; tw < pw.T(); ++tw) {
            const i64 off = pw.soff[tw], j = jdh + pw.widx[tw];
            const i64 q0 = std::max(qa, ib0[2] - off), q1 = std::min(qb, ib1[2] - off);
            if (q0 >= q1) continue;
            if (!mk) {
              for (i64 c = 0; c < Cg; ++c) {
                const T* crow = C + (c * KK + j) * M + m0 + off;
                T* a = acc.data() + c * nw_out + rw - ob0[2];
                for (i64 q = q0; q < q1; ++q) a[q * Aw.s] += crow[q];
              }
            } else {
              for (i64 q = q0; q < q1; ++q) {
                const T* cv = C + (m0 + q + off) * CK + j;
                T* a = acc.data() + (q * Aw.s + rw - ob0[2]) * Cg;
                for (i64 c = 0; c < Cg; ++c) a[c] += cv[c * KK];
              }
            }
          }
        }
      }
    }
    T* y = Y.p + n * Y.st[0] + g * Cg * Y.st[1] + od * Y.st[2] + oh * Y.st[3] + ob0[2] * Y.st[4];
    T* pr = Pre.p ? Pre.p + n * Pre.st[0] + g * Cg * Pre.st[1] + od * Pre.st[2] +
                        oh * Pre.st[3] + ob0[2] * Pre.st[4]
                  : nullptr;
    auto one = [&](i64 c, i64 w) {
      const T v = (mk ? acc[w * Cg + c] : acc[c * nw_out + w]) + (bias ? bias[g * Cg + c] : T(0));
      y[c * Y.st[1] + w * Y.st[4]] = act_fn<T, ACT>(v, slope);
      if (pr) pr[c * Pre.st[1] + w * Pre.st[4]] = v;
    };
    if (Y.st[1] == 1)
      for (i64 w = 0; w < nw_out; ++w)
        for (i64 c = 0; c < Cg; ++c) one(c, w);
    else
      for (i64 c = 0; c < Cg; ++c)
        for (i64 w = 0; w < nw_out; ++w) one(c, w);
  }
}

template <typename T>
void col2im_dispatch(int act, const T* C, bool mk, i64 M, i64 CK, const View5<T>& Y,
                     const View5<T>& Pre, const T* bias, const Plan& P, i64 g, i64 Cg, i64 n0,
                     i64 r0, i64 r1, const i64 ob0[3], const i64 ob1[3], const i64 ib0[3],
                     const i64 ib1[3], const i64 kk[3], T slope, std::vector<T>& acc) {
  switch (act) {
#define KST_C2I(A) case A: return col2im_rows<T, A>(C, mk, M, CK, Y, Pre, bias, P, g, Cg, n0, r0, r1, ob0, ob1, ib0, ib1, kk, slope, acc);
    KST_C2I(RELU) KST_C2I(LEAKY) KST_C2I(SILU) KST_C2I(GELU) KST_C2I(GELU_TANH) KST_C2I(TANH)
    KST_C2I(SIGMOID)
#undef KST_C2I
    default: return col2im_rows<T, NONE>(C, mk, M, CK, Y, Pre, bias, P, g, Cg, n0, r0, r1, ob0, ob1, ib0, ib1, kk, slope, acc);
  }
}

// Runs f(begin, end) over [0, n): in parallel when `par`, else inline.
template <typename F>
void maybe_parallel(bool par, i64 n, F&& f) {
  if (par && n > 1) at::parallel_for(0, n, 1, f);
  else if (n > 0) f(0, n);
}

template <typename T>
void conv_gemm_first_impl(const at::Tensor& src_in, const at::Tensor& weight_in, const at::Tensor& bias,
                          at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, int act,
                          double slope) {
  const i64 N = src_in.size(0), Cin = src_in.size(1), Cout = dst.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  if (dst.numel() == 0) return;
  const at::Tensor weight = weight_in.contiguous();  // [Cin, (c_out, tap)] per group
  const i64 kk[3] = {weight.size(2), weight.size(3), weight.size(4)};
  const i64 KK = kk[0] * kk[1] * kk[2], CK = Cout_g * KK;
  // MK (pixels x channels) when the input is channels-last, or so small that making it so is
  // free; then the GEMM runs as brgemm tiles [pixels x Cin] x W[Cin, 64 columns] (float).
  const i64 in_img = P.ax[0].L_src * P.ax[1].L_src * P.ax[2].L_src;
  const bool mk = channels_last_like(src_in) || (in_img <= 64 && Cin_g >= 8);
  const at::Tensor src = mk ? to_channels_last<T>(src_in) : src_in;
  View5<const T> X(src);
  View5<T> Y(dst), Pre(pre);
  const T* bptr = bias.defined() ? bias.data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  brgemm_t brg = nullptr;
  if constexpr (std::is_same<T, float>::value) brg = blas().brgemm;
  const int nthreads = at::get_num_threads();
  const i64 capC = env_int("KSTCONV_C_CAP", i64(1) << 20);
  const i64 Mt_in = std::max<i64>(64, std::min<i64>(4096, capC / std::max<i64>(CK, 1)));
  // make_items counts destination pixels: about s^d of them per input pixel.
  const Items items = make_items(P, groups, N, Mt_in, nthreads, false);
  const i64 n_items = items.count();
  const bool outer_parallel = n_items >= nthreads && nthreads > 1;
  constexpr i64 NB = 64, MB = 32;

  auto run = [&](i64 begin, i64 end) {
    std::vector<T> cbuf, xbuf, acc;
    for (i64 item = begin; item < end; ++item) {
      const i64 per_g = items.nblk_n * items.nblk_o;
      const i64 g = item / per_g, bn = (item % per_g) / items.nblk_o, bo = item % items.nblk_o;
      const i64 n0 = bn * items.nb, n1 = std::min(N, n0 + items.nb);
      i64 ob0[3], ob1[3], ib0[3], ib1[3];
      for (int d = 0; d < 3; ++d) {
        ob0[d] = 0; ob1[d] = P.ax[d].L_dst;
        if (d == items.split) ob0[d] = bo * items.rows, ob1[d] = std::min(ob1[d], ob0[d] + items.rows);
        needed_inputs(P.ax[d], ob0[d], ob1[d], ib0[d], ib1[d]);
      }
      const i64 M = (n1 - n0) * (ib1[0] - ib0[0]) * (ib1[1] - ib0[1]) * (ib1[2] - ib0[2]);
      const i64 Mc = std::max<i64>(M, 1);
      if (i64(cbuf.size()) < CK * Mc) cbuf.resize(CK * Mc);
      if (M == 0 || Cin_g == 0) std::fill(cbuf.begin(), cbuf.begin() + CK * Mc, T(0));
      const T* wg = w + g * Cin_g * CK;
      T* C = cbuf.data();
      if (M > 0 && Cin_g > 0)
        for_each_source_run<T>(X, g, Cin_g, n0, n1, ib0, ib1, mk, xbuf,
                               [&](const T* xb, i64 ldx, i64 m0, i64 Mr) {
          if (!mk) {  // C[CK, m0:m0+Mr] = W[Cin_g, CK]^T x X[Cin_g, Mr]
            gemm_rm<T>(true, false, CK, Mr, Cin_g, T(1), wg, CK, xb, ldx, T(0), C + m0, M);
          } else if (!brg) {  // C[m0:m0+Mr, CK] = X[Mr, Cin_g] x W[Cin_g, CK]
            gemm_rm<T>(false, false, Mr, CK, Cin_g, T(1), xb, ldx, wg, CK, T(0), C + m0 * CK, CK);
          } else if constexpr (std::is_same<T, float>::value) {
            const i64 nbn = ceil_div(CK, NB), nbm = ceil_div(Mr, MB);
            maybe_parallel(!outer_parallel, nbn * nbm, [&](i64 t0, i64 t1) {
              for (i64 t = t0; t < t1; ++t) {
                const i64 bnn = t / nbm, bm = t % nbm;
                const i64 c0 = bnn * NB, r0 = bm * MB;
                brg(std::min(MB, Mr - r0), std::min(NB, CK - c0), Cin_g, ldx, CK, CK, false,
                    xb + r0 * ldx, wg + c0, C + (m0 + r0) * CK + c0, false);
              }
            });
          }
        });
      const i64 nrows = (n1 - n0) * (ob1[0] - ob0[0]) * (ob1[1] - ob0[1]);
      maybe_parallel(!outer_parallel, nrows, [&](i64 r0, i64 r1) {
        std::vector<T> acc_local;
        std::vector<T>& a = outer_parallel ? acc : acc_local;
        col2im_dispatch<T>(act, C, mk, M, CK, Y, Pre, bptr, P, g, Cout_g, n0, r0, r1, ob0, ob1,
                           ib0, ib1, kk, T(slope), a);
      });
    }
  };
  if (outer_parallel) at::parallel_for(0, n_items, 1, run);
  else run(0, n_items);
}

// A 1x1 input whose output is exactly the kernel footprint (stride/padding/dilation irrelevant:
// DCGAN's first layer, a latent vector to a k x k map): grad_out[n] viewed as [C_out * k^d] is
// the patch row of input pixel n. True when the grad_input plan reads tap t at position t.
inline bool dense_one_pixel(const Plan& GI, const at::Tensor& dy) {
  for (int d = 0; d < 3; ++d) {
    const Axis& A = GI.ax[d];
    if (A.ph.size() != 1 || A.ph[0].Q != 1 || A.L_src != A.ph[0].T()) return false;
    for (i64 t = 0; t < A.ph[0].T(); ++t)
      if (A.ph[0].soff[t] != t) return false;
  }
  const i64 W = dy.size(4), H = dy.size(3), D = dy.size(2);
  return dy.stride(4) == 1 && dy.stride(3) == W && dy.stride(2) == H * W &&
         dy.stride(1) == D * H * W;
}

// grad_input for weight-heavy layers (few pixels, big weight): dX[c_in, i] = W[c_in, (c_out,
// tap)] x P[(c_out, tap), i], P the patch matrix of grad_out in the weight's own order (all taps,
// zero where outside). The weight is read in place, once, in row blocks split across threads
// (brgemm tiles, f32) instead of being packed and re-streamed per output row.
template <typename T>
void grad_input_weight_streaming_impl(const at::Tensor& dy, const at::Tensor& weight_in,
                                      at::Tensor& dx, const Plan& GI, i64 groups) {
  const i64 N = dy.size(0), Cout = dy.size(1), Cin = dx.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  if (dx.numel() == 0) return;
  const at::Tensor weight = weight_in.contiguous();
  const i64 KK = weight.size(2) * weight.size(3) * weight.size(4), CK = Cout_g * KK;
  View5<const T> DY(dy);
  const at::Tensor none;
  View5<T> DX(dx), NoPre(none);
  const T* w = weight.data_ptr<T>();
  if (dense_one_pixel(GI, dy) && DX.st[1] == 1) {
    // dX[n, c_in] = grad_out[n, (c_out, tap)] x W[c_in, (c_out, tap)]^T, one GEMM per group
    for (i64 g = 0; g < groups; ++g)
      gemm_rm<T>(false, true, N, Cin_g, CK, T(1), DY.p + g * Cout_g * KK, DY.st[0],
                 w + g * Cin_g * CK, CK, T(0), DX.p + g * Cin_g, DX.st[0]);
    return;
  }
  brgemm_t brg = nullptr;
  if constexpr (std::is_same<T, float>::value) brg = blas().brgemm;
  const int nthreads = at::get_num_threads();
  const i64 Mt = std::max<i64>(16, std::min<i64>(1024, env_int("KSTCONV_COLS_CAP", i64(1) << 21) / std::max<i64>(CK, 1)));
  const Items items = make_items(GI, groups, N, Mt, nthreads, false);
  const i64 n_items = items.count();
  const bool outer_parallel = n_items >= nthreads && nthreads > 1;
  constexpr i64 MB = 32, KB = 512;
  auto run = [&](i64 begin, i64 end) {
    std::vector<T> cols, cbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(GI, items, item, [&](const Block& b0) {
        const Block b = every_tap(GI, b0);
        const i64 M = b.M();
        if (M == 0) return;
        if (i64(cols.size()) < CK * M) cols.resize(CK * M);
        if (i64(cbuf.size()) < Cin_g * M) cbuf.resize(Cin_g * M);
        if (CK > 0) im2col<T>(DY, GI, b, Cout_g, false, cols.data(), true);  // [CK, M]
        const T* wg = w + b.g * Cin_g * CK;
        if (brg == nullptr || CK == 0) {  // C[Cin_g, M] = W[Cin_g, CK] x P[CK, M]
          gemm_rm<T>(false, false, Cin_g, M, CK, T(1), wg, CK, cols.data(), M, T(0), cbuf.data(), M);
        } else if constexpr (std::is_same<T, float>::value) {
          maybe_parallel(!outer_parallel, ceil_div(Cin_g, MB), [&](i64 t0, i64 t1) {
            for (i64 t = t0; t < t1; ++t) {
              const i64 r0 = t * MB, mr = std::min(MB, Cin_g - r0);
              for (i64 k0 = 0; k0 < CK; k0 += KB)
                brg(mr, M, std::min(KB, CK - k0), CK, M, M, k0 > 0, wg + r0 * CK + k0,
                    cols.data() + k0 * M, cbuf.data() + r0 * M, false);
            }
          });
        }
        scatter<T, NONE>(cbuf.data(), false, DX, NoPre, nullptr, GI, b, Cin_g, T(0));
      });
    }
  };
  if (outer_parallel) at::parallel_for(0, n_items, 1, run);
  else run(0, n_items);
}

// grad_weight in the same order: dW[c_in, (c_out, tap)] = sum over input pixels of
// x[c_in, i] * grad_out[c_out, i*s - p + tap*d], i.e. the input itself times a patch matrix of
// grad_out (the grad_input plan's gather, all taps, zero where outside). The result lands in the
// weight's own layout.
template <typename T>
void grad_weight_gemm_first_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                                 const Plan& GI, i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  const i64 KK = dw.size(2) * dw.size(3) * dw.size(4), CK = Cout_g * KK;
  TORCH_CHECK(GI.ax[0].ph[0].T() * GI.ax[1].ph[0].T() * GI.ax[2].ph[0].T() == KK,
              "kstconv: grad_weight plan must keep every tap");
  View5<const T> X(x), DY(dy);
  const bool mk = channels_last_like(x);
  const i64 total = std::max<i64>(groups * Cin_g * CK, 1);
  const int nthreads = at::get_num_threads();
  const i64 Mt = std::max<i64>(64, std::min<i64>(4096, env_int("KSTCONV_COLS_CAP", i64(1) << 21) / std::max<i64>(CK, 1)));
  const Items items = make_items(GI, groups, N, Mt, nthreads, false);
  const i64 n_items = (x.numel() == 0 || dy.numel() == 0) ? 0 : items.count();
  const bool outer_parallel = n_items >= nthreads && nthreads > 1;
  T* out = dw.data_ptr<T>();
  if (dense_one_pixel(GI, dy) && X.st[1] == 1 && x.numel() > 0 && dy.numel() > 0) {
    // dW[c_in, (c_out, tap)] = x[n, c_in]^T x grad_out[n, (c_out, tap)], one GEMM per group
    for (i64 g = 0; g < groups; ++g)
      gemm_rm<T>(true, false, Cin_g, CK, N, T(1), X.p + g * Cin_g, X.st[0],
                 DY.p + g * Cout_g * KK, DY.st[0], T(0), out + g * Cin_g * CK, CK);
    return;
  }
  // Thread 0 accumulates straight into dW; other threads into private copies added at the end
  // in thread order (deterministic for a given thread count).
  std::fill(out, out + dw.numel(), T(0));
  std::vector<std::vector<T>> accs(outer_parallel ? nthreads : 1);
  const bool mk_dy = channels_last_like(dy);

  auto run = [&](i64 begin, i64 end) {
    const int tid = outer_parallel ? at::get_thread_num() : 0;
    T* acc = out;
    if (tid > 0) {
      if (accs[tid].empty()) accs[tid].assign(total, T(0));
      acc = accs[tid].data();
    }
    std::vector<T> cols, xbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(GI, items, item, [&](const Block& b0) {
        const Block b = every_tap(GI, b0);
        const i64 M = b.M();
        if (M == 0 || Cin_g == 0 || CK == 0) return;
        if (i64(cols.size()) < CK * M) cols.resize(CK * M);
        im2col<T>(DY, GI, b, Cout_g, mk_dy, cols.data(), true);  // rows (c_out, tap)
        T* ag = acc + b.g * Cin_g * CK;
        // dW[Cin_g, CK] += X[Cin_g, m] x cols[CK, m]^T, run by run (X is [m, Cin_g] when mk,
        // cols is [m, CK] when mk_dy)
        for_each_source_run<T>(X, b.g, Cin_g, b.n0, b.n1, b.q0, b.q1, mk, xbuf,
                               [&](const T* xb, i64 ldx, i64 m0, i64 Mr) {
          const T* cb = mk_dy ? cols.data() + m0 * CK : cols.data() + m0;
          gemm_rm<T>(mk, !mk_dy, Cin_g, CK, Mr, T(1), xb, ldx, cb, mk_dy ? CK : M, T(1), ag, CK);
        });
      });
    }
  };
  if (n_items > 0) {
    if (outer_parallel) at::parallel_for(0, n_items, 1, run);
    else run(0, n_items);
  }
  for (size_t t = 1; t < accs.size(); ++t) {
    if (accs[t].empty()) continue;
    const T* a = accs[t].data();
    for (i64 i = 0; i < dw.numel(); ++i) out[i] += a[i];
  }
}

// grad_weight with brgemm, no patch matrix: for phase p and tap t,
//   dWt[c_out, c_in] = sum over pixels q of the phase  D_p[c_out, q] x X[q + offset(t), c_in]
// with D_p the phase's grad_out de-interleaved into planes of rows (c_out-major, pixels
// contiguous) and X a channels-last copy of the input. Both share one padded row width Wc (zero
// columns beyond the real ones), so a run of whole rows is one reduction of rows x Wc pixels
// (the zero columns of D_p cancel whatever the shifted X rows hold there). Work items are
// (group, phase, block of c_out): each owns its slice of dW and reduces over batch and space in
// a fixed order, so the result does not depend on the number of threads.
void grad_weight_brgemm_impl(const at::Tensor& x_in, const at::Tensor& dy, at::Tensor& dw,
                             const Plan& P, i64 groups) {
  const i64 N = x_in.size(0), Cin = x_in.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  float* out = dw.data_ptr<float>();
  std::fill(out, out + dw.numel(), 0.f);
  if (x_in.numel() == 0 || dy.numel() == 0 || Cin_g == 0 || Cout_g == 0) return;
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 kk[3] = {dw.size(2), dw.size(3), dw.size(4)};
  // common padded width
  i64 padL = 0, padR = 0, Qw_max = 0;
  for (const AxisPhase& ph : Aw.ph) {
    Qw_max = std::max(Qw_max, ph.Q);
    for (i64 off : ph.soff) {
      padL = std::max(padL, -off);
      padR = std::max(padR, ph.Q - 1 + off - (Aw.L_src - 1));
    }
  }
  const i64 Wc = std::max(Aw.L_src + padL + padR, Qw_max);
  const i64 D = Ad.L_src, H = Ah.L_src, Hx = H + 1;  // one zero row below every plane
  // X: [N, D, Hx, Wc, Cin] channels-last, real pixels at rows [0, H), columns [padL, padL + W)
  // (buffers are not zero-filled up front: every element is written once, by the thread
  // that owns its row, so that the pages are touched in parallel)
  std::unique_ptr<float[]> xs(new float[std::max<i64>(1, N * D * Hx * Wc * Cin)]);
  {
    View5<const float> Xv(x_in);
    at::parallel_for(0, N * D * H, 1, [&](i64 b0, i64 b1) {
      for (i64 r = b0; r < b1; ++r) {
        const i64 n = r / (D * H), d = (r / H) % D, h = r % H;
        float* row0 = xs.get() + (((n * D + d) * Hx + h) * Wc) * Cin;
        std::fill(row0, row0 + padL * Cin, 0.f);
        std::fill(row0 + (padL + Aw.L_src) * Cin, row0 + (h == H - 1 ? 2 : 1) * Wc * Cin, 0.f);
        row_to_channels_last(Xv.p + n * Xv.st[0] + d * Xv.st[2] + h * Xv.st[3], Xv.st[1],
                             Xv.st[4], Cin, Aw.L_src, row0 + padL * Cin);
      }
    });
  }
  // D_p: per phase [N, Cout, Qd, Qh, Wc] (grad_out at positions s*q + r), zero beyond Qw
  std::vector<i64> doff(P.P + 1, 0);
  for (i64 p = 0; p < P.P; ++p) {
    i64 c3[3];
    P.phase_coords(p, c3);
    doff[p + 1] = doff[p] + N * Cout * Ad.ph[c3[0]].Q * Ah.ph[c3[1]].Q * Wc;
  }
  std::unique_ptr<float[]> ds(new float[std::max<i64>(1, doff[P.P])]);
  {
    // one pass over grad_out, row by row: each row (n, c, od, oh) splits into its w phases
    View5<const float> Yv(dy);
    const i64 nph_d = i64(Ad.ph.size()), nph_h = i64(Ah.ph.size()), nph_w = i64(Aw.ph.size());
    const bool split2 = nph_w == 2 && Aw.s == 2 && Yv.st[4] == 1 && Aw.ph[0].dst_off == 0 &&
                        Aw.ph[1].dst_off == 1 && have_avx2();
    at::parallel_for(0, N * Cout * Ad.L_dst * Ah.L_dst, 1, [&](i64 b0, i64 b1) {
      for (i64 b = b0; b < b1; ++b) {
        const i64 oh = b % Ah.L_dst, od = (b / Ah.L_dst) % Ad.L_dst;
        const i64 c = (b / (Ah.L_dst * Ad.L_dst)) % Cout, n = b / (Ah.L_dst * Ad.L_dst * Cout);
        const i64 rd = od % Ad.s, qd = od / Ad.s, rh = oh % Ah.s, qh = oh / Ah.s;
        const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh];
        if (qd >= pd.Q || qh >= ph.Q) continue;
        const float* yr = Yv.p + n * Yv.st[0] + c * Yv.st[1] + od * Yv.st[2] + oh * Yv.st[3];
        if (split2) {  // stride 2 along w, unit pixel stride: both phases in one pass
          const i64 p0 = (rd * nph_h + rh) * nph_w;
          const i64 row = (((n * Cout + c) * pd.Q + qd) * ph.Q + qh) * Wc;
          float* o0 = ds.get() + doff[p0] + row;
          float* o1 = ds.get() + doff[p0 + 1] + row;
          const i64 q0 = Aw.ph[0].Q, q1 = Aw.ph[1].Q;
          const i64 done = deinterleave2(yr, std::min(q0, q1), o0, o1);
          for (i64 qw = done; qw < q0; ++qw) o0[qw] = yr[2 * qw];
          for (i64 qw = done; qw < q1; ++qw) o1[qw] = yr[2 * qw + 1];
          std::fill(o0 + q0, o0 + Wc, 0.f);
          std::fill(o1 + q1, o1 + Wc, 0.f);
          continue;
        }
        for (i64 rw = 0; rw < nph_w; ++rw) {
          const i64 p = (rd * nph_h + rh) * nph_w + rw;
          float* o = ds.get() + doff[p] + (((n * Cout + c) * pd.Q + qd) * ph.Q + qh) * Wc;
          std::fill(o + Aw.ph[rw].Q, o + Wc, 0.f);
          const AxisPhase& pw = Aw.ph[rw];
          const float* y = yr + pw.dst_off * Yv.st[4];
          const i64 ws = Aw.s * Yv.st[4];
          if (ws == 2)
            for (i64 qw = 0; qw < pw.Q; ++qw) o[qw] = y[2 * qw];
          else
            for (i64 qw = 0; qw < pw.Q; ++qw) o[qw] = y[qw * ws];
        }
      }
    });
    (void)nph_d;
  }
  const brgemm_t brg = blas().brgemm;
  // Item tiles: c_out rows x c_in columns, no narrower than 32 (brgemm runs at half speed on
  // 16-wide tiles); when that leaves fewer than kItems tiles, the batch is split into a fixed
  // number of ranges whose partial sums are added in a fixed order afterwards (deterministic,
  // and independent of the thread count).
  constexpr i64 kItems = 8;
  i64 MB = 64, NB = std::min<i64>(Cin_g, 128);
  while (groups * ceil_div(Cout_g, MB) * ceil_div(Cin_g, NB) < kItems && (MB > 32 || NB > 32)) {
    if (NB >= MB && NB > 32) NB /= 2;
    else MB /= 2;
  }
  const i64 KB = env_int("KSTCONV_WGRAD_KB", 256);  // pixels per reduction step
  const i64 nmb = ceil_div(Cout_g, MB), nnb = ceil_div(Cin_g, NB);
  const i64 tiles = groups * nmb * nnb;
  const i64 nsplit = std::max<i64>(1, std::min<i64>(N, ceil_div(kItems, tiles)));
  const i64 KKt = kk[0] * kk[1] * kk[2], ci_stride = Cout_g * KKt;
  const i64 tile_elems = KKt * MB * NB;
  // partial sums of split > 0 wait here; split 0 of every tile writes dW directly at the end
  std::vector<float> part(nsplit > 1 ? tiles * nsplit * tile_elems : 0);
  auto tile_of = [&](i64 t, i64& g, i64& co0, i64& mco, i64& ci0, i64& nci) {
    g = t / (nmb * nnb);
    const i64 mb = (t / nnb) % nmb, nb = t % nnb;
    co0 = mb * MB, mco = std::min(MB, Cout_g - co0);
    ci0 = nb * NB, nci = std::min(NB, Cin_g - ci0);
  };
  // acc[j][co][ci] -> dW[g*Cin_g + ci0 + ci, co0 + co, j]: whole rows of KK taps at a time
  auto write_tile = [&](i64 t, const float* acc) {
    i64 g, co0, mco, ci0, nci;
    tile_of(t, g, co0, mco, ci0, nci);
    for (i64 ci = 0; ci < nci; ++ci)
      for (i64 co = 0; co < mco; ++co) {
        float* o = out + (g * Cin_g + ci0 + ci) * ci_stride + (co0 + co) * KKt;
        const float* a = acc + co * nci + ci;
        for (i64 j = 0; j < KKt; ++j) o[j] = a[j * mco * nci];
      }
  };
  at::parallel_for(0, tiles * nsplit, 1, [&](i64 b0, i64 b1) {
    std::vector<float> own;   // [kernel tap][c_out][c_in] of the item
    for (i64 it = b0; it < b1; ++it) {
      const i64 t = it / nsplit, sp = it % nsplit;
      i64 g, co0, mco, ci0, nci;
      tile_of(t, g, co0, mco, ci0, nci);
      const i64 n0 = N * sp / nsplit, n1 = N * (sp + 1) / nsplit;
      float* acc;
      if (nsplit > 1) {
        acc = part.data() + it * tile_elems;
      } else {
        own.resize(tile_elems);
        acc = own.data();
      }
      std::fill(acc, acc + KKt * mco * nci, 0.f);
      for (i64 p = 0; p < P.P; ++p) {
        i64 c3[3];
        P.phase_coords(p, c3);
        const AxisPhase &pd = Ad.ph[c3[0]], &ph = Ah.ph[c3[1]], &pw = Aw.ph[c3[2]];
        if (pd.T() * ph.T() * pw.T() == 0 || pd.Q * ph.Q * pw.Q == 0) continue;
        const i64 plane = ph.Q * Wc;  // one (n, c, qd) plane of D_p, rows of Wc pixels
        // The plane is reduced in chunks of KB consecutive pixels (rows are contiguous in both
        // operands, so any range is one strided matrix); each tap takes the part of the chunk
        // whose rows meet real input rows.
        for (i64 n = n0; n < n1; ++n)
          for (i64 qd = 0; qd < pd.Q; ++qd)
            for (i64 k0 = 0; k0 < plane; k0 += KB) {
              const i64 k1 = std::min(plane, k0 + KB);
              const float* A0 = ds.get() + doff[p] +
                                ((n * Cout + g * Cout_g + co0) * pd.Q + qd) * plane;
              for (i64 td = 0; td < pd.T(); ++td) {
                const i64 sd = qd + pd.soff[td];
                if (sd < 0 || sd >= D) continue;
                const float* Xplane = xs.get() + ((n * D + sd) * Hx) * Wc * Cin + g * Cin_g + ci0;
                for (i64 th = 0; th < ph.T(); ++th) {
                  // rows qh with 0 <= qh + offset < H
                  const i64 a = std::max(k0, std::max<i64>(0, -ph.soff[th]) * Wc);
                  const i64 b = std::min(k1, std::min(ph.Q, H - ph.soff[th]) * Wc);
                  if (a >= b) continue;
                  for (i64 tw = 0; tw < pw.T(); ++tw) {
                    const i64 j = (pd.widx[td] * kk[1] + ph.widx[th]) * kk[2] + pw.widx[tw];
                    const float* B = Xplane + (a + ph.soff[th] * Wc + pw.soff[tw] + padL) * Cin;
                    brg(mco, nci, b - a, pd.Q * plane, Cin, nci, true, A0 + a, B,
                        acc + j * mco * nci, false);
                  }
                }
              }
            }
      }
      if (nsplit == 1) write_tile(t, acc);
    }
  });
  if (nsplit > 1)
    at::parallel_for(0, tiles, 1, [&](i64 t0, i64 t1) {
      for (i64 t = t0; t < t1; ++t) {
        float* sum = part.data() + t * nsplit * tile_elems;
        for (i64 sp = 1; sp < nsplit; ++sp) {  // fixed order: split 0, 1, 2, ...
          const float* a = sum + sp * tile_elems;
          for (i64 e = 0; e < tile_elems; ++e) sum[e] += a[e];
        }
        write_tile(t, sum);
      }
    });
}

// --------------------------------------------------------------------------- joint backward
// grad_input, grad_weight and grad_bias in one pass over grad_out, with no channels-last copy of
// it in memory. Work runs over input rows (n, id, ih). Input row i reads, for kernel taps (kd, kh),
// grad_out rows o = s*i - p + k*dil; those rows are transposed to channels-last (zero columns on
// both sides of w) into a small per-thread cache of rows, where consecutive input rows find the
// ones they share. From the cached rows, along w (taps kw, input pixels iw):
//   grad_input:  dX[iw, ci]  += G[s*iw - p + kw*dil, co] x Wd[kd, kh][(kw, co), ci]
//                (A read in place at lda = s * C_out; with dil_w = 1 and one group the kw taps of a
//                pixel are one contiguous run, a single reduction of kw * C_out)
//   grad_weight: dW[kd, kh][ci, (kw, co)] += X[ci, iw] x G[s*iw - p + kw*dil, co]
//                (X read in place: its rows of w are contiguous; the reduction runs over the row)
//   grad_bias:   each grad_out row is summed once (in double), by the input row that "owns" it
//                (od in [s*id, s*id + s), the last input row owning the tail), from the cache
//                when it is there, else from grad_out itself.
// Determinism: the input rows are cut into a fixed number of ranges (independent of the thread
// count), each with its own dW / db accumulators, added in range order at the end.
// geo: per axis (d, h, w) L_in, L_out, k, s, p, dil.
struct JointGeo {
  i64 L[3], Lo[3], k[3], s[3], p[3], dil[3];
  explicit JointGeo(const std::vector<i64>& g) {
    TORCH_CHECK(g.size() == 18, "kstconv: joint backward geometry needs 18 entries");
    for (int d = 0; d < 3; ++d) {
      L[d] = g[6 * d]; Lo[d] = g[6 * d + 1]; k[d] = g[6 * d + 2];
      s[d] = g[6 * d + 3]; p[d] = g[6 * d + 4]; dil[d] = g[6 * d + 5];
    }
  }
  i64 padlo() const { return std::max<i64>(0, p[2]); }
  i64 padhi() const {
    return std::max<i64>(0, s[2] * (L[2] - 1) + (k[2] - 1) * dil[2] - p[2] - (Lo[2] - 1));
  }
  i64 row_width() const { return padlo() + Lo[2] + padhi(); }
  // cached rows: every (od, oh) of one input row maps to its own slot, and the rows that the
  // next input row along h shares stay put
  i64 slots_d() const { return (k[0] - 1) * dil[0] + 1; }
  i64 slots_h() const { return (k[1] - 1) * dil[1] + 1 + s[1]; }
};

// Fixed number of row ranges (accumulator sets) of the joint backward.
constexpr i64 kJointSplits = 16;

// Whether the joint backward can run (f32 with brgemm, a row cache and per-range weight
// accumulators of bounded size) and, unless `any`, whether it should (rules read off the suite,
// perf/results).
bool joint_backward_fits(const JointGeo& G, const at::Tensor& x, const at::Tensor& dy,
                         const at::Tensor& weight, i64 groups, bool any) {
  if (x.scalar_type() != at::kFloat || !blas().brgemm) return false;
  if (x.numel() == 0 || dy.numel() == 0 || weight.numel() == 0) return false;
  const i64 Cout = dy.size(1), Cin_g = x.size(1) / groups, Cout_g = Cout / groups;
  const i64 cache = G.slots_d() * G.slots_h() * G.row_width() * Cout * 4;
  const i64 wbytes = weight.numel() * 4;
  if (cache > (i64(1) << 20) || wbytes * kJointSplits > (i64(64) << 20)) return false;
  if (any) return true;
  // The grad_weight tile of one (kd, kh), [c_in, kw x c_out], is re-read and re-written by every
  // input row: it has to stay in L2 (beyond ~128 KiB the separate passes won on the suite, see
  // README "CPU engine"); rows of fewer than 8 pixels make too short a reduction.
  const i64 tile = Cin_g * G.k[2] * Cout_g * 4;
  return G.L[2] >= 8 && Cin_g >= 8 && Cout_g >= 8 && cache <= (i64(512) << 10) &&
         tile <= (i64(128) << 10);
}

void joint_backward_impl(const at::Tensor& x_in, const at::Tensor& dy, const at::Tensor& weight,
                         at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const JointGeo& G,
                         i64 groups) {
  const bool want_dx = dx.defined(), want_dw = dw.defined(), want_db = db.defined();
  const i64 N = x_in.size(0), Cin = x_in.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  const i64 D = G.L[0], H = G.L[1], W = G.L[2], Do = G.Lo[0], Ho = G.Lo[1], Wo = G.Lo[2];
  const i64 KD = G.k[0], KH = G.k[1], KW = G.k[2];
  const i64 padlo = G.padlo(), Wp = G.row_width(), RD = G.slots_d(), RH = G.slots_h();
  const i64 row_elems = Wp * Cout;
  // grad_weight reads rows of x along w in place
  const bool rows_in_place = x_in.stride(4) == 1 && (Cin == 1 || x_in.stride(1) >= W);
  const at::Tensor x = (want_dw && !rows_in_place) ? x_in.contiguous() : x_in;
  View5<const float> X(x), Y(dy);
  View5<float> DX(dx);
  // one reduction over the kw taps of a pixel when they are adjacent in the cached row
  const bool merge_kw = G.dil[2] == 1 && groups == 1;
  // Wd[g][kd][kh][kw][co][ci] for grad_input (B operand, ci contiguous)
  std::vector<float> wd;
  if (want_dx) {
    wd.resize(weight.numel());
    View5<const float> Wv(weight);
    for (i64 g = 0; g < groups; ++g)
      for (i64 kd = 0; kd < KD; ++kd)
        for (i64 kh = 0; kh < KH; ++kh)
          for (i64 kw = 0; kw < KW; ++kw)
            for (i64 co = 0; co < Cout_g; ++co) {
              float* o = wd.data() + ((((g * KD + kd) * KH + kh) * KW + kw) * Cout_g + co) * Cin_g;
              const float* w = Wv.p + (g * Cin_g) * Wv.st[0] + co * Wv.st[1] + kd * Wv.st[2] +
                               kh * Wv.st[3] + kw * Wv.st[4];
              for (i64 ci = 0; ci < Cin_g; ++ci) o[ci] = w[ci * Wv.st[0]];
            }
  }
  const i64 rows = N * D * H;
  const i64 S = std::min<i64>(rows, kJointSplits);
  const i64 dw_elems = groups * KD * KH * Cin_g * KW * Cout_g;  // [g][kd][kh][ci][kw][co]
  std::vector<float> dwacc(want_dw ? S * dw_elems : 0, 0.f);
  std::vector<double> dbacc(want_db ? S * Cout : 0, 0.0);
  const brgemm_t brg = blas().brgemm;
  const i64 MT = std::max<i64>(8, std::min<i64>(64, (i64(8) << 10) / Cin_g));

  at::parallel_for(0, S, 1, [&](i64 sp0, i64 sp1) {
    std::vector<float> cache(RD * RH * row_elems);
    std::vector<i64> tag(RD * RH);
    std::vector<float> acc(MT * Cin_g);
    for (i64 sp = sp0; sp < sp1; ++sp) {
      std::fill(tag.begin(), tag.end(), i64(-1));
      float* dwa = want_dw ? dwacc.data() + sp * dw_elems : nullptr;
      double* dba = want_db ? dbacc.data() + sp * Cout : nullptr;
      // the cached channels-last row of grad_out (n, od, oh), transposed on a miss
      auto row_of = [&](i64 n, i64 od, i64 oh) -> const float* {
        const i64 slot = (od % RD) * RH + (oh % RH), id = (n * Do + od) * Ho + oh;
        float* r = cache.data() + slot * row_elems;
        if (tag[slot] == id) return r;
        tag[slot] = id;
        std::fill(r, r + padlo * Cout, 0.f);
        std::fill(r + (padlo + Wo) * Cout, r + row_elems, 0.f);
        row_to_channels_last(Y.p + n * Y.st[0] + od * Y.st[2] + oh * Y.st[3], Y.st[1], Y.st[4],
                             Cout, Wo, r + padlo * Cout);
        return r;
      };
      const i64 r0 = rows * sp / S, r1 = rows * (sp + 1) / S;
      std::vector<const float*> rp(KD * KH);
      for (i64 rr = r0; rr < r1; ++rr) {
        const i64 ih = rr % H, id = (rr / H) % D, n = rr / (H * D);
        bool any = false;
        for (i64 kd = 0; kd < KD; ++kd) {
          const i64 od = G.s[0] * id - G.p[0] + kd * G.dil[0];
          for (i64 kh = 0; kh < KH; ++kh) {
            const i64 oh = G.s[1] * ih - G.p[1] + kh * G.dil[1];
            const bool ok = od >= 0 && od < Do && oh >= 0 && oh < Ho;
            rp[kd * KH + kh] = ok ? row_of(n, od, oh) : nullptr;
            any = any || ok;
          }
        }
        if (want_db) {  // the grad_out rows this input row owns
          const i64 d0 = G.s[0] * id, d1 = id == D - 1 ? Do : std::min(Do, d0 + G.s[0]);
          const i64 h0 = G.s[1] * ih, h1 = ih == H - 1 ? Ho : std::min(Ho, h0 + G.s[1]);
          for (i64 od = d0; od < d1; ++od)
            for (i64 oh = h0; oh < h1; ++oh) {
              const i64 slot = (od % RD) * RH + (oh % RH);
              if (tag[slot] == (n * Do + od) * Ho + oh) {
                const float* r = cache.data() + slot * row_elems + padlo * Cout;
                for (i64 w = 0; w < Wo; ++w)
                  for (i64 c = 0; c < Cout; ++c) dba[c] += r[w * Cout + c];
              } else {
                const float* y = Y.p + n * Y.st[0] + od * Y.st[2] + oh * Y.st[3];
                for (i64 c = 0; c < Cout; ++c) {
                  double sum = 0.0;
                  for (i64 w = 0; w < Wo; ++w) sum += y[c * Y.st[1] + w * Y.st[4]];
                  dba[c] += sum;
                }
              }
            }
        }
        for (i64 g = 0; g < groups; ++g) {
          if (want_dw && any) {
            const float* A = X.p + n * X.st[0] + g * Cin_g * X.st[1] + id * X.st[2] + ih * X.st[3];
            for (i64 kd = 0; kd < KD; ++kd)
              for (i64 kh = 0; kh < KH; ++kh) {
                const float* r = rp[kd * KH + kh];
                if (!r) continue;
                float* C = dwa + ((g * KD + kd) * KH + kh) * Cin_g * KW * Cout_g;
                const float* B = r + (padlo - G.p[2]) * Cout + g * Cout_g;
                if (merge_kw)
                  brg(Cin_g, KW * Cout_g, W, X.st[1], G.s[2] * Cout, KW * Cout_g, true, A, B, C,
                      false);
                else
                  for (i64 kw = 0; kw < KW; ++kw)
                    brg(Cin_g, Cout_g, W, X.st[1], G.s[2] * Cout, KW * Cout_g, true, A,
                        B + kw * G.dil[2] * Cout, C + kw * Cout_g, false);
              }
          }
          if (!want_dx) continue;
          for (i64 iw0 = 0; iw0 < W; iw0 += MT) {
            const i64 mt = std::min(MT, W - iw0);
            bool first = true;
            for (i64 kd = 0; kd < KD; ++kd)
              for (i64 kh = 0; kh < KH; ++kh) {
                const float* r = rp[kd * KH + kh];
                if (!r) continue;
                const float* A = r + (G.s[2] * iw0 - G.p[2] + padlo) * Cout + g * Cout_g;
                const float* B = wd.data() + ((g * KD + kd) * KH + kh) * KW * Cout_g * Cin_g;
                if (merge_kw) {
                  brg(mt, Cin_g, KW * Cout_g, G.s[2] * Cout, Cin_g, Cin_g, !first, A, B,
                      acc.data(), false);
                  first = false;
                } else {
                  for (i64 kw = 0; kw < KW; ++kw) {
                    brg(mt, Cin_g, Cout_g, G.s[2] * Cout, Cin_g, Cin_g, !first,
                        A + kw * G.dil[2] * Cout, B + kw * Cout_g * Cin_g, acc.data(), false);
                    first = false;
                  }
                }
              }
            store_tile<NONE>(first ? nullptr : acc.data(), Cin_g, 1, mt, Cin_g, DX, View5<float>(at::Tensor()),
                             nullptr, n, g * Cin_g, id, ih, iw0, 1, 0.f);
          }
        }
      }
    }
  });
  // the ranges' partial sums, in range order
  if (want_dw) {
    View5<float> DW(dw);
    at::parallel_for(0, groups * Cin_g, 1, [&](i64 b0, i64 b1) {
      for (i64 gc = b0; gc < b1; ++gc) {
        const i64 g = gc / Cin_g, ci = gc % Cin_g;
        for (i64 kd = 0; kd < KD; ++kd)
          for (i64 kh = 0; kh < KH; ++kh)
            for (i64 kw = 0; kw < KW; ++kw)
              for (i64 co = 0; co < Cout_g; ++co) {
                const i64 e = ((((g * KD + kd) * KH + kh) * Cin_g + ci) * KW + kw) * Cout_g + co;
                float sum = 0.f;
                for (i64 sp = 0; sp < S; ++sp) sum += dwacc[sp * dw_elems + e];
                DW.p[(g * Cin_g + ci) * DW.st[0] + co * DW.st[1] + kd * DW.st[2] + kh * DW.st[3] +
                     kw * DW.st[4]] = sum;
              }
      }
    });
  }
  if (want_db) {
    float* o = db.data_ptr<float>();
    for (i64 c = 0; c < Cout; ++c) {
      double sum = 0.0;
      for (i64 sp = 0; sp < S; ++sp) sum += dbacc[sp * Cout + c];
      o[c] = float(sum);
    }
  }
}

// --------------------------------------------------------------------------- choosing the order
// Cost, in passes over one element of memory, of the two orders; a multiply-add counts as
// 1/kFlopsPerPass of a pass. Patch-first (A) writes a patch matrix of the input per phase, which
// MKL then packs again; GEMM-first (B) writes C = W^T x (c_out * k^d per input pixel) and the
// gather reads it once, but multiplies the taps that fall outside the output too.
struct OrderCost {
  double a, b;
};

inline double valid_pairs(const Axis& A) {  // sum over phases and q of the valid taps
  double v = 0;
  for (const AxisPhase& ph : A.ph)
    for (i64 q = 0; q < ph.Q; ++q)
      for (i64 off : ph.soff) v += (A.a * q + off >= 0 && A.a * q + off < A.L_src);
  return v;
}

OrderCost order_cost(const Plan& P, i64 N, i64 Cin_g, i64 Cout_g, i64 groups, const i64 kk[3]) {
  const double fpp = double(env_int("KSTCONV_FLOPS_PER_PASS", 24));
  double pairs = N * double(groups), in_px = N * double(groups), out_px = N * double(groups);
  for (int d = 0; d < 3; ++d) {
    pairs *= valid_pairs(P.ax[d]);
    in_px *= double(P.ax[d].L_src);
    out_px *= double(P.ax[d].L_dst);
  }
  const double KK = double(kk[0] * kk[1] * kk[2]);
  OrderCost c;
  c.a = 3.0 * Cin_g * pairs + 2.0 * Cout_g * out_px + 2.0 * Cin_g * Cout_g * pairs / fpp;
  c.b = 2.0 * Cout_g * KK * in_px + Cin_g * in_px + Cout_g * out_px +
        2.0 * Cin_g * Cout_g * KK * in_px / fpp;
  return c;
}

// The method for forward (swap=false) or grad_input (swap=true); see README "CPU engine".
//   1: phase patch matrix x BLAS          2: GEMM first, then per-phase gather (forward only)
//   3: implicit GEMM, brgemm, MK tiles     4: implicit GEMM, brgemm, KM tiles (input read in place)
//   5: phase patch matrix (channels-last) x brgemm tiles
// Rules read off the real-layer suite on a 2-core Zen 4 (perf/results): brgemm paths need f32.
int choose_conv_method(const Plan& P, const at::Tensor& src, const at::Tensor& dst,
                       const at::Tensor& weight, i64 groups, bool swap) {
  const i64 Csrc_g = src.size(1) / groups, Cdst_g = dst.size(1) / groups;
  const i64 kk[3] = {weight.size(2), weight.size(3), weight.size(4)};
  const bool brg = src.scalar_type() == at::kFloat && blas().brgemm;
  const i64 in_img = P.ax[0].L_src * P.ax[1].L_src * P.ax[2].L_src;
  double taps = 0;  // mean taps per phase
  for (i64 p = 0; p < P.P; ++p) taps += double(P.taps(p)) / double(P.P);
  // Weight-heavy (few pixels, a big weight, batch-1 decoders' deep layers): stream the weight
  // once, in place (GEMM first forward; weight-streaming grad_input).
  const bool weight_heavy = weight.numel() > 2 * (src.numel() + dst.numel());
  if (!swap) {
    if (!brg) {
      const OrderCost c = order_cost(P, src.size(0), Csrc_g, Cdst_g, groups, kk);
      return c.b < c.a ? 2 : 1;
    }
    if (Cdst_g <= 8 || in_img <= 4 || weight_heavy) return 2;
    i64 qw = 0;
    for (const AxisPhase& ph : P.ax[2].ph) qw = std::max(qw, ph.Q);
    if (!channels_last_like(src) && src.stride(4) == 1 &&
        ((taps <= 1.0 && qw >= 16) || (taps <= 2.0 && qw >= 256)))
      return 4;
    return 3;
  }
  const i64 dx_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  if (weight_heavy || dx_img <= 4) return 6;
  if (!brg) return 1;
  // grad_input: src = grad_out (channels Csrc_g = C_out/g), one phase over the input positions
  const i64 out_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  bool k_eq_s = true;
  for (int d = 0; d < 3; ++d) k_eq_s = k_eq_s && kk[d] == P.ax[d].a;
  const i64 KK = kk[0] * kk[1] * kk[2];
  const bool one_d = P.ax[0].L_dst == 1 && P.ax[1].L_dst == 1;
  if (Csrc_g <= 8 || (one_d && Csrc_g <= 32 && KK <= 16) || (k_eq_s && out_img >= 1024)) return 1;
  return 3;
}

// Forced strategies, for experiments and tests: KSTCONV_METHOD (forward), KSTCONV_DGRAD_METHOD
// (grad_input), KSTCONV_WGRAD_METHOD (grad_weight); 0 or unset: the rules above.
inline int method_override(const char* name) { return int(env_int(name, 0)); }

// --------------------------------------------------------------------------- entry points
void check5(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 5, "kstconv: ", name, " must be 5-d here, got ", t.dim(), "-d");
  TORCH_CHECK(t.device().is_cpu(), "kstconv: ", name, " must be a CPU tensor");
}

// The method that conv() runs for these arguments: `method` (0: KSTCONV_METHOD /
// KSTCONV_DGRAD_METHOD, else the rules), narrowed to what can run (the brgemm methods need
// float32 and brgemm; method 4 reads the source in place only along a unit-stride w).
i64 conv_method(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& dst,
                const std::vector<i64>& plan, i64 groups, bool swap, i64 method) {
  const Plan P(plan, 0.0);
  if (method == 0) method = method_override(swap ? "KSTCONV_DGRAD_METHOD" : "KSTCONV_METHOD");
  if (method == 0) method = choose_conv_method(P, src, dst, weight, groups, swap);
  const bool brg = src.scalar_type() == at::kFloat && blas().brgemm;
  if ((method == 3 || method == 4) && brg)
    return method == 4 && src.stride(4) == 1 && P.ax[2].a == 1 ? 4 : 3;
  if (method == 6 && swap) return 6;
  if (method == 5 && brg) return 5;
  if (method == 2 && !swap) return 2;
  return 1;
}

// The weight prepared for `method` (a conv_method result): what conv() would otherwise make on
// every call. Returned as a list of tensors for the Python cache.
std::vector<at::Tensor> pack_weight(const at::Tensor& src, const at::Tensor& weight,
                                    const at::Tensor& dst, const std::vector<i64>& plan,
                                    i64 groups, bool swap, i64 method) {
  check5(src, "src"); check5(weight, "weight"); check5(dst, "dst");
  Prepared prep;
  if (method == 2 || method == 6) {
    if (!weight.is_contiguous()) prep.packed = weight.contiguous();
    return prep.to_list();
  }
  const Plan P(plan, 0.0);  // the taps that meet a real input (merging does not change them)
  const i64 Csrc_g = src.size(1) / groups, Cdst_g = dst.size(1) / groups;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_pack", [&] {
    prep.packed = pack_plain<scalar_t>(weight, P, groups, Csrc_g, Cdst_g, swap, method == 4);
    if (method == 1)
      prep.mkl = mkl_pack_weights<scalar_t>(prep.packed.data_ptr<scalar_t>(),
                                            PackIndex(P, Csrc_g, Cdst_g), groups, P.P,
                                            channels_last_like(src));
  });
  return prep.to_list();
}

// dst/pre are written in place (pre may be undefined). Used for forward (swap=false) and
// grad_input (swap=true, no bias, no activation). `method`: a conv_method result;
// `prepared`: pack_weight's result for it, or empty (then the weight is packed here).
void conv(const at::Tensor& src, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
          at::Tensor dst, c10::optional<at::Tensor> pre, const std::vector<i64>& plan, i64 groups,
          bool swap, i64 act, double slope, double merge_tau, i64 method,
          const std::vector<at::Tensor>& prepared) {
  check5(src, "src"); check5(weight, "weight"); check5(dst, "dst");
  TORCH_CHECK(groups >= 1 && src.size(1) % groups == 0 && dst.size(1) % groups == 0,
              "kstconv: channels not divisible by groups");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && weight.scalar_type() == src.scalar_type(),
              "kstconv: dtype mismatch");
  TORCH_CHECK(method >= 1 && method <= 6 && method == conv_method(src, weight, dst, plan, groups,
                                                                  swap, method),
              "kstconv: method ", method, " cannot run here (ask conv_method)");
  Plan P(plan, merge_tau);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor pr = pre.has_value() ? *pre : at::Tensor();
  const Prepared prep = Prepared::from(prepared);
  for (const at::Tensor& t : prepared)
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "kstconv: bad prepared weight");
  if (prep.packed.defined() && method != 2 && method != 6)
    TORCH_CHECK(prep.packed.scalar_type() == src.scalar_type(), "kstconv: prepared weight dtype");
  if (method == 3 || method == 4) {
    // exact classes on d/h; along w merged (MK reads a zero-padded copy) unless KM
    const Plan PE = method == 4 ? Plan(plan, 0.0)
                                : Plan(plan, 0.0, true,
                                       double(env_int("KSTCONV_W_TAU_PCT", 15)) / 100.0);
    conv_implicit_impl(src, weight, b, dst, pr, PE, groups, swap, int(act), slope, method == 4,
                       prep.packed);
    return;
  }
  // methods 2 and 6 read the weight in its own order: a cached contiguous copy, if any
  const at::Tensor& w_dense = prep.packed.defined() ? prep.packed : weight;
  if (method == 6) {
    Plan GI(plan, 1e30, false);  // one class per axis, every tap
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_gi_stream", [&] {
      grad_input_weight_streaming_impl<scalar_t>(src, w_dense, dst, GI, groups);
    });
    return;
  }
  if (method == 5) {
    conv_impl<float>(src, weight, b, dst, pr, P, groups, swap, int(act), slope, true, prep);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_conv", [&] {
    if (method == 2)
      conv_gemm_first_impl<scalar_t>(src, w_dense, b, dst, pr, P, groups, int(act), slope);
    else
      conv_impl<scalar_t>(src, weight, b, dst, pr, P, groups, swap, int(act), slope, false, prep);
  });
}

void grad_weight(const at::Tensor& x, const at::Tensor& dy, at::Tensor dw,
                 const std::vector<i64>& plan, const std::vector<i64>& gi_plan, i64 groups,
                 double merge_tau, i64 method) {
  check5(x, "input"); check5(dy, "grad_output"); check5(dw, "grad_weight");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type() && dw.scalar_type() == x.scalar_type(),
              "kstconv: dtype mismatch");
  TORCH_CHECK(dw.is_contiguous(), "kstconv: grad_weight output must be contiguous");
  Plan P(plan, merge_tau);
  if (method == 0) method = method_override("KSTCONV_WGRAD_METHOD");
  if (method == 0) {
    // 1: phase patch matrix x BLAS; 2: input x patch matrix of grad_out (weight's own order);
    // 3: brgemm, no patch matrix. Rules read off the real-layer suite (see README).
    const i64 kk[3] = {dw.size(2), dw.size(3), dw.size(4)};
    const i64 Cin_g = x.size(1) / groups, Cout_g = dy.size(1) / groups;
    const OrderCost c = order_cost(P, x.size(0), Cin_g, Cout_g, groups, kk);
    const bool weight_heavy = dw.numel() > 2 * (x.numel() + dy.numel());
    bool k_eq_s = true;
    for (int d = 0; d < 3; ++d) k_eq_s = k_eq_s && kk[d] == P.ax[d].s;
    const i64 in_img = P.ax[0].L_src * P.ax[1].L_src * P.ax[2].L_src;
    const bool one_d = P.ax[0].L_src == 1 && P.ax[1].L_src == 1;
    if (weight_heavy || Cout_g <= 8 || in_img <= 4) method = 2;
    else if (x.scalar_type() == at::kFloat && blas().brgemm && Cin_g >= 32 &&
             !(k_eq_s && in_img >= 8192) && !(one_d && Cin_g <= 128))
      method = 3;
    else method = c.b < c.a ? 2 : 1;
  }
  if (method == 3 && x.scalar_type() == at::kFloat && blas().brgemm) {
    grad_weight_brgemm_impl(x, dy, dw, Plan(plan, 0.0, false), groups);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kstconv_grad_weight", [&] {
    if (method == 2) {
      Plan GI(gi_plan, 1e30, false);  // one class per axis: all taps, zero-filled
      grad_weight_gemm_first_impl<scalar_t>(x, dy, dw, GI, groups);
    } else {
      grad_weight_impl<scalar_t>(x, dy, dw, P, groups);
    }
  });
}

// Joint backward (see joint_backward_impl): whether it serves the layer (KSTCONV_JOINT: 0 never,
// 1 wherever it can run, unset: the rules), and the pass itself; outputs that are undefined are
// not computed.
bool joint_backward_ok(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                       const std::vector<i64>& geo, i64 groups) {
  check5(x, "input"); check5(dy, "grad_output"); check5(weight, "weight");
  const JointGeo G(geo);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && dy.size(1) == weight.size(1) * groups &&
                  weight.size(0) == x.size(1) && dy.size(0) == x.size(0),
              "kstconv: joint backward: inconsistent channels, batch or groups");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(x.size(2 + d) == G.L[d] && dy.size(2 + d) == G.Lo[d] &&
                    weight.size(2 + d) == G.k[d] && G.s[d] >= 1 && G.dil[d] >= 1 && G.p[d] >= 0,
                "kstconv: joint backward: geometry does not match the tensors on axis ", d);
  const i64 mode = env_int("KSTCONV_JOINT", -1);
  return mode != 0 && joint_backward_fits(G, x, dy, weight, groups, mode == 1);
}

void joint_backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                    c10::optional<at::Tensor> dx, c10::optional<at::Tensor> dw,
                    c10::optional<at::Tensor> db, const std::vector<i64>& geo, i64 groups) {
  const JointGeo G(geo);
  TORCH_CHECK(joint_backward_fits(G, x, dy, weight, groups, true),
              "kstconv: the joint backward cannot run this layer");
  at::Tensor dxt = dx.has_value() ? *dx : at::Tensor(), dwt = dw.has_value() ? *dw : at::Tensor();
  at::Tensor dbt = db.has_value() ? *db : at::Tensor();
  auto same = [](const at::Tensor& t, const at::Tensor& like, const char* name) {
    check5(t, name);
    TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == at::kFloat, "kstconv: ", name,
                " has the wrong shape or dtype");
  };
  if (dxt.defined()) same(dxt, x, "grad_input");
  if (dwt.defined()) same(dwt, weight, "grad_weight");
  TORCH_CHECK(!dbt.defined() || (dbt.is_contiguous() && dbt.device().is_cpu() &&
                                 dbt.scalar_type() == at::kFloat && dbt.dim() == 1 &&
                                 dbt.size(0) == dy.size(1)),
              "kstconv: grad_bias must be a contiguous float32 CPU vector of C_out elements");
  joint_backward_impl(x, dy, weight, dxt, dwt, dbt, G, groups);
}

bool have_blas() { return blas().sgemm != nullptr; }

}  // namespace kst

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_method", &kst::conv_method, "the method conv() runs for these arguments");
  m.def("pack_weight", &kst::pack_weight, "the weight prepared for a conv method (cacheable)");
  m.def("conv", &kst::conv, "gather-GEMM-scatter over a phase plan (forward, grad_input)");
  m.def("grad_weight", &kst::grad_weight, "per-phase weight gradient");
  m.def("joint_backward_ok", &kst::joint_backward_ok, "whether the joint backward serves a layer");
  m.def("joint_backward", &kst::joint_backward, "grad_input, grad_weight, grad_bias in one pass");
  m.def("have_blas", &kst::have_blas, "whether MKL's sgemm_ was found in libtorch_cpu");
}
