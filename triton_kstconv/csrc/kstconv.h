// C++ CPU engine of triton_kstconv: the types every file shares.
//
// One mechanism serves the forward pass and grad_input: "gather, GEMM, scatter" over a plan that
// the Python side computes (triton_kstconv/geometry.py, encoded by cpp_engine.py). Per spatial
// axis (always three here; 1D/2D calls add unit axes) the plan lists phases; a phase writes
// destination positions  dst_stride * q + dst_off  for q in [0, Q) and reads, for tap t, source
// position  src_stride * q + src_off[t]  with weight index widx[t].
//   forward:    src = input,  dst = output, one phase per residue r: dst_stride = s, dst_off = r,
//               src_stride = 1, taps T_r with src_off = (r + p - j*d) / s.
//   grad_input: src = grad_out, dst = grad_in, one phase: dst_stride = 1, src_stride = s,
//               all taps with src_off = j*d - p  (an ordinary strided convolution).
// Each phase is split into validity classes (runs of q with the same valid tap range), so no
// multiply-add ever touches an absent input.
//
// Files, one job each:
//   kstconv.h             shared types: sizes, strategies, tensor views, the epilogue, drivers
//   blas.h / .cpp         the GEMMs PyTorch ships (MKL's sgemm_, its packed API, ATen's brgemm)
//   gemm_skinny.cpp       the engine's own GEMMs with one short dimension (weight-heavy layers)
//   gemm_brgemm.cpp       float32 GEMMs over brgemm tiles (where MKL runs below the CPU's ISA)
//   plan.h / .cpp         the plan: decoding, validity classes, blocks, work items
//   patches.h             patch matrices: im2col, the scatter of a GEMM's result, gather
//   layout.h / .cpp       layout copies: transposes, channels-last copies, de-interleaving
//   packing.h / .cpp      weight packing (plain and MKL's packed operands), prepared weights
//   strategies.h          the entry points of the strategies below
//   forward_patch.cpp     methods 1 and 5: phase patch matrix x BLAS / brgemm
//   forward_implicit.cpp  methods 3 and 4: implicit GEMM, brgemm tiles, no patch matrix
//   forward_gemm_first.cpp  method 2: GEMM first, then each phase gathers its taps
//   forward_winograd.cpp  method 8: Winograd F(2x2, 2x2) for phases of 2 x 2 taps
//   grad_input_stream.cpp method 6: grad_input streaming the weight once
//   grad_weight.cpp       grad_weight methods 1 and 2
//   grad_weight_brgemm.cpp  grad_weight method 3
//   grad_weight_rows.cpp  grad_weight method 5: AVX-512 register tiles, grad_out in place
//   wgrad_tiles.h         the work items and fixed-order partial sums of methods 3 and 5
//   direct.cpp            method 7 and grad_weight method 4: grouped layers of few channels,
//                         no GEMM
//   joint_backward.cpp    grad_input, grad_weight and grad_bias in one pass over grad_out
//   backward_patch.cpp    the same three from one patch matrix of grad_out, two large GEMMs
//   chooser.h / .cpp      every rule that picks a strategy
//   bindings.cpp          the Python entry points: argument checks, then the chooser
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kst {

using i64 = int64_t;

inline i64 ceil_div(i64 a, i64 b) {  // b > 0, any sign of a
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// ---------------------------------------------------------------------------- strategies
// forward (and grad_input, which is the same gather-GEMM-scatter over its own plan)
enum Method : int {
  kAutoMethod = 0,
  kPatchBlas = 1,      // phase patch matrix x BLAS (the general path, float64 included)
  kGemmFirst = 2,      // C = W^T x first, then each phase gathers its taps (forward only)
  kImplicitMK = 3,     // implicit GEMM, brgemm tiles [pixels x c_src] from a channels-last copy
  kImplicitKM = 4,     // implicit GEMM, brgemm tiles [c_dst x c_src], the source read in place
  kPatchBrgemm = 5,    // phase patch matrix (channels-last) x brgemm tiles
  kStreamWeight = 6,   // grad_input reading the weight once, in place (weight-heavy layers)
  kDirect = 7,         // depthwise / few-channel groups, grad_input of few output channels: no GEMM
  kWinograd = 8,       // Winograd F(2x2, 2x2) per phase of 2 x 2 taps (k = 2s, 2-d, forward, float32)
};
enum WgradMethod : int {
  kAutoWgrad = 0,
  kWgradPatch = 1,     // per phase dY x patch matrix of x, BLAS
  kWgradGemmFirst = 2, // x x patch matrix of grad_out, in the weight's own order
  kWgradBrgemm = 3,    // brgemm, no patch matrix, de-interleaved grad_out planes
  kWgradDirect = 4,    // C_in/g <= 16: per (group, c_out) dot products, no GEMM
  kWgradRows = 5,      // AVX-512 register tiles over grad_out rows read in place, float32
};

// -------------------------------------------------------------------- tuning constants
// Read off the real-layer suite (perf/results) on a 2-core machine. The work-item sizes are
// settable (bindings: set_tuning) so that the tests can cut a pass into many tiny items.
struct Tuning {
  i64 cols_cap = i64(1) << 21;      // elements of one patch matrix
  i64 item_pixels = 1024;           // destination pixels per phase of a patch-matrix item
  i64 gemm_first_cap = i64(1) << 20;  // elements of GEMM-first's C buffer
  i64 brg_rows = 32;                // implicit MK: pixels per brgemm tile
  i64 brg_cols = 64;                // implicit KM: pixels per brgemm tile
  i64 l2_bytes = i64(512) << 10;    // one core's L2 (plan.cpp reads the machine's at start)
  i64 stream_bytes = i64(16) << 20; // direct: destinations of at least this size written with
                                    // non-temporal stores (far larger than the caches)
  i64 row_kernel = 1;               // direct forward: 1 takes its row kernel where it applies,
                                    // 0 the general path (tests run both)
  i64 whole_rows = 1;               // implicit MK: 1 lets a tile span rows shorter than it, 0
                                    // keeps every tile in one row (tests run both)
  i64 wgrad_shifted = 1;            // grad_weight brgemm: 1 takes shifted input copies where
                                    // padded rows would waste, 0 never (tests run both)
  i64 wgrad_rows = 1;               // grad_weight: 1 lets the rules take the AVX-512 register
                                    // tiles where they run, 0 never (tests pin the other rules)
  i64 winograd = 1;                 // forward: 1 lets the rules take Winograd (method 8) where
                                    // it runs, 0 never (tests pin the other rules)
  i64 brgemm_rules = -1;            // the rules for a CPU whose GEMMs go over brgemm (chooser):
                                    // -1 where they do (blas().brgemm_gemm), 1 always, 0 never
};
Tuning& tuning();

constexpr double kMergeTau = 0.07;         // validity classes merged while the zero taps a
                                           // merge adds stay under this fraction
constexpr double kMergeTauW = 0.15;        // the same along w for the implicit MK path
constexpr i64 kBrgChannels = 128;          // implicit KM: destination channels per tile
constexpr i64 kWgradPixels = 256;          // grad_weight brgemm: pixels per reduction step
constexpr double kFlopsPerPass = 24;       // order cost: multiply-adds worth one memory pass
constexpr i64 kDirectBlock = 4;             // direct: destination channels computed together
constexpr i64 kDirectMaxChannels = 16;     // direct (method 7): at most this many source channels a group
constexpr i64 kDirectWgradMaxChannels = 4; // direct grad_weight: one input, at most this many
                                           // output channels a group
constexpr i64 kDirectWgradGroupChannels = 8;  // direct grad_weight of grouped layers: at most
                                              // this many input channels a group

// ---------------------------------------------------------------------------- tensor views
// A 5-d tensor (N, C, D, H, W) as a pointer and strides.
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
  // element (n, c, d, h, w); null for an undefined tensor
  T* at(i64 n, i64 c, i64 d, i64 h, i64 w) const {
    return p ? p + n * st[0] + c * st[1] + d * st[2] + h * st[3] + w * st[4] : nullptr;
  }
};

inline bool channels_last_like(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

// A weight larger than twice the two activations together (few pixels, a big weight: batch-1
// decoders' deep layers): the strategies that read the weight once, in place, pay off.
inline bool weight_heavy(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b) {
  return w.numel() > 2 * (a.numel() + b.numel());
}

// -------------------------------------------------------------------------------- epilogue
enum Act { NONE = 0, RELU, LEAKY, SILU, GELU, GELU_TANH, TANH, SIGMOID, RELU6 };

// The epilogue's activations without a branch (a compare and jump mispredicts on half of random
// data: 3 ns an element, DCGAN's first layer 0.57 -> 0.91 ms with ReLU), each exactly PyTorch's,
// NaN included: maxss / minss return their second operand when either is NaN (NaN stays NaN,
// -0.0 stays -0.0, as clamp_min does); leaky ReLU selects v > 0 ? v : v * slope by a mask.
template <typename T>
inline T act_fn_max0(T v) {   // max(0, v)
  if constexpr (std::is_same<T, float>::value)
    return _mm_cvtss_f32(_mm_max_ss(_mm_setzero_ps(), _mm_set_ss(v)));
  else
    return _mm_cvtsd_f64(_mm_max_sd(_mm_setzero_pd(), _mm_set_sd(v)));
}
template <typename T>
inline T act_fn_min(T v, T hi) {   // min(v, hi)
  if constexpr (std::is_same<T, float>::value)
    return _mm_cvtss_f32(_mm_min_ss(_mm_set_ss(hi), _mm_set_ss(v)));
  else
    return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(hi), _mm_set_sd(v)));
}
template <typename T>
inline T act_fn_leaky(T v, T slope) {
  if constexpr (std::is_same<T, float>::value) {
    const __m128 x = _mm_set_ss(v), pos = _mm_cmpgt_ss(x, _mm_setzero_ps());
    return _mm_cvtss_f32(_mm_or_ps(_mm_and_ps(pos, x),
                                   _mm_andnot_ps(pos, _mm_mul_ss(x, _mm_set_ss(slope)))));
  } else {
    const __m128d x = _mm_set_sd(v), pos = _mm_cmpgt_sd(x, _mm_setzero_pd());
    return _mm_cvtsd_f64(_mm_or_pd(_mm_and_pd(pos, x),
                                   _mm_andnot_pd(pos, _mm_mul_sd(x, _mm_set_sd(slope)))));
  }
}

