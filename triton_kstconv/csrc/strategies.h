// The entry points of the C++ engine's strategies (one file each, see kstconv.h). Destinations
// are written in place; undefined tensors (bias, pre) mean "none". The chooser (chooser.h)
// decides which runs; bindings.cpp checks the arguments first.
#pragma once

#include <atomic>

#include "packing.h"
#include "plan.h"

namespace kst {

// forward / grad_input (swap = true: grad_input, no bias or activation) -------------------
// methods 1 and 5 (use_brgemm: float32 only)
void conv_patch(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap, int act,
                double slope, bool use_brgemm, const Prepared& prep);
// methods 3 (km = false) and 4 (km = true), float32; `packed` may be undefined
void conv_implicit(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap,
                   int act, double slope, bool km, at::Tensor packed);
// How many passes of conv_implicit took whole-row tiles (MK, rows shorter than a tile): the
// tests' check that they ran.
std::atomic<i64>& implicit_whole_row_runs();
// method 2 (forward only); `weight` in its own layout
void conv_gemm_first(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                     at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, int act,
                     double slope);
// How many passes of conv_direct took its row kernel (the depthwise forward at stride 2 along
// w, float32, AVX2): the tests' check that it ran.
std::atomic<i64>& row_kernel_runs();
// method 6 (grad_input only); GI: the grad_input plan with every tap (untrimmed, one class)
void grad_input_stream_weight(const at::Tensor& dy, const at::Tensor& weight, at::Tensor& dx,
                              const Plan& GI, i64 groups);

// method 8 (forward only, float32): winograd_fits(P) on the plan with trimmed taps; `packed`
// (pack_winograd) may be undefined
bool winograd_fits(const Plan& P);
// 2 x 2 output tiles of one image and phase (the longest phase's)
i64 winograd_tiles(const Plan& P);
at::Tensor pack_winograd(const at::Tensor& weight, const Plan& P, i64 groups, i64 Cin_g,
                         i64 Cout_g);
void conv_winograd(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, int act,
                   double slope, at::Tensor packed);

// method 7, direct (depthwise and few-channel groups: forward with C_in/g = 1, grad_input with
// C_in/g = 1); P: exact classes (every tap a class reads meets a real source position)
void conv_direct(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                 at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap, int act,
                 double slope);

// grad_weight ------------------------------------------------------------------------------
void grad_weight_patch(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                       i64 groups);
void grad_weight_gemm_first(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                            const Plan& GI, i64 groups);
void grad_weight_brgemm(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                        i64 groups);
// float32 on a CPU with AVX-512 (grad_weight_rows_runs); P: the forward plan, every tap
bool grad_weight_rows_runs();
void grad_weight_rows(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                      i64 groups);
// C_in/g <= kDirectMaxChannels; P: the forward plan with exact classes
void grad_weight_direct(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                        i64 groups);

// grad_input, grad_weight and grad_bias from one patch matrix of grad_out (backward_patch.cpp);
// GI: the grad_input plan with every tap (untrimmed, one class); dx, dw, db undefined where not
// wanted
void backward_patch(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                    at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const Plan& GI, i64 groups);

// joint backward ---------------------------------------------------------------------------
// The geometry the joint backward walks: per axis (d, h, w) L_in, L_out, k, s, p, dil.
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

// Fixed number of row ranges (accumulator sets) of the joint backward: fixed, so that its sums
// do not depend on the thread count. Each range zeroes and adds in one grad_weight of its own
// and starts its row cache afresh, so more ranges than threads only cost: on 2 threads, 4 ranges
// against 16 (ms): DCGAN 128-64@16 batch 4 5.1 vs 6.8, batch 16 21.2 vs 23.6 (separate passes
// 20.4), batch 64 72.7 vs 76.6; FCN 21-21 k16s8 2.75 vs 4.43; decoder 64-64@64 41.7 vs 46.8;
// 3D U-Net 128-64@32 142 vs 165; none slower beyond noise. The rules leave machines with more
// threads than ranges to the separate passes, which use every thread (chooser.cpp).
constexpr i64 kJointSplits = 4;

// dx, dw, db: each undefined where not wanted.
void joint_backward_run(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                        at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const JointGeo& G,
                        i64 groups);

}  // namespace kst
