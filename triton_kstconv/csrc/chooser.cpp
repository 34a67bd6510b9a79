// The strategy rules of the C++ engine (see chooser.h).
#include "chooser.h"

#include <ATen/Parallel.h>

#include "blas.h"
#include "patches.h"

namespace kst {

namespace {

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
  const double fpp = kFlopsPerPass;
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

// The share of GEMM first's products (every input pixel times every tap) that land in the
// output: per axis, the (pixel, tap) pairs that meet an output position.
double tap_share(const Plan& P, const i64 kk[3]) {
  double r = 1;
  for (int d = 0; d < 3; ++d) r *= valid_pairs(P.ax[d]) / double(P.ax[d].L_src * kk[d]);
  return r;
}

// Whether the weight panel an implicit-GEMM tile multiplies for one (d, h) tap, [taps along w x
// c_src, c_dst] in float32, outgrows one core's L2 (every tile then streams it again).
bool panel_past_l2(const Plan& P, i64 Csrc_g, i64 Cdst_g, i64 cap_bytes = 0) {
  i64 tw_max = 0;
  for (const AxisPhase& ph : P.ax[2].ph) tw_max = std::max(tw_max, ph.T());
  const i64 l2 = cap_bytes > 0 ? std::min(cap_bytes, tuning().l2_bytes) : tuning().l2_bytes;
  return 4.0 * double(tw_max) * double(Csrc_g) * double(Cdst_g) > double(l2);
}

// Where the float32 GEMMs go over brgemm tiles (an AMD CPU with AVX-512, whose MKL path is
// AVX2; blas.h), the strategies built on brgemm's own tiles beat those built on a patch matrix
// and a GEMM. Passes side by side against oneDNN on a 2-core Zen 4 (ratio, higher is better; the
// rules' choice before / implicit GEMM or brgemm): grad_input DCGAN 256-128@8 batch 64 0.76 /
// 0.99, 512-256@4 0.76 / 0.83, U-Net 512-256@32 0.70 / 0.83, 3D U-Net 320-256@8 0.60 / 0.83,
// HiFi-GAN 256-128 k16s8 0.88 / 0.97; grad_weight HiFi-GAN 256-128 0.83 / 0.96; the patch
// backward only up to 512 rows (patch_backward_chosen).
bool brgemm_rules() {
  const i64 r = tuning().brgemm_rules;
  return r == 1 || (r == -1 && blas().brgemm_gemm);
}

// The rules (no forcing): see README "CPU engine" for the strategies.
Method rule_conv_method(const Plan& P, const at::Tensor& src, const at::Tensor& dst,
                       const at::Tensor& weight, i64 groups, bool swap, bool per_call) {
  const i64 Csrc_g = src.size(1) / groups, Cdst_g = dst.size(1) / groups;
  // depthwise, channel multipliers and groups of a few channels: no GEMM worth forming (each
  // destination element sums over at most kDirectMaxChannels source channels; blocks of 4
  // destination channels share the source loads). Since the direct path runs over whole padded
  // volumes it won at 16 channels a group too (g16 256-256 at 32x32: forward 14 vs 19 ms for
  // implicit GEMM, grad_input 12.5 vs 24); at 32 the two tied.
  if (groups > 1 && Csrc_g <= kDirectMaxChannels) return kDirect;
  const i64 kk[3] = {weight.size(2), weight.size(3), weight.size(4)};
  // grad_input of a layer with a handful of output channels (RGB heads, FSRCNN's 1, a few classes):
  // each grad_input element sums C_out x k^d products, too few for a GEMM's tiles. The direct path
  // won up to 4 channels and 81 products an element (grad_input side by side, ms, 2 threads): DCGAN
  // 64-3 at batch 64 5.5 vs 7.2 (oneDNN 4.5), pix2pix 128-3 2.1 vs 3.1 (1.6), FSRCNN 56-1 k9 s2-4
  // 0.33-0.39 vs 0.55-0.64 (0.64-0.86), 64-2 at batch 8 1.3 vs 2.6, 1-D 64-1 k4s2 1.2 vs 4.6, 3-D
  // k2s2 32-1 1.1 vs 2.3; it tied at 8 channels, lost at 16, and lost 3-D k4s2 32-3 (192 products,
  // 10.7 vs 9.8). It splits work by image and block of 4 input channels only, so it needs at least
  // one block a thread, and AVX2.
  if (swap && groups == 1 && Csrc_g <= 4 && Csrc_g * kk[0] * kk[1] * kk[2] <= 81 &&
      src.scalar_type() == at::kFloat && have_avx2() &&
      dst.size(0) * ceil_div(Cdst_g, kDirectBlock) >= at::get_num_threads())
    return kDirect;
  const bool brg = src.scalar_type() == at::kFloat && blas().brgemm;
  const i64 in_img = P.ax[0].L_src * P.ax[1].L_src * P.ax[2].L_src;
  // Weight-heavy (few pixels, a big weight, batch-1 decoders' deep layers): the forward's patch
  // matrix x BLAS, grad_input's weight streaming (the weight read once, in place).
  const bool heavy = weight_heavy(weight, src, dst);
  if (!swap) {
    if (!brg) {
      const OrderCost c = order_cost(P, src.size(0), Csrc_g, Cdst_g, groups, kk);
      return c.b < c.a ? kGemmFirst : kPatchBlas;
    }
    if (Cdst_g <= 8) return kGemmFirst;
    // Winograd F(2x2, 2x2) (k = 2s, 2-d: DCGAN's and pix2pix's k4 s2) multiplies 9 products a
    // 2 x 2 tile against 16: from 64 input and 32 output channels a group and 64 tiles a phase
    // (so that its weight, 2.25 times the packed one, is read against enough pixels) it beat
    // the rules' choice on every such layer of the suite. Forward side by side, Winograd / the
    // rule's choice before / oneDNN, ms, weight packed once (packed per call): DCGAN 512-256@4
    // batch 64 14.2 / 18.4 / 19.9 (15.6 / 19.1), batch 16 3.75 / 4.22 / 5.72; 256-128@8 batch
    // 16 3.54 / 5.80 / 5.45 (3.97 / 6.01); pix2pix 1024-256@16 7.9 / 12.9 / 11.5 (9.9 / 13.7),
    // 512-128@32 6.7 / 10.2 / 10.7, 256-64@64 7.6 / 10.6 / 10.8; 64-32@32 batch 16 6.4 / 7.5 /
    // 7.8. It lost with 16 tiles a phase (pix2pix 1024-512@8 batch 1: 8.3 / 6.2; packed per
    // call 13.6 / 7.7) and at 32 input channels (32-32@28: 13.5 / 12.9).
    if (tuning().winograd == 1 && Csrc_g >= 64 && Cdst_g >= 32 && winograd_fits(P) &&
        src.size(0) * winograd_tiles(P) >= 64)
      return kWinograd;
    // Weight-heavy with at most 16 pixels in all and a weight far past the caches (pix2pix
    // 1024-512 at 2x2 and 4x4, batch 1, 32 MiB): GEMM first streams the weight once, in place
    // (gemm_short_m, which takes the source channels-last: from 8 channels a group it is made
    // so), where at least half of its products land in the output. Forward side by side, GEMM
    // first / the rule's choice before, ms, packed weight reused: 2x2 1.9 / 3.2 (patch x
    // brgemm), 4x4 5.2 / 7.0 (patch x BLAS). It lost from a 1x1 input (a quarter of the
    // products land: 0.61 / 0.14), with an 8 MiB weight (HiFi-GAN 512-256 k16s8, batch 1, 16
    // frames: 1.52 / 1.18; 32 frames 2.86 / 1.92) and tied at 32 pixels (4x4 at batch 2: 9.4 /
    // 9.1).
    if (heavy && src.size(0) * in_img <= 16 && weight.numel() >= (i64(4) << 20) &&
        skinny_gemm_available() && (Csrc_g >= 8 || channels_last_like(src)) &&
        tap_share(P, kk) >= 0.5)
      return kGemmFirst;
    // Otherwise a few pixels (a 1x1 input, a smaller weight, or no AVX2): the phase patch
    // matrix is tiny and brgemm multiplies it best (pix2pix 1024-512 at 2x2: 3.1 ms vs 3.7 for
    // BLAS); one phase (a 1x1 latent): GEMM first.
    // Packed for one call (training), a weight-heavy layer of a handful of pixels in all takes
    // GEMM first, which reads the weight as it is: packing pix2pix 1024-512's 32 MiB weight cost
    // more than the product (batch 1, forward with a graph: at 2x2 10.5 -> 4.6 ms, at 4x4
    // 13 -> 7.8). With more pixels GEMM first's many short runs re-read the weight and lost
    // (DCGAN 512-256 at 4x4, batch 16: 18-27 ms against 7-8 for the patch matrix).
    const bool weight_as_is = per_call && heavy && src.size(0) * in_img <= 16;
    if (in_img <= 4) return P.P > 1 && !weight_as_is ? kPatchBrgemm : kGemmFirst;
    if (weight_as_is) return kGemmFirst;
    // Packed for one call, a weight-heavy layer of one tap a phase (k == s: U-Net's deep k2s2
    // up-convolutions; GEMM first is one GEMM against the weight as it is and a pixel shuffle)
    // takes GEMM first too. Training-pass forward side by side, GEMM first / the patch matrix
    // (oneDNN), ms: U-Net 1024-512@16 7.4-8.5 / 8.2-9.7 (8.6-9.3), 3D U-Net 320-320@4 1.9-2.3
    // / 2.5-2.7 (2.5-2.9). Not weight-heavy, the rule's own choice won or tied (U-Net 128-64@128 9.5 /
    // 11.2 for GEMM first, 3D U-Net 256-128@16 32 / 43).
    bool one_tap = true;  // every phase of every axis (k == s, or k < s)
    for (int d = 0; d < 3; ++d)
      for (const AxisPhase& ph : P.ax[d].ph) one_tap = one_tap && ph.T() <= 1;
    if (per_call && heavy && one_tap) return kGemmFirst;
    // Implicit GEMM (MK) multiplies tiles of brg_rows pixels, each against the phase's whole
    // weight panel for one (d, h) tap [taps_w x c_src, c_dst]: past one core's L2 that panel is
    // streamed again for every tile, and the patch matrix x BLAS (which packs the weight once per
    // block) won by 1.3-2.5x: DCGAN 512-256 at 4x4, batch 64 (27-30 vs 54 ms; patch x brgemm
    // 36), pix2pix 1024-512 at 8x8 (10 vs 19; GEMM first 27), U-Net 1024-512 (9 vs 23),
    // HiFi-GAN 512-256 k16s8 (16 vs 21). At or under L2 implicit MK won or tied (pix2pix
    // 512-128 at 32x32: 16.8 vs 19.1; 3D U-Net 320-256: 14.7 vs 17.8). Weight-heavy layers
    // (batch-1 deep decoders) take the patch matrix too: it tied GEMM first at 4x4 and beat it
    // 2.7x at 8x8 (forward methods side by side, AVX2 VM).
    //
    // Where the GEMMs go over brgemm tiles (brgemm_rules): the patch matrix from a 512 KiB
    // panel whatever the L2 (DCGAN 512-256 at 4x4, a 1 MiB panel, 2 MiB L2, batch 64, ratio to
    // oneDNN, patch / implicit: packed weight 1.11 / 0.86, packed per call 1.00 / 0.83), and GEMM
    // first for a training pass where the weight outweighs the activations eightfold (pix2pix
    // 1024-256@16 batch 1: GEMM first 0.84, patch 0.64, implicit 0.83; 1024-512@8: 1.17 / 0.88
    // / 0.48; at fivefold, DCGAN 512-256@4 batch 16, the patch matrix won: 1.12 / 0.92).
    const bool brg_rules = brgemm_rules();
    if (brg_rules && per_call && heavy && weight.numel() >= 8 * (src.numel() + dst.numel()))
      return kGemmFirst;
    if (heavy || panel_past_l2(P, Csrc_g, Cdst_g, brg_rules ? i64(512) << 10 : 0))
      return kPatchBlas;
    // Implicit KM (method 4, the source read in place) lost to MK on every layer of the suite
    // (U-Net k2s2 at 64x64: 10.5 vs 17.3 ms, 3D U-Net 64-32: 230 vs 469, HiFi-GAN 128-64 k4s2:
    // 19.8 vs 39); it stays for forcing (KSTCONV_METHOD=4).
    return kImplicitMK;
  }
  const i64 dx_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  if (heavy || dx_img <= 4) return kStreamWeight;
  if (!brg) return kPatchBlas;
  // grad_input: src = grad_out (channels Csrc_g = C_out/g), one phase over the input positions
  const i64 out_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  bool k_eq_s = true;
  for (int d = 0; d < 3; ++d) k_eq_s = k_eq_s && kk[d] == P.ax[d].a;
  const bool one_d = P.ax[0].L_dst == 1 && P.ax[1].L_dst == 1;
  // few grad_out channels (RGB heads, FSRCNN): implicit GEMM beat the patch matrix by 10-25 %
  // in 2D (dcgan 64-3, pix2pix 128-3, FSRCNN 56-1 at s 2-4)
  if (Csrc_g <= 8 && !one_d) return kImplicitMK;
  if (brgemm_rules()) return kImplicitMK;
  // rows of at most 8 pixels (DCGAN's 8x8 input): the patch matrix from a channels-last copy
  // (patch_layout_mk) beat implicit GEMM by 10-15 % at batch 16 and 64
  if (patch_layout_mk(src, P, Csrc_g)) return kPatchBlas;
  // the weight panel past L2, as in the forward: HiFi-GAN 256-128 k16s8 32 vs 42 ms, 512-256
  // k16s8 20 vs 40, pix2pix 512-128 at 32x32 22 vs 26 (HiFi-GAN 64-32 k4s2, a 32 KiB panel:
  // implicit GEMM 10.7 vs 12.7)
  if (panel_past_l2(P, Csrc_g, Cdst_g)) return kPatchBlas;
  // k == s (U-Net's k2s2) and at least 1024 input pixels: the patch matrix is grad_out
  // rearranged, one dense GEMM; in 2-D and 3-D it won from 128 grad_out channels, implicit GEMM
  // below (grad_input side by side, patch / implicit, ms): U-Net 1024-512@16 11.0 / 19.2,
  // 512-256@32 10.5 / 13.8, 256-128@64 9.8 / 10.3, 128-64@128 11.4 / 9.4; 3D U-Net 256-128@16
  // 41.8 / 40.0, 128-64@32 96.4 / 80.6, 64-32@64 325 / 203 (1-D: not measured, kept on the
  // patch matrix)
  if (Csrc_g <= 8 || (k_eq_s && out_img >= 1024 && (Csrc_g >= 128 || one_d))) return kPatchBlas;
  return kImplicitMK;
}

const char* method_name(int m) {
  switch (m) {
    case kPatchBlas: return "1 (patch matrix x BLAS)";
    case kGemmFirst: return "2 (GEMM first)";
    case kImplicitMK: return "3 (implicit GEMM, MK)";
    case kImplicitKM: return "4 (implicit GEMM, KM)";
    case kPatchBrgemm: return "5 (patch matrix x brgemm)";
    case kStreamWeight: return "6 (weight streaming)";
    case kDirect: return "7 (direct)";
    case kWinograd: return "8 (Winograd F(2x2, 2x2))";
    default: return "unknown";
  }
}

}  // namespace

Method conv_method(const Plan& P, const at::Tensor& src, const at::Tensor& dst,
                   const at::Tensor& weight, i64 groups, bool swap, int forced, bool per_call) {
  if (forced == kAutoMethod) return rule_conv_method(P, src, dst, weight, groups, swap, per_call);
  const bool f32 = src.scalar_type() == at::kFloat, brg = blas().brgemm != nullptr;
  TORCH_CHECK(forced >= kPatchBlas && forced <= kWinograd, "kstconv: no method ", forced,
              " (1-8)");
  const char* why = nullptr;
  if ((forced == kImplicitMK || forced == kImplicitKM || forced == kPatchBrgemm ||
       forced == kWinograd) && !(f32 && brg))
    why = f32 ? "needs ATen's brgemm, which this PyTorch does not export" : "needs float32";
  else if (forced == kImplicitKM && !(src.stride(4) == 1 && P.ax[2].a == 1))
    why = "reads the source in place: needs unit pixel stride along w and a stride-1 gather";
  else if ((forced == kGemmFirst || forced == kWinograd) && swap)
    why = "serves the forward only";
  else if (forced == kWinograd && !winograd_fits(P))
    why = "needs a 2-d layer whose every phase has 2 x 2 taps at neighbouring offsets (kernel = "
          "2 x stride, dilation 1, an input that meets every tap) and AVX2";
  else if (forced == kStreamWeight && !swap)
    why = "serves grad_input only";
  else if (forced == kDirect && groups == 1 && !swap)
    why = "serves grouped layers only (groups > 1) in the forward";
  else if (forced == kDirect && groups == 1 && src.size(1) > kDirectMaxChannels)
    why = "sums at most 16 grad_out channels in an ungrouped grad_input (it copies them all "
          "per image and thread)";
  TORCH_CHECK(why == nullptr, "kstconv: method ", method_name(forced), " cannot run this ",
              swap ? "grad_input" : "forward", ": it ", why);
  return Method(forced);
}

// grad_weight's direct dot products, chosen for one input channel a group (depthwise, up to 4
// multipliers) and grouped layers of up to 8 input channels a group (g32 256-256@32, 8 a group:
// 10.6 vs brgemm 16.3 ms; 4 a group: 6.4-9 vs 18-21).
bool direct_grad_weight_chosen(i64 Cin_g, i64 Cout_g, i64 groups) {
  return (Cin_g == 1 && Cout_g <= kDirectWgradMaxChannels) ||
         (groups > 1 && Cin_g <= kDirectWgradGroupChannels && Cout_g <= kDirectMaxChannels);
}

WgradMethod grad_weight_method(const Plan& P, const at::Tensor& x, const at::Tensor& dy,
                               const at::Tensor& dw, i64 groups, int forced) {
  const bool brg = x.scalar_type() == at::kFloat && blas().brgemm;
  if (forced != kAutoWgrad) {
    TORCH_CHECK(forced >= kWgradPatch && forced <= kWgradRows, "kstconv: no grad_weight "
                "method ", forced, " (1-5)");
    TORCH_CHECK(forced != kWgradDirect || x.size(1) <= kDirectMaxChannels * groups,
                "kstconv: grad_weight method 4 (direct) cannot run here: it needs at most ",
                kDirectMaxChannels, " input channels per group");
    TORCH_CHECK(forced != kWgradBrgemm || brg, "kstconv: grad_weight method 3 (brgemm) cannot "
                "run here: it needs float32 and ATen's brgemm");
    TORCH_CHECK(forced != kWgradRows || (x.scalar_type() == at::kFloat && grad_weight_rows_runs()),
                "kstconv: grad_weight method 5 (register tiles) cannot run here: it needs float32 "
                "and a CPU with AVX-512");
    return WgradMethod(forced);
  }
  // 1: phase patch matrix x BLAS; 2: input x patch matrix of grad_out (weight's own order);
  // 3: brgemm, no patch matrix.
  const i64 kk[3] = {dw.size(2), dw.size(3), dw.size(4)};
  const i64 Cin_g = x.size(1) / groups, Cout_g = dy.size(1) / groups;
  const OrderCost c = order_cost(P, x.size(0), Cin_g, Cout_g, groups, kk);
  const bool heavy = weight_heavy(dw, x, dy);
  bool k_eq_s = true;
  for (int d = 0; d < 3; ++d) k_eq_s = k_eq_s && kk[d] == P.ax[d].s;
  const i64 in_img = P.ax[0].L_src * P.ax[1].L_src * P.ax[2].L_src;
  const bool one_d = P.ax[0].L_src == 1 && P.ax[1].L_src == 1;
  if (direct_grad_weight_chosen(Cin_g, Cout_g, groups)) return kWgradDirect;
  // AVX-512: register tiles over grad_out in place wherever brgemm would run and past it (k == s
  // on large images, 1-D rows), from 4 input and 4 output channels a group; weight-heavy layers
  // and 1-3 output channels stay with GEMM first. Measured side by side (grad_weight, ms, register
  // tiles / brgemm / the rule before / oneDNN, 2-core Zen 4): DCGAN 256-128@8 batch 64 20.7 /
  // 24.5 / - / 21.0, 128-64@16 21.7 / 26.1 / - / 21.9, 512-256@4 20.8 / 25.5 / - / 24.0; U-Net
  // 128-64@128 k2s2 9.2 / 11.9 / 12.0 / 10.8; 3D U-Net 128-64@32 64 / 142 / 100 / 144, 64-32@64
  // 161 / 428 / 235 / 451; HiFi-GAN 128-64@2048 k4s2 12.9 / 26.4 / - / 14.9, 256-128 k16s8 23.6
  // / 28.4 / - / 26.0; grouped 128-256 g8 8.6 / 27.4 / 27.4 / 24.9; FCN 21-21 k16s8 0.71 / 1.40
  // / - / 2.05. GEMM first stayed ahead on DCGAN 64-3 (4.0 vs 5.4) and the weight-heavy layers
  // (pix2pix 1024-512@4 17.6 vs 31.9, DCGAN 100-512@1 0.83 vs 1.6). Its vectors hold 16 input
  // channels: from 64 channels a group, where more than an eighth of the lanes would be padding
  // (65-71, 97-99), the other rules serve (65-64@32 batch 8: 10.3 vs 8.4); below 64 the
  // alternatives did worse still (FCN's 21, 12-12 k3s2: 0.73 vs 0.94).
  const bool lanes_ok = Cin_g < 64 || 8 * ceil_div(Cin_g, 16) * 16 <= 9 * Cin_g;
  if (tuning().wgrad_rows == 1 && x.scalar_type() == at::kFloat && grad_weight_rows_runs() &&
      Cin_g >= 4 && Cout_g >= 4 && !heavy && in_img > 4 && lanes_ok)
    return kWgradRows;
  // grouped layers of 16-32 channels a group: brgemm's small tiles beat the GEMMs of a patch
  // matrix (16 channels a group: 12.6 vs 24.9; 32: tied) and tie with the direct path at 16
  if (brg && groups > 1 && Cin_g >= 8 && Cout_g >= 8) return kWgradBrgemm;
  if (heavy || in_img <= 4) return kWgradGemmFirst;
  // brgemm from 4 input and 4 output channels (ungrouped; grouped layers above): it won on few
  // channels too (grad_weight side by side, brgemm / the rule's choice before, ms): FCN 21-21 k16s8
  // 2.3 / 5.6, k4s2 0.21 / 0.36, 16-16@64 k4s2 batch 4 1.35 / 3.4 (oneDNN 1.9), 16-32@32 k3s2 0.83
  // / 1.8, 8-4@64 0.32 / 0.63, 32-4@64 0.98 / 1.29, 4-16@64 1.24 / 1.53; with 1-3 output channels
  // GEMM first won (DCGAN 64-3 1.5 / 1.2, FSRCNN 56-1 1.7 / 0.87, pix2pix 128-3 3.1 / 2.2). 1-D
  // layers: brgemm lost or tied (HiFi-GAN 256-128 k16s8: 39 vs 31-32 ms for 1 and 2; 512-256 and
  // the k4s2 layers within noise); k == s over 8192 pixels: GEMM first (16-16 k2s2 at 128x128 1.03
  // / 1.25).
  if (brg && groups == 1 && Cin_g >= 4 && Cout_g >= 4 && !(k_eq_s && in_img >= 8192) &&
      (!one_d || brgemm_rules()))
    return kWgradBrgemm;
  if (Cout_g <= 8) return kWgradGemmFirst;
  return c.b < c.a ? kWgradGemmFirst : kWgradPatch;
}

bool joint_backward_fits(const JointGeo& G, const at::Tensor& x, const at::Tensor& dy,
                         const at::Tensor& weight, i64 groups, bool any) {
  if (x.scalar_type() != at::kFloat || !blas().brgemm) return false;
  if (x.numel() == 0 || dy.numel() == 0 || weight.numel() == 0) return false;
  const i64 Cout = dy.size(1), Cin_g = x.size(1) / groups, Cout_g = Cout / groups;
  const i64 cache = G.slots_d() * G.slots_h() * G.row_width() * Cout * 4;
  const i64 wbytes = weight.numel() * 4;
  if (cache > (i64(1) << 20) || wbytes * kJointSplits > (i64(64) << 20)) return false;
  if (any) return true;
  // it runs on at most kJointSplits threads (strategies.h)
  if (at::get_num_threads() > kJointSplits) return false;
  // The grad_weight tile of one (kd, kh), [c_in, kw x c_out], is re-read and re-written by every
  // input row: it has to stay in L2, up to a quarter of it (beyond ~128 KiB the separate passes
  // won on the suite with 512 KiB of L2, see README "CPU engine"; with 1 MiB, Zen 4, backward
  // side by side at 256 KiB, joint / separate, ms: 3D U-Net 256-128@16 48.4 / 57.4, U-Net
  // 256-128@64 12.2 / 12.7, pix2pix 256-64@64 22.2 / 21.9); rows of fewer than 8 pixels make
  // too short a reduction.
  const i64 tile = Cin_g * G.k[2] * Cout_g * 4;
  // grouped layers that grad_weight's direct path serves do better with the separate passes
  // (g32 256-256@32, 8 channels a group: 20.6 vs 39.8 ms joint; 16-32 a group: tied)
  if (groups > 1 && direct_grad_weight_chosen(Cin_g, Cout_g, groups)) return false;
  return G.L[2] >= 8 && Cin_g >= 8 && Cout_g >= 8 && cache <= (i64(512) << 10) &&
         tile <= std::max<i64>(i64(128) << 10, tuning().l2_bytes / 4);
}

bool joint_backward_chosen(const JointGeo& G, const at::Tensor& x, const at::Tensor& dy,
                           const at::Tensor& weight, i64 groups, int mode) {
  return mode != 0 && joint_backward_fits(G, x, dy, weight, groups, mode == 1);
}

bool patch_backward_chosen(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                           i64 groups, int mode) {
  if (mode == 2) return true;
  if (mode != -1 || x.scalar_type() != at::kFloat) return false;
  // Many input channels and a long patch row: both GEMMs run near peak and the separate passes'
  // per-call packing and small blocks cost more than the zero taps at the border. Measured
  // side by side (backward, patch / separate, ms, 2 threads, AVX2 VM, after the patch rows were
  // built 16 rows at a time): DCGAN 512-256@4 batch 64 55.9 / 71.2, batch 16 14.3 / 22.3;
  // HiFi-GAN 512-256 k16s8 batch 16 26.8 / 36.9, batch 2 3.9 / 4.4; HiFi-GAN 256-128 k16s8
  // batch 2 7.5 / 9.4; 3D U-Net 320-320@4 3.5 / 4.0; DCGAN 256-128@8 batch 16 15.7 / 16.7;
  // U-Net 1024-512 14.2 / 17.1; pix2pix 1024-256 26.1 / 33.2, 512-128 26.9 / 31.2. With a
  // patch row of 1024 or fewer (U-Net 256-128@64 21.3 / 16.2, pix2pix 256-64@64 31.2 / 27.9,
  // 3D U-Net 256-128@16 77.4 / 69.2) or under 256 channels (DCGAN 128-64@16 19.6 / 15.2) the
  // separate passes won; so did they at 16 rows (pix2pix 1024-512@4, where they stream the
  // weight: 6.1 / 4.9). Past 1024 rows with 256-511 channels the two tied at best (DCGAN
  // 256-128@8 batch 64: 62.1 / 60.4) and varied run to run (HiFi-GAN 256-128 batch 16: 58-80
  // / 60-64; in a training call 89-109 / 90-92): left to the separate passes.
  const i64 Cin_g = x.size(1) / groups, Cout_g = dy.size(1) / groups;
  const i64 K = Cout_g * weight.size(2) * weight.size(3) * weight.size(4);
  const i64 rows = x.size(0) * x.size(2) * x.size(3) * x.size(4);
  // One or two input pixels in the whole batch (the innermost up-convolution of a U-Net
  // generator at batch 1): both passes only stream the weight and its gradient, and one pass
  // does it in less (training step, k4s2p1 from 1x1, batch 1: 512-512 3.2 vs 5.5 ms, 1024-512
  // 6.1 vs 8.2, 256-256 0.75 vs 1.33, 128-128 0.44 vs 0.63; batch 2 512-512 5.6 vs 6.1; at 4
  // pixels the two tied and at 2x2 the separate passes won, 7.0 vs 7.3).
  if (rows <= 2 && groups == 1) return true;
  // A very long patch row (FCN's k64s32, 1024 phases of a 21-channel layer: each separate
  // pass multiplies 1024 small GEMMs): 35.0 vs 46.4 ms at 16x16 (K = 86016). Measured
  // ungrouped only.
  if (groups == 1 && K >= 16384 && rows >= 64) return true;
  // Where the GEMMs go over brgemm tiles, the separate passes (brgemm's own tiles) took the
  // layers past 512 rows (backward side by side, patch / separate, ratio to oneDNN, 2-core Zen
  // 4: DCGAN 512-256@4 batch 64 0.78 / 0.90, HiFi-GAN 256-128 batch 16 0.86 / 0.95) and the
  // patch backward those up to 512 (DCGAN 512-256@4 batch 16 0.94 / 0.61, batch 32 0.88 / 0.52,
  // HiFi-GAN 512-256 batch 16 1.24 / 0.79, 256-128 batch 2 1.71 / 1.12, U-Net 1024-512@16 1.01
  // / 0.87, pix2pix 1024-256@16 1.12 / 0.96, 1024-512@8 1.69 / 1.31).
  if (brgemm_rules()) return K >= 2048 && Cin_g >= 256 && rows >= 64 && rows <= 512;
  return K >= 2048 && ((Cin_g >= 512 && rows >= 128) || (Cin_g >= 256 && rows >= 64 &&
                                                        rows <= 1024));
}

}  // namespace kst
