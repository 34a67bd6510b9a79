// Patch matrices: the gather of a block's source pixels into a GEMM operand (im2col), the
// scatter of a GEMM's result into the destination through the epilogue, and the gather of a
// destination-shaped operand (grad_out of one phase).
#pragma once

#include "layout.h"
#include "plan.h"

namespace kst {

// The patch matrix layout of methods 1 and 5 (and the MKL packing made for it): MK (channels
// contiguous) for channels-last sources, and for short destination rows (<= 8 pixels a phase
// along w: DCGAN's 4x4 / 8x8 grad_input, pix2pix's inner levels) from a channels-last copy of
// the source, since KM rows of a few pixels cost more in loop overhead than the copy.
inline bool patch_layout_mk(const at::Tensor& src, const Plan& P, i64 Csrc_g) {
  if (channels_last_like(src)) return true;
  i64 qw = 0;
  for (const AxisPhase& ph : P.ax[2].ph) qw = std::max(qw, ph.Q);
  return qw <= 8 && Csrc_g >= 8;
}

// Patch matrix of a block. KM layout: cols[k][m] (m contiguous), for a source whose innermost
// spatial stride is small; MK layout: cols[m][k] (channels contiguous), for channels-last sources.
// k runs over (td, th, tw, c) of the block's tap ranges, m over (n, qd, qh, qw).
// chan_outer: k runs over (c, td, th, tw) instead (the ConvTranspose weight's own order).
template <typename T>
void im2col(const View5<const T>& X, const Plan& P, const Block& b, i64 Cg, bool mk, T* cols,
            bool chan_outer = false) {
  const i64 Tn = b.nt(0) * b.nt(1) * b.nt(2);
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const AxisPhase &pd = Ad.ph[b.r[0]], &ph = Ah.ph[b.r[1]], &pw = Aw.ph[b.r[2]];
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 Kc = b.nt(0) * b.nt(1) * b.nt(2) * Cg;
  const T* base_g = X.p + b.g * Cg * X.st[1];
  if (!mk) {
    i64 tflat = 0;
    for (i64 td = b.t0[0]; td < b.t1[0]; ++td)
      for (i64 th = b.t0[1]; th < b.t1[1]; ++th)
        for (i64 tw = b.t0[2]; tw < b.t1[2]; ++tw, ++tflat) {
          const i64 bw = pw.soff[tw];
          // valid qw: 0 <= a*qw + bw < L
          const i64 lo = std::max(b.q0[2], ceil_div(-bw, Aw.a));
          const i64 hi = std::min(b.q1[2], ceil_div(Aw.L_src - bw, Aw.a));
          for (i64 c = 0; c < Cg; ++c) {
            T* row = cols + (chan_outer ? c * Tn + tflat : tflat * Cg + c) * M;
            const T* base_c = base_g + c * X.st[1];
            for (i64 n = b.n0; n < b.n1; ++n)
              for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd) {
                const i64 sd = Ad.a * qd + pd.soff[td];
                for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, row += nqw) {
                  const i64 sh = Ah.a * qh + ph.soff[th];
                  if (sd < 0 || sd >= Ad.L_src || sh < 0 || sh >= Ah.L_src || lo >= hi) {
                    std::fill(row, row + nqw, T(0));
                    continue;
                  }
                  const T* src = base_c + n * X.st[0] + sd * X.st[2] + sh * X.st[3];
                  std::fill(row, row + (lo - b.q0[2]), T(0));
                  const i64 sw0 = Aw.a * lo + bw, step = Aw.a * X.st[4];
                  T* o = row + (lo - b.q0[2]);
                  if (step == 1) {
                    std::memcpy(o, src + sw0, sizeof(T) * (hi - lo));
                  } else {
                    const T* s = src + sw0 * X.st[4];
                    for (i64 i = 0; i < hi - lo; ++i) o[i] = s[i * step];
                  }
                  std::fill(row + (hi - b.q0[2]), row + nqw, T(0));
                }
              }
          }
        }
    return;
  }
  // MK: one row of Kc per pixel, channels contiguous
  T* row = cols;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh)
        for (i64 qw = b.q0[2]; qw < b.q1[2]; ++qw, row += Kc) {
          i64 tflat = 0;
          for (i64 td = b.t0[0]; td < b.t1[0]; ++td) {
            const i64 sd = Ad.a * qd + pd.soff[td];
            for (i64 th = b.t0[1]; th < b.t1[1]; ++th) {
              const i64 sh = Ah.a * qh + ph.soff[th];
              for (i64 tw = b.t0[2]; tw < b.t1[2]; ++tw, ++tflat) {
                const i64 sw = Aw.a * qw + pw.soff[tw];
                const bool ok = sd >= 0 && sd < Ad.L_src && sh >= 0 && sh < Ah.L_src && sw >= 0 &&
                                sw < Aw.L_src;
                const T* src = X.at(n, b.g * Cg, sd, sh, sw);
                if (chan_outer) {
                  for (i64 c = 0; c < Cg; ++c) row[c * Tn + tflat] = ok ? src[c * X.st[1]] : T(0);
                  continue;
                }
                T* o = row + tflat * Cg;
                if (!ok) std::fill(o, o + Cg, T(0));
                else if (X.st[1] == 1) std::memcpy(o, src, sizeof(T) * Cg);
                else for (i64 c = 0; c < Cg; ++c) o[c] = src[c * X.st[1]];
              }
            }
          }
        }
}

