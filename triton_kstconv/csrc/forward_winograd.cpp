// Forward strategy 8: Winograd F(2x2, 2x2) over each output phase's 2 x 2 sub-kernel, for 2-d
// layers whose every phase has two taps a side at neighbouring source offsets (kernel = 2 x
// stride: DCGAN's, pix2pix's and most GAN up-blocks' k4 s2). Along one axis a phase reads
//   y[q] = x[q + o] g_lo + x[q + o + 1] g_hi,
// so two neighbouring outputs y[2t], y[2t + 1] from the three inputs d0, d1, d2 = x[2t + o + 0..2]
// take three products instead of four:
//   m0 = (d0 - d1) g_lo,  m1 = d1 (g_lo + g_hi),  m2 = (d2 - d1) g_hi,
//   y[2t] = m0 + m1,  y[2t + 1] = m1 + m2.
// In 2-d a tile of 2 x 2 outputs of one phase takes 9 products against 16: nine GEMMs of
// [tiles, c_in] x [c_in, c_out] (brgemm), one for each (i, j) of the input transform
// V_ij = B_i^T d B_j and the weight transform U_ij = G_i g G_j^T. Every coefficient is 0 or +-1
// (no division, no cancellation beyond one subtraction of neighbouring inputs), and U is made
// once per weight version (pack_winograd, cached as the other packings). The input is copied
// channels-last once, with zero rows and columns wherever a tile reads past the border (also
// the extra output a tile computes past an odd phase length, which is not stored).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "blas.h"
#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// One axis of a phase: its taps (index into widx / soff) with the lower and the higher source
// offset, and the lower offset.
struct PairTaps {
  i64 lo, hi, off;
};

PairTaps pair_taps(const AxisPhase& ph) {
  return ph.soff[1] == ph.soff[0] + 1 ? PairTaps{0, 1, ph.soff[0]} : PairTaps{1, 0, ph.soff[1]};
}

// Tiles along one axis (of the longest phase): every phase walks as many, the outputs past its
// own length not stored.
i64 pair_tiles(const Axis& A) {
  i64 t = 0;
  for (const AxisPhase& ph : A.ph) t = std::max(t, ceil_div(ph.Q, 2));
  return t;
}

// Zero rows (or columns) the copy needs before and after the source along one axis: tile t
// reads 2t + off + {0, 1, 2}.
void pair_pads(const Axis& A, i64& lo, i64& hi) {
  lo = hi = 0;
  const i64 tq = pair_tiles(A);
  for (const AxisPhase& ph : A.ph) {
    const i64 off = pair_taps(ph).off;
    lo = std::max(lo, -off);
    hi = std::max(hi, 2 * tq + off - (A.L_src - 1));
  }
}

// The input transform of one tile for component (i, j): v = sum of +-d[a][b] (B_i rows a, B_j
// columns b), d[a][b] at p + a * rs + b * cs.
__attribute__((target("avx2,fma"))) void input_tile(const float* __restrict p, i64 rs, i64 cs,
                                                    int i, int j, i64 C, float* __restrict v) {
  // B^T = [[1, -1, 0], [0, 1, 0], [0, -1, 1]]: component i takes rows (i0 with +1) and, for
  // i != 1, row 1 with -1
  const i64 ra = i == 0 ? 0 : i == 1 ? 1 : 2, ca = j == 0 ? 0 : j == 1 ? 1 : 2;
  const float* d_aa = p + ra * rs + ca * cs;
  const float* d_a1 = p + ra * rs + cs;
  const float* d_1a = p + rs + ca * cs;
  const float* d_11 = p + rs + cs;
  if (i != 1 && j != 1) {
    for (i64 c = 0; c < C; ++c) v[c] = (d_aa[c] - d_a1[c]) - (d_1a[c] - d_11[c]);
  } else if (i != 1) {  // j == 1: column 1 only
    for (i64 c = 0; c < C; ++c) v[c] = d_aa[c] - d_1a[c];
  } else if (j != 1) {  // i == 1: row 1 only
    for (i64 c = 0; c < C; ++c) v[c] = d_aa[c] - d_a1[c];
  } else {
    for (i64 c = 0; c < C; ++c) v[c] = d_11[c];
  }
}

