// Every rule that picks a strategy of the C++ engine, in one place: forward and grad_input
// (methods 1-8), grad_weight (1-5), and whether the joint backward takes a layer. The rules were
// read off the real-layer suite (perf/results). A strategy forced by the caller (the tests,
// KSTCONV_METHOD and friends) that cannot run here raises, naming why.
#pragma once

#include "strategies.h"

namespace kst {

// The forward (swap = false) or grad_input (swap = true) method that runs: `forced` (> 0) if it
// can run, else an error; 0: the rules. per_call: the weight is prepared for this call only (a
// pass that records a graph: in training the weight changes every step), so a method that has
// to pack it pays for that packing every time.
Method conv_method(const Plan& P, const at::Tensor& src, const at::Tensor& dst,
                   const at::Tensor& weight, i64 groups, bool swap, int forced,
                   bool per_call = false);

// Whether the rules give grad_weight to its direct dot products (method 4).
bool direct_grad_weight_chosen(i64 Cin_g, i64 Cout_g, i64 groups);

// The grad_weight method that runs (`forced` as above).
WgradMethod grad_weight_method(const Plan& P, const at::Tensor& x, const at::Tensor& dy,
                               const at::Tensor& dw, i64 groups, int forced);

// Whether the joint backward can run the layer (float32 with brgemm, a bounded row cache and
// weight accumulators) and, unless `any`, whether it should.
bool joint_backward_fits(const JointGeo& G, const at::Tensor& x, const at::Tensor& dy,
                         const at::Tensor& weight, i64 groups, bool any);

// The joint backward's decision under `mode`: 0 never, 1 wherever it can run, -1 the rules.
bool joint_backward_chosen(const JointGeo& G, const at::Tensor& x, const at::Tensor& dy,
                           const at::Tensor& weight, i64 groups, int mode);

// Whether the patch backward (backward_patch.cpp) takes the layer under `mode` (the KSTCONV_JOINT
// knob): 2 wherever it can run, 0 or 1 never, -1 the rules.
bool patch_backward_chosen(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                           i64 groups, int mode);

}  // namespace kst