// Destination rows of a block: C is [Cg, M] (KM) or [M, Cg] (MK); nullptr means zero (bias
// only). Each element goes through the epilogue (Store): out = act(C + bias), pre where wanted.
template <typename T, int ACT>
void scatter(const T* C, bool mk, const View5<T>& Y, const View5<T>& Pre, const T* bias,
             const Plan& P, const Block& b, i64 Cg, T slope) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 rd = Ad.ph[b.r[0]].dst_off, rh = Ah.ph[b.r[1]].dst_off, rw = Aw.ph[b.r[2]].dst_off;
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 cbase = b.g * Cg;
  const i64 wst = Aw.s * Y.st[4], pwst = Aw.s * Pre.st[4];
  const Store<T, ACT> store{bias, slope};
  if (!mk) {
    for (i64 o = 0; o < Cg; ++o) {
      const T* crow = C ? C + o * M : nullptr;
      i64 m = 0;
      for (i64 n = b.n0; n < b.n1; ++n)
        for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
          for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, m += nqw) {
            const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow0 = Aw.s * b.q0[2] + rw;
            T* y = Y.at(n, cbase + o, od, oh, ow0);
            T* pr = Pre.at(n, cbase + o, od, oh, ow0);
            for (i64 i = 0; i < nqw; ++i)
              store(y + i * wst, pr ? pr + i * pwst : nullptr, crow ? crow[m + i] : T(0),
                    cbase + o);
          }
    }
    return;
  }
  i64 m = 0;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh)
        for (i64 qw = b.q0[2]; qw < b.q1[2]; ++qw, ++m) {
          const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow = Aw.s * qw + rw;
          T* y = Y.at(n, cbase, od, oh, ow);
          T* pr = Pre.at(n, cbase, od, oh, ow);
          const T* crow = C ? C + m * Cg : nullptr;
          for (i64 o = 0; o < Cg; ++o)
            store(y + o * Y.st[1], pr ? pr + o * Pre.st[1] : nullptr, crow ? crow[o] : T(0),
                  cbase + o);
        }
}

// scatter with a runtime activation code
template <typename T>
void scatter_act(int act, const T* C, bool mk, const View5<T>& Y, const View5<T>& Pre,
                 const T* bias, const Plan& P, const Block& b, i64 Cg, T slope) {
  with_act(act, [&](auto A) { scatter<T, decltype(A)::value>(C, mk, Y, Pre, bias, P, b, Cg,
                                                             slope); });
}

