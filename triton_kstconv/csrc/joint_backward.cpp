// grad_input, grad_weight and grad_bias in one pass over grad_out, with no channels-last copy of
// it in memory. Work runs over input rows (n, id, ih). Input row i reads, for kernel taps (kd,
// kh), grad_out rows o = s*i - p + k*dil; those rows are transposed to channels-last (zero
// columns on both sides of w) into a small per-thread cache of rows, where consecutive input rows
// find the ones they share. From the cached rows, along w (taps kw, input pixels iw):
//   grad_input:  dX[iw, ci]  += G[s*iw - p + kw*dil, co] x Wd[kd, kh][(kw, co), ci]
//                (A read in place at lda = s * C_out; with dil_w = 1 and one group the kw taps of a
//                pixel are one contiguous run, a single reduction of kw * C_out)
//   grad_weight: dW[kd, kh][ci, (kw, co)] += X[ci, iw] x G[s*iw - p + kw*dil, co]
//                (X read in place: its rows of w are contiguous; the reduction runs over the row)
//   grad_bias:   each grad_out row is summed once (in double), by the input row that "owns" it
//                (od in [s*id, s*id + s), the last input row owning the tail), from the cache
//                when it is there, else from grad_out itself.
// Determinism: the input rows are cut into a fixed number of ranges (independent of the thread
// count), each with its own dW / db accumulators, added in range order at the end.
#include <ATen/ATen.h>

#include "blas.h"
#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// What every range of one pass shares.
struct Joint {
  const JointGeo& G;
  View5<const float> X, Y;
  View5<float> DX;
  i64 groups, Cin_g, Cout_g, Cout, MT;
  bool want_dx, want_dw, want_db, merge_kw;
  std::vector<float> wd;       // Wd[g][kd][kh][kw][co][ci] for grad_input (ci contiguous)
  i64 dw_elems = 0;            // [g][kd][kh][ci][kw][co]
  std::vector<float> dwacc;    // per range
  std::vector<double> dbacc;   // per range
};

// The weight as grad_input's B operand: Wd[g][kd][kh][kw][co][ci].
std::vector<float> grad_input_weight(const at::Tensor& weight, i64 groups, i64 Cin_g,
                                     i64 Cout_g) {
  std::vector<float> wd(weight.numel());
  View5<const float> Wv(weight);
  const i64 KD = weight.size(2), KH = weight.size(3), KW = weight.size(4);
  for (i64 g = 0; g < groups; ++g)
    for (i64 kd = 0; kd < KD; ++kd)
      for (i64 kh = 0; kh < KH; ++kh)
        for (i64 kw = 0; kw < KW; ++kw)
          for (i64 co = 0; co < Cout_g; ++co) {
            float* o = wd.data() + ((((g * KD + kd) * KH + kh) * KW + kw) * Cout_g + co) * Cin_g;
            const float* w = Wv.at(g * Cin_g, co, kd, kh, kw);
            for (i64 ci = 0; ci < Cin_g; ++ci) o[ci] = w[ci * Wv.st[0]];
          }
  return wd;
}

// The grad_out rows input row (n, id, ih) owns, summed into dba (from the cache where there).
void sum_owned_rows(const Joint& J, i64 n, i64 id, i64 ih, const std::vector<float>& cache,
                    const std::vector<i64>& tag, double* dba) {
  const JointGeo& G = J.G;
  const i64 Do = G.Lo[0], Ho = G.Lo[1], Wo = G.Lo[2], RH = G.slots_h();
  const i64 RD = G.slots_d(), row_elems = G.row_width() * J.Cout, padlo = G.padlo();
  const i64 d0 = G.s[0] * id, d1 = id == G.L[0] - 1 ? Do : std::min(Do, d0 + G.s[0]);
  const i64 h0 = G.s[1] * ih, h1 = ih == G.L[1] - 1 ? Ho : std::min(Ho, h0 + G.s[1]);
  for (i64 od = d0; od < d1; ++od)
    for (i64 oh = h0; oh < h1; ++oh) {
      const i64 slot = (od % RD) * RH + (oh % RH);
      if (tag[slot] == (n * Do + od) * Ho + oh) {
        const float* r = cache.data() + slot * row_elems + padlo * J.Cout;
        for (i64 w = 0; w < Wo; ++w)
          for (i64 c = 0; c < J.Cout; ++c) dba[c] += r[w * J.Cout + c];
      } else {
        const float* y = J.Y.at(n, 0, od, oh, 0);
        for (i64 c = 0; c < J.Cout; ++c) {
          double sum = 0.0;
          for (i64 w = 0; w < Wo; ++w) sum += y[c * J.Y.st[1] + w * J.Y.st[4]];
          dba[c] += sum;
        }
      }
    }
}

