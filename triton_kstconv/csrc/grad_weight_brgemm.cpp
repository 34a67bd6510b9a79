// grad_weight strategy 3: brgemm, no patch matrix. For phase p and tap t,
//   dWt[c_out, c_in] = sum over pixels q of the phase  D_p[c_out, q] x X[q + offset(t), c_in]
// with D_p the phase's grad_out de-interleaved into planes of rows (c_out-major, pixels
// contiguous) and X a channels-last copy of the input. Both share one padded row width Wc (zero
// columns beyond the real ones), so a run of whole rows is one reduction of rows x Wc pixels
// (the zero columns of D_p cancel whatever the shifted X rows hold there); on narrow images,
// where the padding is a fifth of the phases' width or more, X is instead one copy per
// column offset of the taps, each as wide as the phases' rows. Work items are tiles of
// (group, block of c_out, block of c_in), and, where that leaves threads idle, a fixed number of
// batch ranges whose partial sums are added in a fixed order: the result does not depend on the
// number of threads.
#include <algorithm>

#include "blas.h"
#include "layout.h"
#include "strategies.h"
#include "wgrad_tiles.h"

namespace kst {

namespace {

struct Operands {
  // padded: [N, D, H + 1, Wc, C_in], real pixels at columns padL + w; shifted: one copy per
  // column offset u of the taps, [N, D, H, Wc, C_in] holding x at column qw + u (zero outside)
  std::unique_ptr<float[]> xs;
  std::unique_ptr<float[]> ds;  // per phase [N, C_out, Qd, Qh, Wc]
  std::vector<i64> doff;        // offset of each phase's planes in ds
  std::vector<i64> uoff;        // shifted: the distinct column offsets, one copy each
  i64 Wc = 0, padL = 0, Hx = 0, copy = 0;  // copy: elements of one shifted copy
  bool shifted = false;
  i64 copy_of(i64 off) const {  // the shifted copy that holds column offset off
    return i64(std::find(uoff.begin(), uoff.end(), off) - uoff.begin());
  }
};

// The common padded width of the two operands.
void padded_width(const Plan& P, Operands& o) {
  const Axis& Aw = P.ax[2];
  i64 padR = 0, Qw_max = 0;
  for (const AxisPhase& ph : Aw.ph) {
    Qw_max = std::max(Qw_max, ph.Q);
    for (i64 off : ph.soff) {
      o.padL = std::max(o.padL, -off);
      padR = std::max(padR, ph.Q - 1 + off - (Aw.L_src - 1));
    }
  }
  o.Wc = std::max(Aw.L_src + o.padL + padR, Qw_max);
  // Shifted copies instead, where the padded rows would make the reductions longer than the
  // phases' own rows (a narrow input: 8 columns padded to 10 multiply 25 % zeros): one copy of
  // the input per column offset, each as wide as the widest phase, so that a reduction over
  // whole rows meets no padding column.
  // Measured (grad_weight side by side, padded / shifted / oneDNN, ms, batch 64, 2-core Zen 4):
  // DCGAN 256-128 at 8x8 27.4 / 23.2 / 19.0, 512-256 at 4x4 33.3 / 25.8 / 23.9; at 16x16 (18
  // columns for 16) the two tied (26.6 / 25.1, 25.1 / 24.7, 29.6 / 31.5), so from padding of a
  // fifth of the phases' width (10 columns for 8).
  o.shifted = tuning().wgrad_shifted == 1 && 5 * o.Wc >= 6 * Qw_max;
  if (o.shifted) {
    for (const AxisPhase& ph : Aw.ph)
      for (i64 off : ph.soff)
        if (std::find(o.uoff.begin(), o.uoff.end(), off) == o.uoff.end()) o.uoff.push_back(off);
    o.Wc = Qw_max, o.padL = 0;
  }
}

// X: channels-last, one zero row below every plane, zero columns on both sides. Buffers are not
// zero-filled up front: every element is written once, by the thread that owns its row, so
// that the pages are touched in parallel.
void input_copy(const at::Tensor& x, const Plan& P, Operands& o) {
  const i64 N = x.size(0), Cin = x.size(1), W = P.ax[2].L_src;
  const i64 D = P.ax[0].L_src, H = P.ax[1].L_src, Wc = o.Wc, padL = o.padL;
  View5<const float> Xv(x);
  if (o.shifted) {
    const i64 U = i64(o.uoff.size());
    o.Hx = H;
    o.copy = N * D * H * Wc * Cin;
    o.xs.reset(new float[std::max<i64>(1, U * o.copy)]);
    at::parallel_for(0, N * D * H, 1, [&](i64 b0, i64 b1) {
      std::vector<float> row(W * Cin);
      for (i64 r = b0; r < b1; ++r) {
        const i64 n = r / (D * H), d = (r / H) % D, h = r % H;
        row_to_channels_last(Xv.at(n, 0, d, h, 0), Xv.st[1], Xv.st[4], Cin, W, row.data());
        for (i64 u = 0; u < U; ++u) {  // columns qw with 0 <= qw + off < W hold x, others 0
          float* dst = o.xs.get() + u * o.copy + r * Wc * Cin;
          // (an offset may reach no column at all: a tap past the input, dilated kernels)
          const i64 off = o.uoff[u], q0 = std::min(Wc, std::max<i64>(0, -off)),
                    q1 = std::max(q0, std::min(Wc, W - off));
          std::fill(dst, dst + q0 * Cin, 0.f);
          if (q1 > q0)
            std::copy(row.data() + (q0 + off) * Cin, row.data() + (q1 + off) * Cin,
                      dst + q0 * Cin);
          std::fill(dst + q1 * Cin, dst + Wc * Cin, 0.f);
        }
      }
    });
    return;
  }
  o.Hx = H + 1;
  o.xs.reset(new float[std::max<i64>(1, N * D * o.Hx * Wc * Cin)]);
  at::parallel_for(0, N * D * H, 1, [&](i64 b0, i64 b1) {
    for (i64 r = b0; r < b1; ++r) {
      const i64 n = r / (D * H), d = (r / H) % D, h = r % H;
      float* row0 = o.xs.get() + (((n * D + d) * o.Hx + h) * Wc) * Cin;
      std::fill(row0, row0 + padL * Cin, 0.f);
      std::fill(row0 + (padL + W) * Cin, row0 + (h == H - 1 ? 2 : 1) * Wc * Cin, 0.f);
      row_to_channels_last(Xv.at(n, 0, d, h, 0), Xv.st[1], Xv.st[4], Cin, W, row0 + padL * Cin);
    }
  });
}

// D_p: per phase [N, Cout, Qd, Qh, Wc] (grad_out at positions s*q + r), zero beyond Qw. One pass
// over grad_out, row by row: each row (n, c, od, oh) splits into its w phases.
void grad_out_planes(const at::Tensor& dy, const Plan& P, Operands& o) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 N = dy.size(0), Cout = dy.size(1), Wc = o.Wc;
  o.doff.assign(P.P + 1, 0);
  for (i64 p = 0; p < P.P; ++p) {
    i64 c3[3];
    P.phase_coords(p, c3);
    o.doff[p + 1] = o.doff[p] + N * Cout * Ad.ph[c3[0]].Q * Ah.ph[c3[1]].Q * Wc;
  }
  o.ds.reset(new float[std::max<i64>(1, o.doff[P.P])]);
  View5<const float> Yv(dy);
  const i64 nph_h = i64(Ah.ph.size()), nph_w = i64(Aw.ph.size());
  const bool split2 = nph_w == 2 && Aw.s == 2 && Yv.st[4] == 1 && Aw.ph[0].dst_off == 0 &&
                      Aw.ph[1].dst_off == 1 && have_avx2();
  at::parallel_for(0, N * Cout * Ad.L_dst * Ah.L_dst, 1, [&](i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
      const i64 oh = b % Ah.L_dst, od = (b / Ah.L_dst) % Ad.L_dst;
      const i64 c = (b / (Ah.L_dst * Ad.L_dst)) % Cout, n = b / (Ah.L_dst * Ad.L_dst * Cout);
      const i64 rd = od % Ad.s, qd = od / Ad.s, rh = oh % Ah.s, qh = oh / Ah.s;
      const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh];
      if (qd >= pd.Q || qh >= ph.Q) continue;
      const float* yr = Yv.at(n, c, od, oh, 0);
      const i64 row = (((n * Cout + c) * pd.Q + qd) * ph.Q + qh) * Wc;
      const i64 p0 = (rd * nph_h + rh) * nph_w;
      if (split2) {  // stride 2 along w, unit pixel stride: both phases in one pass
        float* o0 = o.ds.get() + o.doff[p0] + row;
        float* o1 = o.ds.get() + o.doff[p0 + 1] + row;
        const i64 q0 = Aw.ph[0].Q, q1 = Aw.ph[1].Q;
        const i64 done = deinterleave2(yr, std::min(q0, q1), o0, o1);
        for (i64 qw = done; qw < q0; ++qw) o0[qw] = yr[2 * qw];
        for (i64 qw = done; qw < q1; ++qw) o1[qw] = yr[2 * qw + 1];
        std::fill(o0 + q0, o0 + Wc, 0.f);
        std::fill(o1 + q1, o1 + Wc, 0.f);
        continue;
      }
      for (i64 rw = 0; rw < nph_w; ++rw) {
        const AxisPhase& pw = Aw.ph[rw];
        float* out = o.ds.get() + o.doff[p0 + rw] + row;
        std::fill(out + pw.Q, out + Wc, 0.f);
        const float* y = yr + pw.dst_off * Yv.st[4];
        const i64 ws = Aw.s * Yv.st[4];
        if (ws == 2)   // the common stride, a constant to the compiler
          for (i64 qw = 0; qw < pw.Q; ++qw) out[qw] = y[2 * qw];
        else
          for (i64 qw = 0; qw < pw.Q; ++qw) out[qw] = y[qw * ws];
      }
    }
  });
}

