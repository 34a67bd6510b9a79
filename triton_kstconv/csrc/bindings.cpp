// The Python entry points of the C++ engine: argument checks, then the chooser and the strategy.
#include <torch/extension.h>

#include "blas.h"
#include "chooser.h"
#include "packing.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

void check5(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 5, "kstconv: ", name, " must be 5-d here, got ", t.dim(), "-d");
  TORCH_CHECK(t.device().is_cpu(), "kstconv: ", name, " must be a CPU tensor");
}

void check_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& dst,
                i64 groups) {
  check5(src, "src"); check5(weight, "weight"); check5(dst, "dst");
  TORCH_CHECK(groups >= 1 && src.size(1) % groups == 0 && dst.size(1) % groups == 0,
              "kstconv: channels not divisible by groups");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && weight.scalar_type() == src.scalar_type(),
              "kstconv: dtype mismatch");
}

}  // namespace

// Once, before any other call: the KSTCONV_BLAS mode (blas.h BlasMode).
void configure(int mode) { blas(mode); }

// Which GEMMs the engine found (the tests and the benchmarks say it).
std::map<std::string, bool> gemm_paths() {
  const Blas& b = blas();
  return {{"mkl_gemm", b.sgemm != nullptr}, {"mkl_packed_gemm", b.spack != nullptr},
          {"brgemm", b.brgemm != nullptr}, {"skinny", skinny_gemm_available()},
          {"wgrad_rows", grad_weight_rows_runs()},
          {"brgemm_gemm", b.brgemm_gemm}};
}

// C (+)= op(A) op(B) through gemm_brgemm, on contiguous 2-d float32 tensors given as stored
// (A [K, M] where ta, B [N, K] where tb); `threads`: from outside a parallel region (the
// tiles spread over the threads) or from inside one (tests).
void gemm_brgemm_call(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool ta, bool tb,
                      bool accumulate, bool threads) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  c.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() &&
                  c.is_contiguous() && a.dim() == 2 && b.dim() == 2 && c.dim() == 2,
              "gemm_brgemm: contiguous 2-d float32 tensors");
  const i64 M = c.size(0), N = c.size(1), K = ta ? a.size(0) : a.size(1);
  auto run = [&] {
    gemm_brgemm(ta, tb, M, N, K, a.data_ptr<float>(), a.size(1), b.data_ptr<float>(), b.size(1),
                accumulate, c.data_ptr<float>(), N);
  };
  if (threads) {
    run();
    return;
  }
  bool inside = false;   // two items, so that ATen opens a parallel region (one runs inline)
  at::parallel_for(0, 2, 1, [&](i64 b0, i64) {
    if (b0 == 0) inside = at::in_parallel_region(), run();
  });
  TORCH_CHECK(inside || at::get_num_threads() == 1, "gemm_brgemm: not in a parallel region");
}

// The work-item sizes (tests: many tiny items); a missing key keeps its value.
void set_tuning(const std::map<std::string, i64>& values) {
  Tuning& t = tuning();
  for (const auto& [key, v] : values) {
    if (key == "row_kernel" || key == "whole_rows" || key == "wgrad_shifted" ||
        key == "wgrad_rows" || key == "winograd") {  // switches
      TORCH_CHECK(v == 0 || v == 1, "kstconv: tuning value ", key, "=", v, " must be 0 or 1");
      (key == "row_kernel"      ? t.row_kernel
       : key == "whole_rows"    ? t.whole_rows
       : key == "wgrad_shifted" ? t.wgrad_shifted
       : key == "wgrad_rows"    ? t.wgrad_rows
                                : t.winograd) = v;
      continue;
    }
    if (key == "brgemm_rules") {
      TORCH_CHECK(v >= -1 && v <= 1, "kstconv: tuning value ", key, "=", v,
                  " must be -1 (auto), 0 or 1");
      t.brgemm_rules = v;
      continue;
    }
    TORCH_CHECK(v >= 1, "kstconv: tuning value ", key, "=", v, " must be positive");
    if (key == "cols_cap") t.cols_cap = v;
    else if (key == "item_pixels") t.item_pixels = v;
    else if (key == "gemm_first_cap") t.gemm_first_cap = v;
    else if (key == "brg_rows") t.brg_rows = v;
    else if (key == "brg_cols") t.brg_cols = v;
    else if (key == "l2_bytes") t.l2_bytes = v;
    else if (key == "stream_bytes") t.stream_bytes = v;
    else TORCH_CHECK(false, "kstconv: no tuning value ", key);
  }
}

