// Forward strategies 3 and 4 (and grad_input's 3): implicit GEMM with brgemm, no patch matrix.
// For a run of destination pixels along w, every valid tap adds
//   x[pixels + offset, c_src] x Wt[tap][c_src][c_dst]
// into an on-chip tile. MK (3): A = source pixels [run, c_src] from a channels-last copy padded
// with zeros along w (so that a run may use taps that reach past the border: the plan's w classes
// may be merged; d and h stay exact), B = Wt[tap] [c_src, c_dst]. KM (4): A = Wt[tap]^T [c_dst,
// c_src], B = the source [c_src, run] read in place. The tile is finished by the epilogue and
// stored into the destination at stride s along w.
#include "blas.h"
#include "layout.h"
#include "packing.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// Zero columns the MK copy needs on each side of w for the merged w classes.
void implicit_pads(const Plan& P, i64& pad_lo, i64& pad_hi) {
  const Axis& Aw = P.ax[2];
  pad_lo = pad_hi = 0;
  for (size_t r = 0; r < Aw.ph.size(); ++r)
    for (const Cls& c : P.cls[2][r]) {
      if (c.t1 <= c.t0) continue;
      const AxisPhase& ph = Aw.ph[r];
      const i64 smin = std::min(ph.soff[c.t0], ph.soff[c.t1 - 1]);
      const i64 smax = std::max(ph.soff[c.t0], ph.soff[c.t1 - 1]);
      pad_lo = std::max(pad_lo, -(Aw.a * c.q0 + smin));
      pad_hi = std::max(pad_hi, Aw.a * (c.q1 - 1) + smax - (Aw.L_src - 1));
    }
}

// What every tile of one pass shares.
struct Implicit {
  const Plan& P;
  View5<const float> X;   // the source, w = 0 at X.p
  View5<float> Y, Pre;
  const float* bias;
  const float* packed;
  PackIndex pi;
  i64 Csrc_g, Cdst_g, MT, CB;
  bool km;
  int act;
  float slope;
};

// One tile: destination pixels q0 .. q0 + mt of w-phase rw (class cw) at (n, qd, qh), channels
// cb .. cb + cn of group g; d and h taps [td0, td1) x [th0, th1).
void implicit_tile(const Implicit& I, float* acc, i64 g, i64 n, i64 rd, i64 qd, i64 rh, i64 qh,
                   i64 rw, const Cls& cw, i64 q0, i64 mt, i64 cb, i64 cn, i64 td0, i64 td1,
                   i64 th0, i64 th1) {
  const Plan& P = I.P;
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh], &pw = Aw.ph[rw];
  const i64 Csrc_g = I.Csrc_g, Cdst_g = I.Cdst_g, Th = ph.T(), Tw = pw.T();
  const i64 p = (rd * i64(Ah.ph.size()) + rh) * i64(Aw.ph.size()) + rw;
  const float* wt = I.packed + I.pi.at(g, p);
  const float* xn = I.X.p + n * I.X.st[0] + g * Csrc_g * I.X.st[1];
  const i64 xw = I.X.st[4];
  const brgemm_t brg = blas().brgemm;
  bool first = true;
  for (i64 td = td0; Csrc_g > 0 && td < td1; ++td) {
    const i64 sd = Ad.a * qd + pd.soff[td];
    for (i64 th = th0; th < th1; ++th) {
      const float* xrow = xn + sd * I.X.st[2] + (Ah.a * qh + ph.soff[th]) * I.X.st[3];
      const float* wrow = wt + (td * Th + th) * Tw * Csrc_g * Cdst_g;
      // Taps along w that read neighbouring pixels in ascending order form one reduction of
      // nt * c_src (rows overlap: lda = pixel step < K).
      const i64 ntw = cw.t1 - cw.t0;
      if (!I.km && ntw > 1 && xw == Csrc_g && pw.soff[cw.t0 + 1] - pw.soff[cw.t0] == 1) {
        brg(mt, cn, ntw * Csrc_g, Aw.a * xw, Cdst_g, cn, !first,
            xrow + (Aw.a * q0 + pw.soff[cw.t0]) * xw, wrow + cw.t0 * Csrc_g * Cdst_g + cb,
            acc, false);
        first = false;
        continue;
      }
      for (i64 tw = cw.t0; tw < cw.t1; ++tw) {
        const float* xs = xrow + (Aw.a * q0 + pw.soff[tw]) * xw;
        const float* wtap = wrow + tw * Csrc_g * Cdst_g;
        if (!I.km)  // acc[mt, cn] (+)= xs[mt, Csrc_g] x wtap[Csrc_g, cb:cb+cn]
          brg(mt, cn, Csrc_g, Aw.a * xw, Cdst_g, cn, !first, xs, wtap + cb, acc, false);
        else        // acc[cn, mt] (+)= wtap[cb:cb+cn, Csrc_g] x xs[Csrc_g, mt]
          brg(cn, mt, Csrc_g, Csrc_g, I.X.st[1], mt, !first, wtap + cb * Csrc_g, xs, acc, false);
        first = false;
      }
    }
  }
  const i64 od = Ad.s * qd + pd.dst_off, oh = Ah.s * qh + ph.dst_off;
  store_tile_act(I.act, first ? nullptr : acc, I.km ? 1 : cn, I.km ? mt : 1, mt, cn, I.Y, I.Pre,
                 I.bias, n, g * Cdst_g + cb, od, oh, Aw.s * q0 + pw.dst_off, Aw.s, I.slope);
}

}  // namespace