// The tiles of dW: c_out rows x c_in columns, up to 128 x 128, halved (the wider side first)
// down to 64 while there are fewer than kItems tiles, and then the batch is split into a fixed
// number of ranges: larger tiles make longer brgemm rows and fewer calls, and a batch split
// costs only the partial sums' addition (grad_weight side by side, tiles of at least 64 / at
// least 32 as before, ms: DCGAN 128-64@16 batch 64 36.2 / 41.7, 3D U-Net 128-64@32 78 / 95,
// 256-128@16 33 / 38, U-Net 512-256@32 12.2 / 13.8, 128-64@128 11.6 / 13.7; the others within
// noise). The ranges depend on the shape only, so that the sums do not depend on the number of
// threads; tiles are then halved down to 32 (no change to any sum) only where there would be
// fewer items than threads (a batch of one, few channels).
struct Tiling {
  static constexpr i64 kItems = 8;
  i64 MB = 128, NB = 128, nmb = 1, nnb = 1, tiles = 1, nsplit = 1;
  Tiling(i64 N, i64 groups, i64 Cout_g, i64 Cin_g, i64 nthreads) {
    NB = std::min<i64>(Cin_g, 128);
    MB = std::min<i64>(Cout_g, 128);
    auto count = [&] { return groups * ceil_div(Cout_g, MB) * ceil_div(Cin_g, NB); };
    auto halve = [&](i64 floor) {  // the wider side first; false where neither stays >= floor
      if (NB >= MB && NB / 2 >= floor) NB /= 2;
      else if (MB / 2 >= floor) MB /= 2;
      else if (NB / 2 >= floor) NB /= 2;
      else return false;
      return true;
    };
    while (count() < kItems && halve(64)) {}
    nsplit = std::max<i64>(1, std::min<i64>(N, ceil_div(kItems, count())));
    while (count() * nsplit < nthreads && halve(32)) {}
    nmb = ceil_div(Cout_g, MB);
    nnb = ceil_div(Cin_g, NB);
    tiles = groups * nmb * nnb;
  }
  void tile(i64 t, i64 Cout_g, i64 Cin_g, i64& g, i64& co0, i64& mco, i64& ci0, i64& nci) const {
    g = t / (nmb * nnb);
    const i64 mb = (t / nnb) % nmb, nb = t % nnb;
    co0 = mb * MB, mco = std::min(MB, Cout_g - co0);
    ci0 = nb * NB, nci = std::min(NB, Cin_g - ci0);
  }
};