std::map<std::string, i64> get_tuning() {
  const Tuning& t = tuning();
  return {{"cols_cap", t.cols_cap}, {"item_pixels", t.item_pixels},
          {"gemm_first_cap", t.gemm_first_cap}, {"brg_rows", t.brg_rows},
          {"brg_cols", t.brg_cols}, {"l2_bytes", t.l2_bytes},
          {"stream_bytes", t.stream_bytes}, {"row_kernel", t.row_kernel},
          {"whole_rows", t.whole_rows}, {"wgrad_shifted", t.wgrad_shifted},
          {"wgrad_rows", t.wgrad_rows}, {"winograd", t.winograd},
          {"brgemm_rules", t.brgemm_rules}};
}

// The method conv() runs for these arguments: `forced` (0: the rules) if it can run, else an
// error saying why; per_call: the weight will be prepared for this call only (chooser.h).
i64 conv_method(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& dst,
                const std::vector<i64>& plan, i64 groups, bool swap, i64 forced, bool per_call) {
  check_conv(src, weight, dst, groups);
  return conv_method(Plan(plan, 0.0), src, dst, weight, groups, swap, int(forced), per_call);
}

// The weight prepared for `method` (a conv_method result): what conv() would otherwise make on
// every call. Returned as a list of tensors for the Python cache.
std::vector<at::Tensor> pack_weight(const at::Tensor& src, const at::Tensor& weight,
                                    const at::Tensor& dst, const std::vector<i64>& plan,
                                    i64 groups, bool swap, i64 method) {
  check_conv(src, weight, dst, groups);
  Prepared prep;
  if (method == kDirect) return prep.to_list();   // reads the weight as it is
  if (method == kGemmFirst || method == kStreamWeight) {  // the weight in its own order
    if (!weight.is_contiguous()) prep.packed = weight.contiguous();
    return prep.to_list();
  }
  const Plan P(plan, 0.0);  // the taps that meet a real input (merging does not change them)
  const i64 Csrc_g = src.size(1) / groups, Cdst_g = dst.size(1) / groups;
  if (method == kWinograd) {
    prep.packed = pack_winograd(weight, P, groups, Csrc_g, Cdst_g);
    return prep.to_list();
  }
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_pack", [&] {
    prep.packed = pack_plain<scalar_t>(weight, P, groups, Csrc_g, Cdst_g, swap,
                                       method == kImplicitKM);
    if (method == kPatchBlas)
      prep.mkl = mkl_pack_weights<scalar_t>(prep.packed.data_ptr<scalar_t>(),
                                            PackIndex(P, Csrc_g, Cdst_g), groups, P.P,
                                            patch_layout_mk(src, P, Csrc_g));
  });
  return prep.to_list();
}