// One input row's grad_weight share: dW[kd, kh] += X row x cached grad_out rows.
void weight_share(const Joint& J, float* dwa, i64 g, i64 n, i64 id, i64 ih,
                  const std::vector<const float*>& rp) {
  const JointGeo& G = J.G;
  const i64 KD = G.k[0], KH = G.k[1], KW = G.k[2], W = G.L[2], Cout_g = J.Cout_g;
  const brgemm_t brg = blas().brgemm;
  const float* A = J.X.at(n, g * J.Cin_g, id, ih, 0);
  for (i64 kd = 0; kd < KD; ++kd)
    for (i64 kh = 0; kh < KH; ++kh) {
      const float* r = rp[kd * KH + kh];
      if (!r) continue;
      float* C = dwa + ((g * KD + kd) * KH + kh) * J.Cin_g * KW * Cout_g;
      const float* B = r + (G.padlo() - G.p[2]) * J.Cout + g * Cout_g;
      if (J.merge_kw)
        brg(J.Cin_g, KW * Cout_g, W, J.X.st[1], G.s[2] * J.Cout, KW * Cout_g, true, A, B, C,
            false);
      else
        for (i64 kw = 0; kw < KW; ++kw)
          brg(J.Cin_g, Cout_g, W, J.X.st[1], G.s[2] * J.Cout, KW * Cout_g, true, A,
              B + kw * G.dil[2] * J.Cout, C + kw * Cout_g, false);
    }
}

// One input row's grad_input: dX[iw, ci] from the cached grad_out rows, MT pixels at a time.
void input_row(const Joint& J, std::vector<float>& acc, i64 g, i64 n, i64 id, i64 ih,
               const std::vector<const float*>& rp) {
  const JointGeo& G = J.G;
  const i64 KD = G.k[0], KH = G.k[1], KW = G.k[2], W = G.L[2], Cin_g = J.Cin_g;
  const i64 Cout_g = J.Cout_g, lda = G.s[2] * J.Cout;
  const brgemm_t brg = blas().brgemm;
  for (i64 iw0 = 0; iw0 < W; iw0 += J.MT) {
    const i64 mt = std::min(J.MT, W - iw0);
    bool first = true;
    for (i64 kd = 0; kd < KD; ++kd)
      for (i64 kh = 0; kh < KH; ++kh) {
        const float* r = rp[kd * KH + kh];
        if (!r) continue;
        const float* A = r + (G.s[2] * iw0 - G.p[2] + G.padlo()) * J.Cout + g * Cout_g;
        const float* B = J.wd.data() + ((g * KD + kd) * KH + kh) * KW * Cout_g * Cin_g;
        if (J.merge_kw) {
          brg(mt, Cin_g, KW * Cout_g, lda, Cin_g, Cin_g, !first, A, B, acc.data(), false);
          first = false;
          continue;
        }
        for (i64 kw = 0; kw < KW; ++kw) {
          brg(mt, Cin_g, Cout_g, lda, Cin_g, Cin_g, !first, A + kw * G.dil[2] * J.Cout,
              B + kw * Cout_g * Cin_g, acc.data(), false);
          first = false;
        }
      }
    store_tile<NONE>(first ? nullptr : acc.data(), Cin_g, 1, mt, Cin_g, J.DX,
                     View5<float>(at::Tensor()), nullptr, n, g * Cin_g, id, ih, iw0, 1, 0.f);
  }
}

// The input rows [r0, r1) of range sp, with their own accumulators.
void run_range(Joint& J, i64 sp, i64 r0, i64 r1) {
  const JointGeo& G = J.G;
  const i64 Do = G.Lo[0], Ho = G.Lo[1], Wo = G.Lo[2], D = G.L[0], H = G.L[1];
  const i64 KD = G.k[0], KH = G.k[1], RD = G.slots_d(), RH = G.slots_h();
  const i64 padlo = G.padlo(), row_elems = G.row_width() * J.Cout;
  std::vector<float> cache(RD * RH * row_elems);
  std::vector<i64> tag(RD * RH, i64(-1));
  std::vector<float> acc(J.MT * J.Cin_g);
  float* dwa = J.want_dw ? J.dwacc.data() + sp * J.dw_elems : nullptr;
  double* dba = J.want_db ? J.dbacc.data() + sp * J.Cout : nullptr;
  // the cached channels-last row of grad_out (n, od, oh), transposed on a miss
  auto row_of = [&](i64 n, i64 od, i64 oh) -> const float* {
    const i64 slot = (od % RD) * RH + (oh % RH), id = (n * Do + od) * Ho + oh;
    float* r = cache.data() + slot * row_elems;
    if (tag[slot] == id) return r;
    tag[slot] = id;
    std::fill(r, r + padlo * J.Cout, 0.f);
    std::fill(r + (padlo + Wo) * J.Cout, r + row_elems, 0.f);
    row_to_channels_last(J.Y.at(n, 0, od, oh, 0), J.Y.st[1], J.Y.st[4], J.Cout, Wo,
                         r + padlo * J.Cout);
    return r;
  };
  std::vector<const float*> rp(KD * KH);
  for (i64 rr = r0; rr < r1; ++rr) {
    const i64 ih = rr % H, id = (rr / H) % D, n = rr / (H * D);
    bool any = false;
    for (i64 kd = 0; kd < KD; ++kd) {
      const i64 od = G.s[0] * id - G.p[0] + kd * G.dil[0];
      for (i64 kh = 0; kh < KH; ++kh) {
        const i64 oh = G.s[1] * ih - G.p[1] + kh * G.dil[1];
        const bool ok = od >= 0 && od < Do && oh >= 0 && oh < Ho;
        rp[kd * KH + kh] = ok ? row_of(n, od, oh) : nullptr;
        any = any || ok;
      }
    }
    if (J.want_db) sum_owned_rows(J, n, id, ih, cache, tag, dba);
    for (i64 g = 0; g < J.groups; ++g) {
      if (J.want_dw && any) weight_share(J, dwa, g, n, id, ih, rp);
      if (J.want_dx) input_row(J, acc, g, n, id, ih, rp);
    }
  }
}