// Gather a destination-shaped operand (grad_out of one phase) into G: [Cg, M] or [M, Cg].
template <typename T>
void gather_dst(const View5<const T>& Y, const Plan& P, const Block& b, i64 Cg, bool mk, T* G) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 rd = Ad.ph[b.r[0]].dst_off, rh = Ah.ph[b.r[1]].dst_off, rw = Aw.ph[b.r[2]].dst_off;
  const i64 M = b.M(), nqw = b.q1[2] - b.q0[2];
  const i64 cbase = b.g * Cg, wst = Aw.s * Y.st[4];
  i64 m = 0;
  for (i64 n = b.n0; n < b.n1; ++n)
    for (i64 qd = b.q0[0]; qd < b.q1[0]; ++qd)
      for (i64 qh = b.q0[1]; qh < b.q1[1]; ++qh, m += nqw) {
        const i64 od = Ad.s * qd + rd, oh = Ah.s * qh + rh, ow0 = Aw.s * b.q0[2] + rw;
        const T* y = Y.at(n, cbase, od, oh, ow0);
        if (!mk) {
          for (i64 o = 0; o < Cg; ++o) {
            const T* yo = y + o * Y.st[1];
            T* g = G + o * M + m;
            if (wst == 1) std::memcpy(g, yo, sizeof(T) * nqw);
            else for (i64 i = 0; i < nqw; ++i) g[i] = yo[i * wst];
          }
        } else {
          for (i64 i = 0; i < nqw; ++i) {
            const T* yp = y + i * wst;
            T* g = G + (m + i) * Cg;
            if (Y.st[1] == 1) std::memcpy(g, yp, sizeof(T) * Cg);
            else for (i64 o = 0; o < Cg; ++o) g[o] = yp[o * Y.st[1]];
          }
        }
      }
}

// Epilogue of a tile: element (pixel m, channel c) of `acc` sits at acc[m * sm + c * sc] (null:
// zero); destination pixel m is (n, od, oh, ow0 + m * wstep), channel cbase + c.
template <int ACT>
void store_tile(const float* acc, i64 sm, i64 sc, i64 mt, i64 Cg, const View5<float>& Y,
                const View5<float>& Pre, const float* bias, i64 n, i64 cbase, i64 od, i64 oh,
                i64 ow0, i64 wstep, float slope) {
  float* y = Y.at(n, cbase, od, oh, ow0);
  float* pr = Pre.at(n, cbase, od, oh, ow0);
  const i64 ys = wstep * Y.st[4], ps = wstep * Pre.st[4];
  const Store<float, ACT> store{bias, slope};
  auto one = [&](i64 m, i64 c, float v) {
    store(y + m * ys + c * Y.st[1], pr ? pr + m * ps + c * Pre.st[1] : nullptr, v, cbase + c);
  };
  if (Y.st[1] == 1) {  // channels-last destination: channels innermost
    for (i64 m = 0; m < mt; ++m)
      for (i64 c = 0; c < Cg; ++c) one(m, c, acc ? acc[m * sm + c * sc] : 0.f);
    return;
  }
  i64 c8 = 0, m8 = 0;
  if (acc && sc == 1 && have_avx2()) {
    // pixel-major tile into a channel-major destination: 8 x 8 blocks through registers, so
    // that each channel's run of pixels is written in one sweep
    c8 = Cg / 8 * 8;
    m8 = mt / 8 * 8;
    alignas(32) float t[64];
    for (i64 c = 0; c < c8; c += 8)
      for (i64 m = 0; m < m8; m += 8) {
        transpose8x8(acc + m * sm + c, sm, t, 8);  // t[cc][mm]
        for (i64 cc = 0; cc < 8; ++cc)
          for (i64 mm = 0; mm < 8; ++mm) one(m + mm, c + cc, t[cc * 8 + mm]);
      }
  }
  for (i64 c = 0; c < Cg; ++c)
    for (i64 m = (c < c8 ? m8 : 0); m < mt; ++m) one(m, c, acc ? acc[m * sm + c * sc] : 0.f);
}