// The convolution itself under `method`, the epilogue `act` (cheap activations only: see conv).
void run_conv(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& b,
              at::Tensor dst, at::Tensor pr, const std::vector<i64>& plan, i64 groups,
              bool swap, int act, double slope, i64 method, const Prepared& prep) {
  // methods 2 and 6 read the weight in its own order: a cached contiguous copy, if any
  const at::Tensor& w_dense = prep.packed.defined() ? prep.packed : weight;
  switch (method) {
    case kImplicitMK:   // exact classes on d/h; along w merged (reads a zero-padded copy)
      conv_implicit(src, weight, b, dst, pr, Plan(plan, 0.0, true, kMergeTauW), groups, swap,
                    act, slope, false, prep.packed);
      return;
    case kImplicitKM:   // exact classes: the source is read in place
      conv_implicit(src, weight, b, dst, pr, Plan(plan, 0.0), groups, swap, act, slope,
                    true, prep.packed);
      return;
    case kStreamWeight:  // one class per axis, every tap
      grad_input_stream_weight(src, w_dense, dst, Plan(plan, 1e30, false), groups);
      return;
    case kGemmFirst:
      conv_gemm_first(src, w_dense, b, dst, pr, Plan(plan, kMergeTau), groups, act, slope);
      return;
    case kWinograd:     // trimmed taps: 2 x 2 a phase (winograd_fits)
      conv_winograd(src, weight, b, dst, pr, Plan(plan, 0.0), groups, act, slope, prep.packed);
      return;
    case kDirect:       // exact classes: every tap read meets a real source position
      conv_direct(src, weight, b, dst, pr, Plan(plan, 0.0), groups, swap, act, slope);
      return;
    default:            // 1 and 5
      conv_patch(src, weight, b, dst, pr, Plan(plan, kMergeTau), groups, swap, act, slope,
                 method == kPatchBrgemm, prep);
  }
}

// y = act(sums) by ATen's vectorised kernels, in place where y is the sums.
void apply_transcendental(int act, const at::Tensor& sums, at::Tensor& y) {
  const bool inplace = sums.is_same(y);
  switch (act) {
    case TANH: inplace ? (void)at::tanh_(y) : (void)at::tanh_out(y, sums); break;
    case SIGMOID: inplace ? (void)at::sigmoid_(y) : (void)at::sigmoid_out(y, sums); break;
    case SILU: inplace ? (void)at::silu_(y) : (void)at::silu_out(y, sums); break;
    case GELU: inplace ? (void)at::gelu_(y, "none") : (void)at::gelu_out(y, sums, "none"); break;
    case GELU_TANH:
      inplace ? (void)at::gelu_(y, "tanh") : (void)at::gelu_out(y, sums, "tanh"); break;
    default: TORCH_CHECK(false, "kstconv: activation ", act, " is not a transcendental one");
  }
}

// Forward (swap = false) or grad_input (swap = true, no bias, no activation): dst / pre written
// in place (pre may be None). `method`: a conv_method result; `prepared`: pack_weight's result
// for it, or empty (then the weight is packed here).
void conv(const at::Tensor& src, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
          at::Tensor dst, c10::optional<at::Tensor> pre, const std::vector<i64>& plan, i64 groups,
          bool swap, i64 act, double slope, i64 method, const std::vector<at::Tensor>& prepared) {
  check_conv(src, weight, dst, groups);
  TORCH_CHECK(method >= kPatchBlas && method <= kWinograd &&
                  method == conv_method(Plan(plan, 0.0), src, dst, weight, groups, swap,
                                        int(method)),
              "kstconv: method ", method, " cannot run here (ask conv_method)");
  for (const at::Tensor& t : prepared)
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "kstconv: bad prepared weight");
  const Prepared prep = Prepared::from(prepared);
  if (prep.packed.defined() && method != kGemmFirst && method != kStreamWeight)
    TORCH_CHECK(prep.packed.scalar_type() == src.scalar_type(), "kstconv: prepared weight dtype");
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor pr = pre.has_value() ? *pre : at::Tensor();
  if (transcendental(int(act))) {
    // exp / erf / tanh one element at a time cost 20-25 ns each in the scalar epilogue (DCGAN's
    // last layer with tanh: 2.1 -> 5.2 ms): the sums (+ bias) go to `pre`, or to dst where no
    // pre is kept, and ATen's vectorised op makes the activation from them in one pass
    at::Tensor sums = pr.defined() ? pr : dst;
    run_conv(src, weight, b, sums, at::Tensor(), plan, groups, swap, NONE, slope, method, prep);
    apply_transcendental(int(act), sums, dst);
    return;
  }
  run_conv(src, weight, b, dst, pr, plan, groups, swap, int(act), slope, method, prep);
}