// The ranges' partial sums, added in range order, into dW's own layout and db.
void finish(const Joint& J, i64 S, at::Tensor& dw, at::Tensor& db) {
  const JointGeo& G = J.G;
  const i64 KD = G.k[0], KH = G.k[1], KW = G.k[2], Cin_g = J.Cin_g, Cout_g = J.Cout_g;
  if (J.want_dw) {
    View5<float> DW(dw);
    at::parallel_for(0, J.groups * Cin_g, 1, [&](i64 b0, i64 b1) {
      for (i64 gc = b0; gc < b1; ++gc) {
        const i64 g = gc / Cin_g, ci = gc % Cin_g;
        for (i64 kd = 0; kd < KD; ++kd)
          for (i64 kh = 0; kh < KH; ++kh)
            for (i64 kw = 0; kw < KW; ++kw)
              for (i64 co = 0; co < Cout_g; ++co) {
                const i64 e = ((((g * KD + kd) * KH + kh) * Cin_g + ci) * KW + kw) * Cout_g + co;
                float sum = 0.f;
                for (i64 sp = 0; sp < S; ++sp) sum += J.dwacc[sp * J.dw_elems + e];
                *DW.at(g * Cin_g + ci, co, kd, kh, kw) = sum;
              }
      }
    });
  }
  if (J.want_db) {
    float* o = db.data_ptr<float>();
    for (i64 c = 0; c < J.Cout; ++c) {
      double sum = 0.0;
      for (i64 sp = 0; sp < S; ++sp) sum += J.dbacc[sp * J.Cout + c];
      o[c] = float(sum);
    }
  }
}

}  // namespace

void joint_backward_run(const at::Tensor& x_in, const at::Tensor& dy, const at::Tensor& weight,
                        at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const JointGeo& G,
                        i64 groups) {
  const i64 N = x_in.size(0), Cin = x_in.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups, W = G.L[2];
  const bool want_dw = dw.defined();
  // grad_weight reads rows of x along w in place
  const bool rows_in_place = x_in.stride(4) == 1 && (Cin == 1 || x_in.stride(1) >= W);
  const at::Tensor x = (want_dw && !rows_in_place) ? x_in.contiguous() : x_in;
  Joint J{G, View5<const float>(x), View5<const float>(dy), View5<float>(dx), groups, Cin_g,
          Cout_g, Cout, std::max<i64>(8, std::min<i64>(64, (i64(8) << 10) / Cin_g)),
          dx.defined(), want_dw, db.defined(),
          // one reduction over the kw taps of a pixel when they are adjacent in the cached row
          G.dil[2] == 1 && groups == 1};
  if (J.want_dx) J.wd = grad_input_weight(weight, groups, Cin_g, Cout_g);
  const i64 rows = N * G.L[0] * G.L[1];
  const i64 S = std::min<i64>(rows, kJointSplits);
  J.dw_elems = groups * G.k[0] * G.k[1] * Cin_g * G.k[2] * Cout_g;
  J.dwacc.assign(want_dw ? S * J.dw_elems : 0, 0.f);
  J.dbacc.assign(J.want_db ? S * Cout : 0, 0.0);
  at::parallel_for(0, S, 1, [&](i64 sp0, i64 sp1) {
    for (i64 sp = sp0; sp < sp1; ++sp) run_range(J, sp, rows * sp / S, rows * (sp + 1) / S);
  });
  finish(J, S, dw, db);
}

}  // namespace kst