inline void store_tile_act(int act, const float* acc, i64 sm, i64 sc, i64 mt, i64 Cg,
                           const View5<float>& Y, const View5<float>& Pre, const float* bias,
                           i64 n, i64 cbase, i64 od, i64 oh, i64 ow0, i64 wstep, float slope) {
  with_act(act, [&](auto A) {
    store_tile<decltype(A)::value>(acc, sm, sc, mt, Cg, Y, Pre, bias, n, cbase, od, oh, ow0,
                                   wstep, slope);
  });
}

// The source pixels of an item, (n, d, h, w) in [n0, n1) x [lo, hi), as GEMM operands: KM
// [Cg, m] (ld = channel stride) or MK [m, Cg] (ld = pixel stride). Calls f(ptr, ld, m_offset,
// m_count) for runs that are one strided matrix in place (the whole block, else one image at a
// time); a block that is neither is copied into `buf` once.
template <typename T, typename F>
void for_each_source_run(const View5<const T>& X, i64 g, i64 Cg, i64 n0, i64 n1, const i64 lo[3],
                         const i64 hi[3], bool mk, std::vector<T>& buf, F&& f) {
  const i64 nd = hi[0] - lo[0], nh = hi[1] - lo[1], nw = hi[2] - lo[2];
  const i64 Mi = nd * nh * nw, M = (n1 - n0) * Mi;
  if (M == 0) return;
  const T* base = X.at(0, g * Cg, lo[0], lo[1], lo[2]);
  // Do the pixels of one image (and of all images) sit at one uniform stride u?
  auto uniform = [&](bool with_n, i64& u) {
    const i64 sz[4] = {with_n ? n1 - n0 : 1, nd, nh, nw};
    const i64 st[4] = {X.st[0], X.st[2], X.st[3], X.st[4]};
    u = -1;
    i64 expect = -1;
    for (int i = 3; i >= 0; --i) {
      if (sz[i] == 1) continue;
      if (u < 0) u = st[i], expect = st[i] * sz[i];
      else if (st[i] != expect) return false;
      else expect *= sz[i];
    }
    if (u < 0) u = mk ? Cg : 1;  // a single pixel: any stride will do
    return true;
  };
  auto fits = [&](i64 u, i64 m) { return mk ? (X.st[1] == 1 && u >= Cg) : (u == 1 && X.st[1] >= m); };
  i64 u;
  if (uniform(true, u) && fits(u, M)) {
    f(base + n0 * X.st[0], mk ? u : X.st[1], i64(0), M);
    return;
  }
  if (uniform(false, u) && fits(u, Mi)) {
    for (i64 n = n0; n < n1; ++n) f(base + n * X.st[0], mk ? u : X.st[1], (n - n0) * Mi, Mi);
    return;
  }
  if (i64(buf.size()) < M * Cg) buf.resize(M * Cg);
  T* out = buf.data();
  i64 m = 0;
  for (i64 n = n0; n < n1; ++n)
    for (i64 d = lo[0]; d < hi[0]; ++d)
      for (i64 h = lo[1]; h < hi[1]; ++h, m += nw) {
        const T* row = X.at(n, g * Cg, d, h, lo[2]);
        if (!mk) {
          for (i64 c = 0; c < Cg; ++c) {
            const T* r = row + c * X.st[1];
            T* o = out + c * M + m;
            for (i64 w = 0; w < nw; ++w) o[w] = r[w * X.st[4]];
          }
        } else {
          for (i64 w = 0; w < nw; ++w) {
            const T* px = row + w * X.st[4];
            T* o = out + (m + w) * Cg;
            for (i64 c = 0; c < Cg; ++c) o[c] = px[c * X.st[1]];
          }
        }
      }
  f(static_cast<const T*>(out), mk ? Cg : M, i64(0), M);
}

}  // namespace kst