// grad_weight into dw (contiguous); `forced` 0: the rules. Returns the method that ran.
i64 grad_weight(const at::Tensor& x, const at::Tensor& dy, at::Tensor dw,
                const std::vector<i64>& plan, const std::vector<i64>& gi_plan, i64 groups,
                i64 forced) {
  check5(x, "input"); check5(dy, "grad_output"); check5(dw, "grad_weight");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type() && dw.scalar_type() == x.scalar_type(),
              "kstconv: dtype mismatch");
  TORCH_CHECK(dw.is_contiguous(), "kstconv: grad_weight output must be contiguous");
  const Plan P(plan, kMergeTau);
  const WgradMethod m = grad_weight_method(P, x, dy, dw, groups, int(forced));
  if (m == kWgradBrgemm) grad_weight_brgemm(x, dy, dw, Plan(plan, 0.0, false), groups);
  else if (m == kWgradRows) grad_weight_rows(x, dy, dw, Plan(plan, 0.0, false), groups);
  else if (m == kWgradDirect) grad_weight_direct(x, dy, dw, Plan(plan, 0.0), groups);
  else if (m == kWgradGemmFirst)  // one class per axis: all taps, zero-filled
    grad_weight_gemm_first(x, dy, dw, Plan(gi_plan, 1e30, false), groups);
  else grad_weight_patch(x, dy, dw, P, groups);
  return m;
}

// Whether the joint backward serves a layer (mode: 0 never, 1 wherever it can run, -1 the rules).
bool joint_backward_ok(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                       const std::vector<i64>& geo, i64 groups, i64 mode) {
  check5(x, "input"); check5(dy, "grad_output"); check5(weight, "weight");
  const JointGeo G(geo);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && dy.size(1) == weight.size(1) * groups &&
                  weight.size(0) == x.size(1) && dy.size(0) == x.size(0),
              "kstconv: joint backward: inconsistent channels, batch or groups");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(x.size(2 + d) == G.L[d] && dy.size(2 + d) == G.Lo[d] &&
                    weight.size(2 + d) == G.k[d] && G.s[d] >= 1 && G.dil[d] >= 1 && G.p[d] >= 0,
                "kstconv: joint backward: geometry does not match the tensors on axis ", d);
  return joint_backward_chosen(G, x, dy, weight, groups, int(mode));
}

// grad_input, grad_weight, grad_bias in one pass; outputs that are None are not computed.
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
  joint_backward_run(x, dy, weight, dxt, dwt, dbt, G, groups);
}

// Whether the patch backward serves a layer (mode: the KSTCONV_JOINT knob, see chooser.h).
static void check_patch_backward(const at::Tensor& x, const at::Tensor& dy,
                                 const at::Tensor& weight, i64 groups) {
  check5(x, "input"); check5(dy, "grad_output"); check5(weight, "weight");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && dy.size(1) == weight.size(1) * groups &&
                  weight.size(0) == x.size(1) && dy.size(0) == x.size(0) &&
                  x.scalar_type() == dy.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "kstconv: patch backward: inconsistent channels, batch, groups or dtypes");
}

bool patch_backward_ok(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                       i64 groups, i64 mode) {
  check_patch_backward(x, dy, weight, groups);
  return patch_backward_chosen(x, dy, weight, groups, int(mode));
}