// acc[j][co][ci] (+)= the tile's reduction over images [n0, n1), every phase and tap.
void reduce_tile(const Plan& P, const Operands& o, float* acc, i64 g, i64 co0, i64 mco, i64 ci0,
                 i64 nci, i64 n0, i64 n1, i64 Cin, i64 Cout, i64 Cin_g, i64 Cout_g,
                 const i64 kk[3]) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 D = Ad.L_src, H = Ah.L_src, Wc = o.Wc;
  const brgemm_t brg = blas().brgemm;
  for (i64 p = 0; p < P.P; ++p) {
    i64 c3[3];
    P.phase_coords(p, c3);
    const AxisPhase &pd = Ad.ph[c3[0]], &ph = Ah.ph[c3[1]], &pw = Aw.ph[c3[2]];
    if (pd.T() * ph.T() * pw.T() == 0 || pd.Q * ph.Q * pw.Q == 0) continue;
    const i64 plane = ph.Q * Wc;  // one (n, c, qd) plane of D_p, rows of Wc pixels
    // The plane is reduced in chunks of kWgradPixels consecutive pixels (rows are contiguous
    // in both operands, so any range is one strided matrix); each tap takes the part of the
    // chunk whose rows meet real input rows.
    for (i64 n = n0; n < n1; ++n)
      for (i64 qd = 0; qd < pd.Q; ++qd)
        for (i64 k0 = 0; k0 < plane; k0 += kWgradPixels) {
          const i64 k1 = std::min(plane, k0 + kWgradPixels);
          const float* A0 =
              o.ds.get() + o.doff[p] + ((n * Cout + g * Cout_g + co0) * pd.Q + qd) * plane;
          for (i64 td = 0; td < pd.T(); ++td) {
            const i64 sd = qd + pd.soff[td];
            if (sd < 0 || sd >= D) continue;
            const float* Xplane = o.xs.get() + ((n * D + sd) * o.Hx) * Wc * Cin + g * Cin_g + ci0;
            for (i64 th = 0; th < ph.T(); ++th) {
              // rows qh with 0 <= qh + offset < H
              const i64 a = std::max(k0, std::max<i64>(0, -ph.soff[th]) * Wc);
              const i64 b = std::min(k1, std::min(ph.Q, H - ph.soff[th]) * Wc);
              if (a >= b) continue;
              for (i64 tw = 0; tw < pw.T(); ++tw) {
                const i64 j = (pd.widx[td] * kk[1] + ph.widx[th]) * kk[2] + pw.widx[tw];
                const float* B =
                    o.shifted
                        ? Xplane + o.copy_of(pw.soff[tw]) * o.copy + (a + ph.soff[th] * Wc) * Cin
                        : Xplane + (a + ph.soff[th] * Wc + pw.soff[tw] + o.padL) * Cin;
                brg(mco, nci, b - a, pd.Q * plane, Cin, nci, true, A0 + a, B,
                    acc + j * mco * nci, false);
              }
            }
          }
        }
  }
}

}  // namespace

