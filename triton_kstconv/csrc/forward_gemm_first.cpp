// Forward strategy 2: GEMM first, then gather (see below).
#include <ATen/ATen.h>

#include "blas.h"
#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

// The other segregated order, for when the output has fewer channels than the input: multiply
// the real input by the whole weight first, C[(c_out, tap), pixel] = W^T x (no patch matrix of
// the input at all), then let every output phase gather-sum its own taps from C (each output
// element adds exactly the taps of its phase, in a fixed order: no zero, no atomics). With
// k == s and no padding every phase has one tap: one GEMM and a pixel shuffle.
//
// Items are (group, block of images, block of output rows along the split axis); each computes
// the input rows its outputs need (a halo of ceil(k*d/s) rows is recomputed between blocks).

namespace {

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
    T* y = Y.at(n, g * Cg, od, oh, ob0[2]);
    T* pr = Pre.at(n, g * Cg, od, oh, ob0[2]);
    const Store<T, ACT> store{bias, slope};
    auto one = [&](i64 c, i64 w) {
      store(y + c * Y.st[1] + w * Y.st[4], pr ? pr + c * Pre.st[1] + w * Pre.st[4] : nullptr,
            mk ? acc[w * Cg + c] : acc[c * nw_out + w], g * Cg + c);
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
  const i64 Mt_in = std::max<i64>(64, std::min<i64>(4096, tuning().gemm_first_cap / std::max<i64>(CK, 1)));
  // make_items counts destination pixels: about s^d of them per input pixel.
  const Items items = make_items(P, groups, N, Mt_in, nthreads, false);
  const i64 n_items = items.count();
  const bool outer_parallel = items_in_parallel(n_items);
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
          if constexpr (std::is_same<T, float>::value) {
            // a few pixels (weight-heavy layers): W streamed once, in place
            if (mk && Mr <= kShortM && skinny_gemm_available()) {
              gemm_short_m(Mr, CK, Cin_g, xb, ldx, 1, wg, CK, C + m0 * CK, CK);
              return;
            }
          }
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
        with_act(act, [&](auto A) {
          col2im_rows<T, decltype(A)::value>(C, mk, M, CK, Y, Pre, bptr, P, g, Cout_g, n0, r0, r1,
                                             ob0, ob1, ib0, ib1, kk, T(slope), a);
        });
      });
    }
  };
  maybe_parallel(outer_parallel, n_items, run);
}

}  // namespace

void conv_gemm_first(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                     at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, int act,
                     double slope) {
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_gemm_first", [&] {
    conv_gemm_first_impl<scalar_t>(src, weight, bias, dst, pre, P, groups, act, slope);
  });
}

}  // namespace kst