void conv_implicit(const at::Tensor& src_in, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap,
                   int act, double slope, bool km, at::Tensor packed) {
  const i64 N = src_in.size(0), Csrc_g = src_in.size(1) / groups, Cdst_g = dst.size(1) / groups;
  if (dst.numel() == 0) return;
  i64 pad_lo = 0, pad_hi = 0;
  if (!km) implicit_pads(P, pad_lo, pad_hi);
  const at::Tensor src = km ? src_in : to_channels_last<float>(src_in, pad_lo, pad_hi);
  if (!packed.defined()) packed = pack_plain<float>(weight, P, groups, Csrc_g, Cdst_g, swap, km);
  const i64 MT = km ? tuning().brg_cols
                    : std::max<i64>(1, std::min<i64>(tuning().brg_rows, (i64(1) << 13) /
                                                                   std::max<i64>(Cdst_g, 1)));
  Implicit I{P, View5<const float>(src), View5<float>(dst), View5<float>(pre),
             bias.defined() ? bias.data_ptr<float>() : nullptr, packed.data_ptr<float>(),
             PackIndex(P, Csrc_g, Cdst_g), Csrc_g, Cdst_g, MT,
             km ? std::max<i64>(1, std::min<i64>(Cdst_g, kBrgChannels)) : Cdst_g, km, act,
             float(slope)};
  I.X.p += pad_lo * I.X.st[4];  // source w = 0
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  // items: (group, n, od, oh, chunk of w); few rows: w cut into chunks so that all threads work
  const i64 rows = N * Ad.L_dst * Ah.L_dst;
  const int nthreads = at::get_num_threads();
  i64 wchunk = Aw.L_dst;
  if (rows * groups < 4 * nthreads) {
    const i64 want = (4 * nthreads + rows * groups - 1) / (rows * groups);
    wchunk = std::max<i64>(Aw.s * MT, ceil_div(ceil_div(Aw.L_dst, want), Aw.s) * Aw.s);
  }
  const i64 nch = ceil_div(Aw.L_dst, wchunk);
  at::parallel_for(0, groups * rows * nch, 1, [&](i64 begin, i64 end) {
    std::vector<float> acc(MT * std::max<i64>(I.CB, 1));
    for (i64 item = begin; item < end; ++item) {
      const i64 g = item / (rows * nch), r = (item % (rows * nch)) / nch, ch = item % nch;
      const i64 oh = r % Ah.L_dst, od = (r / Ah.L_dst) % Ad.L_dst, n = r / (Ah.L_dst * Ad.L_dst);
      const i64 rd = od % Ad.s, qd = od / Ad.s, rh = oh % Ah.s, qh = oh / Ah.s;
      const i64 ow0 = ch * wchunk, ow1 = std::min(Aw.L_dst, ow0 + wchunk);
      i64 td0, td1, th0, th1;
      class_taps(P.cls[0][rd], qd, td0, td1);
      class_taps(P.cls[1][rh], qh, th0, th1);
      for (i64 rw = 0; rw < i64(Aw.ph.size()); ++rw) {
        const AxisPhase& pw = Aw.ph[rw];
        const i64 qa = std::max<i64>(0, ceil_div(ow0 - pw.dst_off, Aw.s));
        const i64 qb = std::min<i64>(pw.Q, ceil_div(ow1 - pw.dst_off, Aw.s));
        for (const Cls& cw : P.cls[2][rw]) {
          const i64 c0 = std::max(cw.q0, qa), c1 = std::min(cw.q1, qb);
          for (i64 q0 = c0; q0 < c1; q0 += MT)
            for (i64 cb = 0; cb < Cdst_g; cb += I.CB)
              implicit_tile(I, acc.data(), g, n, rd, qd, rh, qh, rw, cw, q0, std::min(MT, c1 - q0),
                            cb, std::min(I.CB, Cdst_g - cb), td0, td1, th0, th1);
        }
      }
    }
  });
}

}  // namespace kst
