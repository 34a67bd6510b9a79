// Forward strategies 1 and 5 (and grad_input's 1): per block, a phase patch matrix of the source,
// one GEMM with the packed weight (MKL's sgemm or its packed operands; 5: brgemm tiles over a
// channels-last patch matrix), and the scatter into the destination through the epilogue.
#include <ATen/ATen.h>

#include "blas.h"
#include "layout.h"
#include "packing.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

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
  const bool mk = brg || patch_layout_mk(src_in, P, Csrc_g);
  const at::Tensor src = mk ? to_channels_last<T>(src_in) : src_in;
  View5<const T> X(src);
  View5<T> Y(dst), Pre(pre);
  const T* bptr = bias.defined() ? bias.data_ptr<T>() : nullptr;

  PackIndex pi(P, Csrc_g, Cdst_g);
  if (!prep.packed.defined()) {
    prep.packed = pack_plain<T>(weight, P, groups, Csrc_g, Cdst_g, swap, false);
    // MKL's packed operands pay off when a phase's weight is multiplied by many row blocks; a
    // weight-heavy layer packed for one call (training: the weight changes every step) has a
    // block or two per phase, and the second pass over the weight cost more than it saved
    // (pix2pix 1024-512 at 4x4, batch 1, a forward that packs: 17 -> 13 ms)
    if (!brg && !weight_heavy(weight, src_in, dst))
      prep.mkl = mkl_pack_weights<T>(prep.packed.data_ptr<T>(), pi, groups, P.P, mk);
  }
  const T* packed = prep.packed.data_ptr<T>();
  const MklPacked& mp = prep.mkl;

  const int nthreads = at::get_num_threads();
  const i64 Kmax = *std::max_element(pi.K.begin(), pi.K.end());
  const Items items = make_items(P, groups, N, im2col_target(Kmax, Cdst_g), nthreads, true);
  const i64 n_items = items.count();
  const bool outer_parallel = items_in_parallel(n_items);

  auto run = [&](i64 begin, i64 end) {
    std::vector<T> cols, cbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(P, items, item, [&](const Block& b) {
        const i64 M = b.M();
        if (b.no_taps() || Csrc_g == 0) {
          scatter_act<T>(act, nullptr, mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
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
            scatter_act<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
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
            scatter_act<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
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
        scatter_act<T>(act, cbuf.data(), mk, Y, Pre, bptr, P, b, Cdst_g, T(slope));
      });
    }
  };
  maybe_parallel(outer_parallel, n_items, run);
}

}  // namespace

void conv_patch(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap, int act,
                double slope, bool use_brgemm, const Prepared& prep) {
  if (use_brgemm) {
    conv_impl<float>(src, weight, bias, dst, pre, P, groups, swap, act, slope, true, prep);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_conv_patch", [&] {
    conv_impl<scalar_t>(src, weight, bias, dst, pre, P, groups, swap, act, slope, false, prep);
  });
}

}  // namespace kst