// The output transform of one tile: y[a][b] = sum of m_ij over i in {a, a + 1}, j in {b, b + 1}
// (A^T = [[1, 1, 0], [0, 1, 1]]); m_ij at m + (3i + j) * ms; y[a][b] at y + a * ys + b * C.
__attribute__((target("avx2,fma"))) void output_tile(const float* __restrict m, i64 ms, i64 C,
                                                     float* __restrict y, i64 ys, bool two_w) {
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < (two_w ? 2 : 1); ++b) {
      const float* m0 = m + (3 * a + b) * ms;
      const float* m1 = m0 + ms;
      const float* m3 = m0 + 3 * ms;
      const float* m4 = m0 + 4 * ms;
      float* yo = y + a * ys + b * C;
      for (i64 c = 0; c < C; ++c) yo[c] = (m0[c] + m1[c]) + (m3[c] + m4[c]);
    }
}

// The nine components of one (c_in, phase) for all c_out: U_ij = G_i [t00 t01; t10 t11] G_j^T,
// component 3i + j at u + (3i + j) * cs.
__attribute__((target("avx2,fma"))) void weight_row(const float* __restrict t00,
                                                    const float* __restrict t01,
                                                    const float* __restrict t10,
                                                    const float* __restrict t11, i64 n,
                                                    float* __restrict u, i64 cs) {
  i64 c = 0;
  for (; c + 8 <= n; c += 8) {  // AVX2 (the nine streams defeat gcc's alias analysis)
    const __m256 a = _mm256_loadu_ps(t00 + c), b = _mm256_loadu_ps(t01 + c);
    const __m256 d = _mm256_loadu_ps(t10 + c), e = _mm256_loadu_ps(t11 + c);
    const __m256 r0 = _mm256_add_ps(a, b), r2 = _mm256_add_ps(d, e);
    _mm256_storeu_ps(u + c, a);
    _mm256_storeu_ps(u + cs + c, r0);
    _mm256_storeu_ps(u + 2 * cs + c, b);
    _mm256_storeu_ps(u + 3 * cs + c, _mm256_add_ps(a, d));
    _mm256_storeu_ps(u + 4 * cs + c, _mm256_add_ps(r0, r2));
    _mm256_storeu_ps(u + 5 * cs + c, _mm256_add_ps(b, e));
    _mm256_storeu_ps(u + 6 * cs + c, d);
    _mm256_storeu_ps(u + 7 * cs + c, r2);
    _mm256_storeu_ps(u + 8 * cs + c, e);
  }
  for (; c < n; ++c) {
    const float r0 = t00[c] + t01[c], r2 = t10[c] + t11[c];
    u[c] = t00[c];
    u[cs + c] = r0;
    u[2 * cs + c] = t01[c];
    u[3 * cs + c] = t00[c] + t10[c];
    u[4 * cs + c] = r0 + r2;
    u[5 * cs + c] = t01[c] + t11[c];
    u[6 * cs + c] = t10[c];
    u[7 * cs + c] = r2;
    u[8 * cs + c] = t11[c];
  }
}

}  // namespace

i64 winograd_tiles(const Plan& P) { return pair_tiles(P.ax[1]) * pair_tiles(P.ax[2]); }

bool winograd_fits(const Plan& P) {
  const Axis& Ad = P.ax[0];
  if (Ad.ph.size() != 1 || Ad.ph[0].T() != 1 || Ad.L_src != 1 || Ad.L_dst != 1) return false;
  for (int d = 1; d < 3; ++d) {
    const Axis& A = P.ax[d];
    if (A.a != 1) return false;
    for (const AxisPhase& ph : A.ph)
      if (ph.T() != 2 || std::abs(ph.soff[1] - ph.soff[0]) != 1) return false;
  }
  return have_avx2();
}

