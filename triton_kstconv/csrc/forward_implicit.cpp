// Forward strategies 3 and 4 (and grad_input's 3): implicit GEMM with brgemm, no patch matrix.
// For a run of destination pixels along w, every valid tap adds
//   x[pixels + offset, c_src] x Wt[tap][c_src][c_dst]
// into an on-chip tile. MK (3): A = source pixels [run, c_src] from a channels-last copy padded
// with zeros along w (so that a run may use taps that reach past the border: the plan's w classes
// may be merged; d and h stay exact), B = Wt[tap] [c_src, c_dst]. KM (4): A = Wt[tap]^T [c_dst,
// c_src], B = the source [c_src, run] read in place. The tile is finished by the epilogue and
// stored into the destination at stride s along w. Rows shorter than a tile (small images: DCGAN,
// 3D U-Nets) are not a tile each: a tile spans several rows of the padded copy (whole rows).
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
// cb .. cb + cn of group g; d and h taps [td0, td1) x [th0, th1). rows > 1 (MK, whole rows of
// one class along w, see conv_implicit): the tile spans rows qh .. qh + rows of the padded
// copy as one run of (rows - 1) * pitch + mt pixels; the pixels past each row's end fall on its
// zero columns and the next row's start, and are computed but not stored.
void implicit_tile(const Implicit& I, float* acc, i64 g, i64 n, i64 rd, i64 qd, i64 rh, i64 qh,
                   i64 rw, const Cls& cw, i64 q0, i64 mt, i64 cb, i64 cn, i64 td0, i64 td1,
                   i64 th0, i64 th1, i64 rows = 1, i64 pitch = 0) {
  const i64 mrow = mt;
  mt = (rows - 1) * pitch + mrow;
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
  const i64 od = Ad.s * qd + pd.dst_off;
  for (i64 j = 0; j < rows; ++j)
    store_tile_act(I.act, first ? nullptr : acc + j * pitch * cn, I.km ? 1 : cn, I.km ? mt : 1,
                   mrow, cn, I.Y, I.Pre, I.bias, n, g * Cdst_g + cb, od,
                   Ah.s * (qh + j) + ph.dst_off, Aw.s * q0 + pw.dst_off, Aw.s, I.slope);
}

}  // namespace

std::atomic<i64>& implicit_whole_row_runs() {
  static std::atomic<i64> runs{0};
  return runs;
}

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
  // Whole rows (MK): where every w phase is one class over all its pixels and a row is shorter
  // than a tile, a tile spans rows of one h class (see implicit_tile): bigger, fewer brgemm
  // calls. Forward side by side, whole rows / one row a tile (ms): 3D U-Net 320-256@8 12.6 /
  // 14.8, 256-128@16 35.1 / 42.1; U-Net 512-256@32 12.1 / 13.7; FCN k64s32 18.5 / 20.5.
  const i64 pitch = I.X.st[3] / std::max<i64>(I.X.st[4], 1);
  bool whole_rows = tuning().whole_rows && !km && Aw.a == 1 && Ah.a == 1 &&
                    I.X.st[4] == src.size(1) && pitch * I.X.st[4] == I.X.st[3];
  i64 qmax = 0;
  for (size_t r = 0; whole_rows && r < Aw.ph.size(); ++r) {
    const auto& cs = P.cls[2][r];
    whole_rows = cs.size() == 1 && cs[0].q0 == 0 && cs[0].q1 == Aw.ph[r].Q && cs[0].t1 > cs[0].t0;
    qmax = std::max(qmax, Aw.ph[r].Q);
  }
  // a whole-row tile holds up to twice the pixels of a plain one (the accumulator up to 32 KiB):
  // DCGAN 256-128@8 and 128-64@16 at batch 16, forward side by side (ms): 8.65 / 8.69 as rows
  // of 8 and 16 pixels, 8.22 / 8.68 at 32 pixels a tile, 7.87 / 8.00 at 64 (oneDNN 7.56 / 7.73)
  const i64 MTR = std::max<i64>(1, std::min<i64>(2 * tuning().brg_rows,
                                                 (i64(1) << 13) / std::max<i64>(Cdst_g, 1)));
  whole_rows = whole_rows && qmax > 0 && qmax < MTR && pitch >= qmax;
  const int nthreads = at::get_num_threads();
  // blocks of at most R rows of one h class, as even as the class allows; R shrinks until there
  // are 4 items a thread (else one row a tile, where w can be cut too)
  struct Blk { i64 rh, q0, rows, t0, t1; };
  std::vector<Blk> blks;
  const i64 rowsd = N * Ad.L_dst * groups;
  for (i64 R = whole_rows ? (MTR - qmax) / pitch + 1 : 0; R >= 1; --R) {
    blks.clear();
    for (i64 rh = 0; rh < i64(Ah.ph.size()); ++rh)
      for (const Cls& c : P.cls[1][rh]) {
        const i64 len = c.q1 - c.q0, nb = ceil_div(len, R);
        for (i64 b = 0; b < nb; ++b) {
          const i64 q0 = c.q0 + b * len / nb, q1 = c.q0 + (b + 1) * len / nb;
          blks.push_back({rh, q0, q1 - q0, c.t0, c.t1});
        }
      }
    if (rowsd * i64(blks.size()) >= 4 * nthreads) break;
    if (R == 1) blks.clear();
  }
  if (!blks.empty()) {
    implicit_whole_row_runs().fetch_add(1, std::memory_order_relaxed);
    i64 R = 0;
    for (const Blk& b : blks) R = std::max(R, b.rows);
    const i64 nb = i64(blks.size()), rows_n = N * Ad.L_dst;
    at::parallel_for(0, groups * rows_n * nb, 1, [&](i64 begin, i64 end) {
      std::vector<float> acc(((R - 1) * pitch + qmax) * Cdst_g);
      for (i64 item = begin; item < end; ++item) {
        const i64 g = item / (rows_n * nb), r = (item % (rows_n * nb)) / nb;
        const Blk& b = blks[item % nb];
        const i64 od = r % Ad.L_dst, n = r / Ad.L_dst, rd = od % Ad.s, qd = od / Ad.s;
        i64 td0, td1;
        class_taps(P.cls[0][rd], qd, td0, td1);
        for (i64 rw = 0; rw < i64(Aw.ph.size()); ++rw) {
          const Cls& cw = P.cls[2][rw][0];
          implicit_tile(I, acc.data(), g, n, rd, qd, b.rh, b.q0, rw, cw, 0, Aw.ph[rw].Q, 0,
                        Cdst_g, td0, td1, b.t0, b.t1, b.rows, pitch);
        }
      }
    });
    return;
  }
  // items: (group, n, od, oh, chunk of w); few rows: w cut into chunks so that all threads work
  const i64 rows = N * Ad.L_dst * Ah.L_dst;
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