void grad_weight_brgemm(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                        i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  float* out = dw.data_ptr<float>();
  std::fill(out, out + dw.numel(), 0.f);
  if (x.numel() == 0 || dy.numel() == 0 || Cin_g == 0 || Cout_g == 0) return;
  const i64 kk[3] = {dw.size(2), dw.size(3), dw.size(4)};
  Operands o;
  padded_width(P, o);
  input_copy(x, P, o);
  grad_out_planes(dy, P, o);
  const Tiling T(N, groups, Cout_g, Cin_g, at::get_num_threads());
  const i64 KKt = kk[0] * kk[1] * kk[2];
  struct NoState {};
  run_wgrad_tiles<NoState>(
      out, N, Cin_g, Cout_g, KKt, T.tiles, T.nsplit, KKt * T.MB * T.NB,
      [&](i64 t, i64& g, i64& co0, i64& mco, i64& ci0, i64& nci) {
        T.tile(t, Cout_g, Cin_g, g, co0, mco, ci0, nci);
      },
      [&](NoState&, float* acc, i64 g, i64 co0, i64 mco, i64 ci0, i64 nci, i64 n0, i64 n1) {
        reduce_tile(P, o, acc, g, co0, mco, ci0, nci, n0, n1, Cin, Cout, Cin_g, Cout_g, kk);
      });
}

}  // namespace kst