// U[g][p][3i + j] = G_i g G_j^T per (c_in, c_out): G = [[1, 0], [1, 1], [0, 1]], component i
// sums the tap with the lower offset (i <= 1) and the higher one (i >= 1). Items: blocks of input
// channels of a group, which read their rows of the weight once for all phases.
at::Tensor pack_winograd(const at::Tensor& weight, const Plan& P, i64 groups, i64 Cin_g,
                         i64 Cout_g) {
  const Axis &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 nph = i64(Ah.ph.size() * Aw.ph.size()), kd = P.ax[0].ph[0].widx[0];
  at::Tensor U = at::empty({groups, nph, 9, Cin_g, Cout_g}, weight.options());
  const View5<const float> Wv(weight);  // [C_in, C_out / g, kd, kh, kw]
  float* u = U.data_ptr<float>();
  const i64 CB = 16, ncb = ceil_div(Cin_g, CB);
  const i64 kh = Wv.size[3], kw = Wv.size[4], kk = kh * kw;
  const bool dense = Wv.st[4] == 1 && Wv.st[3] == kw && Wv.st[2] == kk && Wv.st[1] == Wv.size[2] * kk;
  at::parallel_for(0, groups * ncb, 1, [&](i64 b0, i64 b1) {
    std::vector<float> taps(kk * Cout_g);  // one input channel's weight as [kh, kw, c_out]
    for (i64 b = b0; b < b1; ++b) {
      const i64 g = b / ncb, c0 = (b % ncb) * CB, c1 = std::min(Cin_g, c0 + CB);
      for (i64 ci = c0; ci < c1; ++ci) {
        const float* w = Wv.p + (g * Cin_g + ci) * Wv.st[0] + kd * Wv.st[2];
        if (dense)  // [c_out, kh * kw] -> [kh * kw, c_out] by 8 x 8 transposes
          row_to_channels_last(w, kk, 1, Cout_g, kk, taps.data());
        else
          for (i64 t = 0; t < kk; ++t)
            for (i64 co = 0; co < Cout_g; ++co)
              taps[t * Cout_g + co] = w[co * Wv.st[1] + (t / kw) * Wv.st[3] + (t % kw) * Wv.st[4]];
        for (i64 p = 0; p < nph; ++p) {
          const AxisPhase &ph = Ah.ph[p / i64(Aw.ph.size())], &pw = Aw.ph[p % i64(Aw.ph.size())];
          const PairTaps th = pair_taps(ph), tw = pair_taps(pw);
          auto row = [&](const PairTaps& t, i64 side) { return side == 0 ? t.lo : t.hi; };
          const float* t00 = taps.data() + (ph.widx[row(th, 0)] * kw + pw.widx[row(tw, 0)]) * Cout_g;
          const float* t01 = taps.data() + (ph.widx[row(th, 0)] * kw + pw.widx[row(tw, 1)]) * Cout_g;
          const float* t10 = taps.data() + (ph.widx[row(th, 1)] * kw + pw.widx[row(tw, 0)]) * Cout_g;
          const float* t11 = taps.data() + (ph.widx[row(th, 1)] * kw + pw.widx[row(tw, 1)]) * Cout_g;
          weight_row(t00, t01, t10, t11, Cout_g,
                     u + ((g * nph + p) * 9 * Cin_g + ci) * Cout_g, Cin_g * Cout_g);
        }
      }
    }
  });
  return U;
}