// grad_input, grad_weight, grad_bias from one patch matrix of grad_out; None: not computed.
void patch_backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                    c10::optional<at::Tensor> dx, c10::optional<at::Tensor> dw,
                    c10::optional<at::Tensor> db, const std::vector<i64>& gi_plan, i64 groups) {
  check_patch_backward(x, dy, weight, groups);
  at::Tensor dxt = dx.has_value() ? *dx : at::Tensor(), dwt = dw.has_value() ? *dw : at::Tensor();
  at::Tensor dbt = db.has_value() ? *db : at::Tensor();
  auto same = [&](const at::Tensor& t, const at::Tensor& like, const char* name) {
    check5(t, name);
    TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == x.scalar_type(), "kstconv: ",
                name, " has the wrong shape or dtype");
  };
  if (dxt.defined()) same(dxt, x, "grad_input");
  if (dwt.defined()) {
    same(dwt, weight, "grad_weight");
    TORCH_CHECK(dwt.is_contiguous(), "kstconv: grad_weight output must be contiguous");
  }
  TORCH_CHECK(!dbt.defined() || (dbt.is_contiguous() && dbt.device().is_cpu() &&
                                 dbt.scalar_type() == x.scalar_type() && dbt.dim() == 1 &&
                                 dbt.size(0) == dy.size(1)),
              "kstconv: grad_bias must be a contiguous CPU vector of C_out elements");
  backward_patch(x, dy, weight, dxt, dwt, dbt, Plan(gi_plan, 1e30, false), groups);
}

// The validity classes of a plan (per axis, per phase: (q0, q1, t0, t1) before trimming), for
// the test that checks them against geometry.validity_classes.
std::vector<std::vector<std::vector<std::vector<i64>>>> plan_classes(
    const std::vector<i64>& plan) {
  const Plan P(plan, 0.0, false);
  std::vector<std::vector<std::vector<std::vector<i64>>>> out(3);
  for (int d = 0; d < 3; ++d)
    for (const auto& phase : P.cls[d]) {
      out[d].emplace_back();
      for (const Cls& c : phase) out[d].back().push_back({c.q0, c.q1, c.t0, c.t1});
    }
  return out;
}

}  // namespace kst

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &kst::configure,
        "once, first: KSTCONV_BLAS (0 auto, 1 aten, 2 mkl, 3 brgemm)");
  m.def("gemm_paths", &kst::gemm_paths, "which GEMMs were found in libtorch_cpu");
  m.def("gemm_brgemm", &kst::gemm_brgemm_call, "the GEMM over brgemm tiles (tests)");
  m.def("set_tuning", &kst::set_tuning, "work-item sizes (tests)");
  m.def("get_tuning", &kst::get_tuning, "work-item sizes");
  m.def("implicit_whole_row_runs", [] { return kst::implicit_whole_row_runs().load(); },
        "passes of implicit GEMM (MK) that took whole-row tiles");
  m.def("skinny_gemm_runs", [] { return kst::skinny_gemm_runs().load(); },
        "calls served by the short-dimension GEMMs (tests)");
  m.def("row_kernel_runs", [] { return kst::row_kernel_runs().load(); },
        "passes the direct forward's row kernel ran (tests)");
  m.def("conv_method", py::overload_cast<const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::vector<kst::i64>&, kst::i64, bool,
                                         kst::i64, bool>(&kst::conv_method),
        "the method conv() runs for these arguments", py::arg("src"), py::arg("weight"),
        py::arg("dst"), py::arg("plan"), py::arg("groups"), py::arg("swap"), py::arg("forced"),
        py::arg("per_call") = false);
  m.def("pack_weight", &kst::pack_weight, "the weight prepared for a conv method (cacheable)");
  m.def("conv", &kst::conv, "gather-GEMM-scatter over a phase plan (forward, grad_input)");
  m.def("grad_weight", &kst::grad_weight, "per-phase weight gradient; returns the method run");
  m.def("joint_backward_ok", &kst::joint_backward_ok, "whether the joint backward serves a layer");
  m.def("joint_backward", &kst::joint_backward, "grad_input, grad_weight, grad_bias in one pass");
  m.def("patch_backward_ok", &kst::patch_backward_ok, "whether the patch backward serves a layer");
  m.def("patch_backward", &kst::patch_backward, "grad_input, grad_weight, grad_bias from one "
        "patch matrix of grad_out");
  m.def("plan_classes", &kst::plan_classes, "a plan's validity classes, untrimmed");
}