// The activations an epilogue applies (the transcendental ones never reach one, see below).
template <typename T, int ACT>
inline T act_fn(T v, T slope) {
  static_assert(ACT == NONE || ACT == RELU || ACT == LEAKY || ACT == RELU6,
                "transcendental activations run after the sums (bindings.cpp conv)");
  if constexpr (ACT == RELU) return act_fn_max0(v);
  else if constexpr (ACT == LEAKY) return act_fn_leaky(v, slope);
  else if constexpr (ACT == RELU6) return act_fn_min(act_fn_max0(v), T(6));
  else return v;
}

// Activations made of exp / erf / tanh: run by ATen's vectorised kernels after the sums (see
// bindings.cpp conv), never element by element in an epilogue.
inline bool transcendental(int act) {
  return act == SILU || act == GELU || act == GELU_TANH || act == TANH || act == SIGMOID;
}

// The one dispatch from a runtime activation code to a compile-time one (the epilogues' cheap
// activations; transcendental ones never reach an epilogue):
// with_act(act, [&](auto A) { f<decltype(A)::value>(...); }).
template <typename F>
inline decltype(auto) with_act(int act, F&& f) {
  TORCH_CHECK(act == NONE || act == RELU || act == LEAKY || act == RELU6, "kstconv: activation ",
              act, " has no epilogue (run it after the sums, see bindings.cpp conv)");
  switch (act) {
    case RELU: return f(std::integral_constant<int, RELU>{});
    case LEAKY: return f(std::integral_constant<int, LEAKY>{});
    case RELU6: return f(std::integral_constant<int, RELU6>{});
    default: return f(std::integral_constant<int, NONE>{});
  }
}

// The one epilogue store of every forward path: y = act(v + bias[c]), and pre = v + bias[c]
// where the activation's derivative needs the value before it.
template <typename T, int ACT>
struct Store {
  const T* bias;
  T slope;
  inline void operator()(T* y, T* pre, T v, i64 c) const {
    if (bias) v += bias[c];
    *y = act_fn<T, ACT>(v, slope);
    if (pre) *pre = v;
  }
};

// ----------------------------------------------------------------------------- drivers
// Runs f(begin, end) over [0, n): in parallel when `par`, else inline.
template <typename F>
void maybe_parallel(bool par, i64 n, F&& f) {
  if (par && n > 1) at::parallel_for(0, n, 1, f);
  else if (n > 0) f(0, n);
}

// Whether a pass of n work items runs them on all threads (each GEMM inside single-threaded).
inline bool items_in_parallel(i64 n) {
  const int t = at::get_num_threads();
  return n >= t && t > 1;
}

}  // namespace kst