void conv_winograd(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, int act,
                   double slope, at::Tensor packed) {
  const i64 N = src.size(0), C = src.size(1), Cin_g = C / groups, Cout_g = dst.size(1) / groups;
  if (dst.numel() == 0) return;
  if (!packed.defined()) packed = pack_winograd(weight, P, groups, Cin_g, Cout_g);
  const Axis &Ah = P.ax[1], &Aw = P.ax[2];
  const brgemm_t brg = blas().brgemm;
  // channels-last copy with zero borders: [N, Hp, Wp, C]
  i64 hlo, hhi, wlo, whi;
  pair_pads(Ah, hlo, hhi);
  pair_pads(Aw, wlo, whi);
  const i64 H = Ah.L_src, W = Aw.L_src, Hp = H + hlo + hhi, Wp = W + wlo + whi;
  at::Tensor xp_t = at::empty({N * Hp * Wp * C}, src.options());
  float* xp = xp_t.data_ptr<float>();
  {
    View5<const float> X(src);
    at::parallel_for(0, N * Hp, 1, [&](i64 r0, i64 r1) {
      for (i64 r = r0; r < r1; ++r) {
        const i64 n = r / Hp, h = r % Hp - hlo;
        float* row = xp + r * Wp * C;
        if (h < 0 || h >= H) {
          std::fill(row, row + Wp * C, 0.f);
          continue;
        }
        std::fill(row, row + wlo * C, 0.f);
        std::fill(row + (wlo + W) * C, row + Wp * C, 0.f);
        const float* xr = X.p + n * X.st[0] + h * X.st[3];
        if (X.st[1] == 1 && X.st[4] == C)  // channels-last source
          std::memcpy(row + wlo * C, xr, sizeof(float) * W * C);
        else
          row_to_channels_last(xr, X.st[1], X.st[4], C, W, row + wlo * C);
      }
    });
  }
  const View5<float> Y(dst), Pre(pre);
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* U = packed.data_ptr<float>();
  const i64 nph = i64(Ah.ph.size() * Aw.ph.size());
  const i64 TH = pair_tiles(Ah), TW = pair_tiles(Aw);
  if (TH == 0 || TW == 0) return;
  // items: (group, phase, block of RB tile rows over (n, th)); about 2 x brg_rows (64) tiles an
  // item, at least 4 items a thread
  const int nthreads = at::get_num_threads();
  const i64 trows = N * TH;
  i64 RB = std::max<i64>(1, std::min<i64>(trows, 2 * tuning().brg_rows / TW));
  while (RB > 1 && groups * nph * ceil_div(trows, RB) < 4 * nthreads) RB = ceil_div(RB, 2);
  const i64 nrb = ceil_div(trows, RB), MB = RB * TW;
  at::parallel_for(0, groups * nph * nrb, 1, [&](i64 b0, i64 b1) {
    std::vector<float> V(MB * Cin_g), M(9 * MB * Cout_g), Yr(2 * 2 * TW * Cout_g);
    for (i64 item = b0; item < b1; ++item) {
      const i64 g = item / (nph * nrb), p = (item / nrb) % nph, rb = item % nrb;
      const AxisPhase &ph = Ah.ph[p / i64(Aw.ph.size())], &pw = Aw.ph[p % i64(Aw.ph.size())];
      if (ph.Q == 0 || pw.Q == 0) continue;
      const i64 oh = pair_taps(ph).off + hlo, ow = pair_taps(pw).off + wlo;
      const i64 tr0 = rb * RB, tr1 = std::min(trows, tr0 + RB);
      const i64 tw_n = ceil_div(pw.Q, 2);
      // tiles of this item: (tr, tw) for tr in [tr0, tr1), tw < tw_n; rows of a tile past
      // this phase's TH read zero rows and are not stored
      const i64 mb = (tr1 - tr0) * tw_n;
      for (int ij = 0; ij < 9; ++ij) {
        i64 m = 0;
        for (i64 tr = tr0; tr < tr1; ++tr) {
          const i64 n = tr / TH, th = tr % TH;
          for (i64 tw = 0; tw < tw_n; ++tw, ++m) {
            const float* base = xp + ((n * Hp + 2 * th + oh) * Wp + 2 * tw + ow) * C + g * Cin_g;
            input_tile(base, Wp * C, C, ij / 3, ij % 3, Cin_g, V.data() + m * Cin_g);
          }
        }
        brg(mb, Cout_g, Cin_g, Cin_g, Cout_g, Cout_g, false, V.data(),
            U + ((g * nph + p) * 9 + ij) * Cin_g * Cout_g, M.data() + ij * MB * Cout_g, false);
      }
      i64 m = 0;
      for (i64 tr = tr0; tr < tr1; ++tr) {
        const i64 n = tr / TH, th = tr % TH;
        for (i64 tw = 0; tw < tw_n; ++tw, ++m)
          output_tile(M.data() + m * Cout_g, MB * Cout_g, Cout_g, Yr.data() + 2 * tw * Cout_g,
                      2 * TW * Cout_g, true);
        for (i64 a = 0; a < 2; ++a) {
          const i64 q = 2 * th + a;
          if (q >= ph.Q) continue;
          store_tile_act(act, Yr.data() + a * 2 * TW * Cout_g, Cout_g, 1, pw.Q, Cout_g, Y, Pre,
                         bp, n, g * Cout_g, 0, Ah.s * q + ph.dst_off, pw.dst_off, Aw.s,
                         float(slope));
        }
      }
    }
  });
}

}  // namespace kst
