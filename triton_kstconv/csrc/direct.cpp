// Direct strategy (method 7, grad_weight method 4) for grouped layers of few channels
// (depthwise, channel multipliers, groups of up to 16), and for grad_input of layers with a
// handful of output channels (RGB heads): each destination element sums over a handful of
// source channels, so there is no GEMM worth forming (a GEMM library sees matrices of
// width 1-16) and the layer is bound by memory. Destination volumes are computed from their
// group's source volumes directly, vectorised along w:
//   - per (image, group), each source volume is copied once into a zero-padded volume split
//     into its residues per axis (the stride the source is read at; grad_input reads grad_out at
//     stride s), so that every tap of every phase is one flat shift of a contiguous run;
//   - per band of destination rows and phase, all taps (source channel x d x h x w) are summed
//     in one pass with the sums in registers (AVX2 FMA), blocks of 4 destination channels
//     sharing every source load; the epilogue (bias, activation) runs on the sums, then each
//     destination row is interleaved from its w-phases and written once (non-temporal stores
//     for destinations far larger than the caches).
//   The depthwise forward at stride 2 along w (float32, 1-D / 2-D: the decoders' upsamplers)
//   skips the phase buffers: a row kernel makes each destination row's even and odd sums in
//   registers and interleaves them as it stores (direct_rows_w2 below).
//   forward:     dst = output, src = input, every output channel of the group
//   grad_input:  dst = grad_in, src = grad_out, a sum over the group's output channels
//   grad_weight: dW[g x C_in/g, co, taps] = sum over images and phase pixels of grad_out x
//                input (up to 16 input channels a group), each (g, co) owned by one thread
//                and summed in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>

#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// out[j][q] = sum over taps t of w[j * ldw + t] * x[t][q] for CB destination channels j and q in
// [0, n): every tap in one pass, the sums in registers, the accumulation order fixed
// (deterministic). Each source vector is loaded once for all CB channels (CB broadcasts, 2 x CB
// FMAs per two loads): the register blocking over output channels that groups of 8 need.
template <int CB>
__attribute__((target("avx2,fma"))) void taps_block_avx2(float* const* out, const float* w,
                                                         i64 ldw, const float* const* x, i64 T,
                                                         i64 n) {
  i64 q = 0;
  for (; q + 16 <= n; q += 16) {
    __m256 v0[CB], v1[CB];
    for (int j = 0; j < CB; ++j) v0[j] = _mm256_setzero_ps(), v1[j] = _mm256_setzero_ps();
    for (i64 t = 0; t < T; ++t) {
      const __m256 x0 = _mm256_loadu_ps(x[t] + q), x1 = _mm256_loadu_ps(x[t] + q + 8);
      for (int j = 0; j < CB; ++j) {
        const __m256 wt = _mm256_broadcast_ss(w + j * ldw + t);
        v0[j] = _mm256_fmadd_ps(wt, x0, v0[j]);
        v1[j] = _mm256_fmadd_ps(wt, x1, v1[j]);
      }
    }
    for (int j = 0; j < CB; ++j) {
      _mm256_storeu_ps(out[j] + q, v0[j]);
      _mm256_storeu_ps(out[j] + q + 8, v1[j]);
    }
  }
  for (; q + 8 <= n; q += 8) {
    __m256 v0[CB];
    for (int j = 0; j < CB; ++j) v0[j] = _mm256_setzero_ps();
    for (i64 t = 0; t < T; ++t) {
      const __m256 x0 = _mm256_loadu_ps(x[t] + q);
      for (int j = 0; j < CB; ++j)
        v0[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j * ldw + t), x0, v0[j]);
    }
    for (int j = 0; j < CB; ++j) _mm256_storeu_ps(out[j] + q, v0[j]);
  }
  for (; q < n; ++q)
    for (int j = 0; j < CB; ++j) {
      float v = 0;
      for (i64 t = 0; t < T; ++t) v += w[j * ldw + t] * x[t][q];
      out[j][q] = v;
    }
}

template <typename T>
inline void taps(T* __restrict out, const T* w, const T* const* x, i64 nt, i64 n) {
  if constexpr (std::is_same<T, float>::value)
    if (have_fma()) {
      float* const o[1] = {out};
      return taps_block_avx2<1>(o, w, 0, x, nt, n);
    }
  for (i64 q = 0; q < n; ++q) {
    T v = 0;
    for (i64 t = 0; t < nt; ++t) v += w[t] * x[t][q];
    out[q] = v;
  }
}

// taps() for cb (1-kDirectBlock) destination channels sharing the source rows
template <typename T>
inline void taps_block(T* const* out, const T* w, i64 ldw, const T* const* x, i64 nt, i64 n,
                       i64 cb) {
  if constexpr (std::is_same<T, float>::value)
    if (have_fma() && cb > 1) {
      static_assert(kDirectBlock == 4, "one kernel per block size");
      switch (cb) {
        case 2: return taps_block_avx2<2>(out, w, ldw, x, nt, n);
        case 3: return taps_block_avx2<3>(out, w, ldw, x, nt, n);
        default: return taps_block_avx2<4>(out, w, ldw, x, nt, n);
      }
    }
  for (i64 j = 0; j < cb; ++j) taps(out[j], w + j * ldw, x, nt, n);
}

// The `a` residues of a row of L elements (stride xst): dst[r * rst + i] = x[a * i + r] (AVX2
// de-interleaving for a = 2, 8 x 8 transposes for a = 8).
template <typename T>
void split_residues(const T* x, i64 xst, i64 L, i64 a, T* dst, i64 rst) {
  if (a == 1) {
    if (xst == 1) std::copy(x, x + L, dst);
    else for (i64 j = 0; j < L; ++j) dst[j] = x[j * xst];
    return;
  }
  i64 done = 0;   // elements of x split by the vector paths
  if constexpr (std::is_same<T, float>::value)
    if (xst == 1 && have_avx2()) {
      if (a == 2) done = 2 * deinterleave2(x, L / 2, dst, dst + rst);
      if (a == 8)
        for (; done + 64 <= L; done += 64) transpose8x8(x + done, 8, dst + done / 8, rst);
    }
  for (i64 r = 0; r < a; ++r)   // the rest (done is a multiple of a): no division per element
    for (i64 i = done / a; a * i + r < L; ++i) dst[r * rst + i] = x[(a * i + r) * xst];
}

// Whether a destination axis's phases are its residues in order (phase r at positions s q + r).
inline bool phases_in_order(const Axis& A) {
  bool in_order = i64(A.ph.size()) == A.s;
  for (i64 r = 0; in_order && r < A.s; ++r) in_order = A.ph[r].dst_off == r;
  return in_order;
}

// One axis of a padded source volume: zero-padded so that every tap of every phase reads inside
// it, and split into its `a` residues (a: the stride the source is read at): residue r, element
// i is padded position a * i + r, i.e. source position a * i + r - left.
struct PaddedAxis {
  i64 a = 1, left = 0, ld = 0;   // left: a multiple of a; ld: elements of one residue
  i64 qmax = 0;                  // the most destination positions of a phase
  std::vector<std::vector<i64>> r, i0;  // per phase, per tap: where q = 0 reads
  explicit PaddedAxis(const Axis& A) : a(A.a) {
    i64 lo = 0, hi = A.L_src;
    for (const AxisPhase& p : A.ph) {
      qmax = std::max(qmax, p.Q);
      for (i64 t = 0; t < p.T() && p.Q > 0; ++t) {
        lo = std::min(lo, p.soff[t]);
        hi = std::max(hi, a * (p.Q - 1) + p.soff[t] + 1);
      }
    }
    left = ((-lo + a - 1) / a) * a;
    ld = (left + hi + a - 1) / a;
    for (const AxisPhase& p : A.ph) {
      r.emplace_back();
      i0.emplace_back();
      for (i64 t = 0; t < p.T(); ++t) {
        const i64 pos = p.soff[t] + left;
        r.back().push_back(pos % a);
        i0.back().push_back(pos / a);
      }
    }
  }
  // the row pitch: room for a residue's elements and for a phase's destination positions
  i64 pitch() const { return std::max(ld, qmax); }
  // source row x (L elements, stride xst) into its residues (the padding is not written: the
  // caller's buffer holds zeros there)
  template <typename T>
  void split(const T* x, i64 xst, i64 L, T* dst, i64 rst) const {
    split_residues(x, xst, L, a, dst + left / a, rst);
  }
};

// A source volume (one channel of one image), zero-padded on every axis and split into its
// residues per axis, laid out [r_d][r_h][r_w][i_d][i_h][i_w] with pitches (S0, S1, 1): every tap
// of every phase is then one flat shift, and a phase's destination q = (qd, qh, qw) sits at
// qd * S0 + qh * S1 + qw. A band of rows of a phase is one contiguous run: the columns between
// Q_w and the pitch are computed and dropped (their reads stay inside the volume).
struct PaddedVolume {
  PaddedAxis ax[3];
  i64 S0 = 0, S1 = 0, sub = 0, size = 0;  // sub: one residue combination
  explicit PaddedVolume(const Plan& P) : ax{PaddedAxis(P.ax[0]), PaddedAxis(P.ax[1]),
                                             PaddedAxis(P.ax[2])} {
    S1 = ax[2].pitch();
    S0 = ax[1].pitch() * S1;
    sub = ax[0].ld * S0;
    size = ax[0].a * ax[1].a * ax[2].a * sub;
  }
  // where q = 0 of phase (rd, rh, rw) reads for taps (td, th, tw)
  i64 tap(i64 rd, i64 rh, i64 rw, i64 td, i64 th, i64 tw) const {
    const i64 base = (ax[0].r[rd][td] * ax[1].a + ax[1].r[rh][th]) * ax[2].a + ax[2].r[rw][tw];
    return base * sub + ax[0].i0[rd][td] * S0 + ax[1].i0[rh][th] * S1 + ax[2].i0[rw][tw];
  }
  // source plane x (D x H rows of W) into `dst`, whose padding holds zeros
  template <typename T>
  void fill(const View5<const T>& X, i64 n, i64 c, T* dst) const {
    const i64 D = X.size[2], H = X.size[3], W = X.size[4];
    for (i64 d = 0; d < D; ++d) {
      const i64 pd = d + ax[0].left, pdr = pd % ax[0].a, pdi = pd / ax[0].a;
      for (i64 h = 0; h < H; ++h) {
        const i64 ph = h + ax[1].left, phr = ph % ax[1].a, phi = ph / ax[1].a;
        T* row = dst + (pdr * ax[1].a + phr) * ax[2].a * sub + pdi * S0 + phi * S1;
        ax[2].split(X.at(n, c, d, h, 0), X.st[4], W, row, sub);
      }
    }
  }
};

// Per axis, destination index o -> (phase, q).
struct RowMap {
  std::vector<i64> ph, q;
  explicit RowMap(const Axis& A) : ph(A.L_dst, -1), q(A.L_dst, 0) {
    for (i64 r = 0; r < i64(A.ph.size()); ++r)
      for (i64 j = 0; j < A.ph[r].Q; ++j) {
        const i64 o = A.s * j + A.ph[r].dst_off;
        ph[o] = r;
        q[o] = j;
      }
  }
};

// How a pass writes its destination rows from the w-phases' sums.
struct RowWrite {
  bool pair = false;    // two phases interleaved (s = 2), AVX2
  bool eight = false;   // eight phases interleaved (s = 8) by 8 x 8 transposes, AVX2
  bool plain = false;   // one phase, s = 1: a copy
  bool stream = false;  // non-temporal stores (a destination far larger than the caches)
  RowWrite(const Axis& Aw, bool f32, i64 dst_bytes, i64 dst_w_stride) {
    const i64 nph = i64(Aw.ph.size());
    const bool in_order = phases_in_order(Aw);
    pair = f32 && Aw.s == 2 && in_order && have_avx2();
    eight = f32 && Aw.s == 8 && in_order && have_avx2();
    plain = nph == 1 && Aw.s == 1 && Aw.ph[0].dst_off == 0;
    stream = f32 && dst_w_stride == 1 && dst_bytes >= tuning().stream_bytes && have_avx2();
  }
};

// One destination row from its w-phases' sums: `ph[rw]` holds phase rw's Q elements, phase rows
// `ldp` apart (the epilogue runs on them in place, then they are written into the row once);
// `ph` null: a row no phase reaches (bias only).
template <typename T, int ACT>
void store_row(const View5<T>& Y, const View5<T>& Pre, const T* bias, T slope, const Axis& Aw,
               const RowWrite& wr, T* const* ph, i64 ldp, T* row, i64 n, i64 c, i64 od,
               i64 oh) {
  const i64 Lw = Aw.L_dst, nph = i64(Aw.ph.size());
  const T bv = bias ? bias[c] : T(0);
  T* y = Y.at(n, c, od, oh, 0);
  const i64 ys = Y.st[4];
  if (ph && !Pre.p && (ACT != 0 || bias))   // the epilogue on the sums, before the one write
    for (i64 r = 0; r < nph; ++r)
      for (i64 q = 0; q < Aw.ph[r].Q; ++q) ph[r][q] = act_fn<T, ACT>(ph[r][q] + bv, slope);
  const bool done_epilogue = ph && !Pre.p;
  T* out = (ys == 1 && !Pre.p) ? y : row;
  i64 done = 0;
  if (!ph) {
    std::fill(out, out + Lw, T(0));
    done = Lw;
  } else if (wr.plain) {
    std::copy(ph[0], ph[0] + Lw, out);
    done = Lw;
  } else if constexpr (std::is_same<T, float>::value) {
    const bool nt = wr.stream && out == y;
    if (wr.pair) done = 2 * interleave2(ph[0], ph[1], Aw.ph[1].Q, out, nt);
    else if (wr.eight) done = 8 * interleave8(ph[0], ldp, Aw.ph[7].Q, out, nt);
  }
  // the rest: position o = s * q + r (phases in order when pair / eight did the head)
  for (i64 rw = 0; rw < nph && done < Lw; ++rw) {
    const AxisPhase& pw = Aw.ph[rw];
    for (i64 q = ceil_div(std::max<i64>(0, done - pw.dst_off), Aw.s); q < pw.Q; ++q)
      out[Aw.s * q + pw.dst_off] = ph[rw][q];
  }
  if (out == y) {
    if (!done_epilogue && (ACT != 0 || bias))
      for (i64 o = 0; o < Lw; ++o) y[o] = act_fn<T, ACT>(y[o] + bv, slope);
  } else if (Pre.p) {
    T* pp = Pre.at(n, c, od, oh, 0);
    for (i64 o = 0; o < Lw; ++o) {
      const T v = out[o] + bv;
      pp[o * Pre.st[4]] = v;
      y[o * ys] = act_fn<T, ACT>(v, slope);
    }
  } else if (done_epilogue) {
    for (i64 o = 0; o < Lw; ++o) y[o * ys] = out[o];
  } else {
    for (i64 o = 0; o < Lw; ++o) y[o * ys] = act_fn<T, ACT>(out[o] + bv, slope);
  }
}

// Accumulator budget of one band (floats, all phases of a d-slice and channels of a block).
constexpr i64 kDirectBand = i64(1) << 15;

// Destination volumes in blocks of up to kDirectBlock channels of one (image, group): block b is
// (n, g, channels [cb0, cb0 + cb)); the channels of a block share every source load. Per
// destination d-slice, bands of rows: every (h, w) phase's rows of the band in one pass over all
// its taps (source channel x d x h x w, each a flat shift of the padded volumes), then the
// band's destination rows interleaved from the phases and stored.
template <typename T, int ACT>
void direct_volumes(const View5<const T>& X, const View5<const T>& W, const View5<T>& Y,
                    const View5<T>& Pre, const T* bias, T slope, const Plan& P, bool swap,
                    i64 groups, i64 Csrc_g, i64 Cdst_g, i64 b0, i64 b1) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const PaddedVolume pv(P);
  const RowMap md(Ad), mh(Ah);
  const i64 KH = W.size[3], KW = W.size[4];
  const i64 Lw = Aw.L_dst, nphh = i64(Ah.ph.size());
  const i64 nphw = i64(Aw.ph.size()), nblk = ceil_div(Cdst_g, kDirectBlock);
  i64 dst_elems = 1;
  for (int d = 0; d < 5; ++d) dst_elems *= Y.size[d];
  const RowWrite rwr(Aw, std::is_same<T, float>::value, dst_elems * i64(sizeof(T)), Y.st[4]);
  // per phase: its taps' flat shifts (source channel 0) and where its weights start
  std::vector<std::vector<i64>> toff(P.P);
  std::vector<i64> woff(P.P + 1, 0);
  i64 max_taps = 0;
  for (i64 p = 0; p < P.P; ++p) {
    i64 c[3];
    P.phase_coords(p, c);
    const i64 Td = Ad.ph[c[0]].T(), Th = Ah.ph[c[1]].T(), Tw = Aw.ph[c[2]].T();
    for (i64 td = 0; td < Td; ++td)
      for (i64 th = 0; th < Th; ++th)
        for (i64 tw = 0; tw < Tw; ++tw) toff[p].push_back(pv.tap(c[0], c[1], c[2], td, th, tw));
    const i64 nt = Csrc_g * i64(toff[p].size());
    max_taps = std::max(max_taps, nt);
    woff[p + 1] = woff[p] + kDirectBlock * nt;
  }
  // a band: rows of q_h whose sums for every (h, w) phase and channel fit the budget
  const i64 band = std::min(std::max<i64>(1, pv.ax[1].qmax),
                            std::max<i64>(1, kDirectBand / (nphh * nphw * kDirectBlock * pv.S1)));
  std::vector<T> wtab(std::max<i64>(1, woff[P.P])), row(Lw);
  std::vector<T> acc(kDirectBlock * nphh * nphw * band * pv.S1);
  std::vector<const T*> xt(max_taps);
  std::vector<T*> ph(nphw);
  T* outs[kDirectBlock];
  // the group's source volumes; zero once: every fill writes the same (real) positions
  std::vector<T> src(Csrc_g * pv.size, T(0));
  i64 loaded = -1;   // (n, g) whose source volumes src holds
  for (i64 blk = b0; blk < b1; ++blk) {
    const i64 n = blk / (groups * nblk), g = (blk / nblk) % groups;
    const i64 cb0 = (blk % nblk) * kDirectBlock, cb = std::min(kDirectBlock, Cdst_g - cb0);
    if (loaded != n * groups + g) {
      for (i64 cs = 0; cs < Csrc_g; ++cs) pv.fill(X, n, g * Csrc_g + cs, src.data() + cs * pv.size);
      loaded = n * groups + g;
    }
    // tap weights per phase, [channel j][source channel][td][th][tw]; weight [C_in, C_out/g,
    // kd, kh, kw]: forward (the source in the group's C_in, the destination's column),
    // grad_input (the destination in C_in, the source's column)
    for (i64 p = 0; p < P.P; ++p) {
      i64 c[3];
      P.phase_coords(p, c);
      const AxisPhase &pd = Ad.ph[c[0]], &phh = Ah.ph[c[1]], &pw = Aw.ph[c[2]];
      const i64 nt = Csrc_g * i64(toff[p].size());
      for (i64 j = 0; j < cb; ++j) {
        T* wj = wtab.data() + woff[p] + j * nt;
        const i64 cd = g * Cdst_g + cb0 + j;
        for (i64 cs = 0; cs < Csrc_g; ++cs)
          for (i64 td = 0; td < pd.T(); ++td)
            for (i64 th = 0; th < phh.T(); ++th)
              for (i64 tw = 0; tw < pw.T(); ++tw) {
                const i64 kd = pd.widx[td], kh = phh.widx[th], kw = pw.widx[tw];
                *wj++ = swap ? *W.at(cd, cs, kd, kh, kw)
                             : *W.at(g * Csrc_g + cs, cb0 + j, kd, kh, kw);
              }
      }
    }
    auto store_zero_row = [&](i64 od, i64 oh) {
      for (i64 j = 0; j < cb; ++j)
        store_row<T, ACT>(Y, Pre, bias, slope, Aw, rwr, nullptr, 0, row.data(), n,
                          g * Cdst_g + cb0 + j, od, oh);
    };
    for (i64 od = 0; od < Ad.L_dst; ++od) {
      const i64 rd = md.ph[od], qd = md.q[od];
      if (rd < 0) {   // a slice no phase reaches
        for (i64 oh = 0; oh < Ah.L_dst; ++oh) store_zero_row(od, oh);
        continue;
      }
      for (i64 oh = 0; oh < Ah.L_dst; ++oh)
        if (mh.ph[oh] < 0) store_zero_row(od, oh);
      for (i64 qh0 = 0; qh0 < pv.ax[1].qmax; qh0 += band) {
        // the band's sums: acc[j][rh][rw] rows qh0 .. qh0 + band at pitch S1
        for (i64 rh = 0; rh < nphh; ++rh) {
          const i64 nq = std::min(Ah.ph[rh].Q, qh0 + band) - qh0;
          for (i64 rw = 0; rw < nphw && nq > 0; ++rw) {
            const AxisPhase& pw = Aw.ph[rw];
            if (pw.Q == 0) continue;
            const i64 p = (rd * nphh + rh) * nphw + rw;
            const i64 start = qd * pv.S0 + qh0 * pv.S1;
            i64 nt = 0;
            for (i64 cs = 0; cs < Csrc_g; ++cs) {
              const T* base = src.data() + cs * pv.size + start;
              for (i64 o : toff[p]) xt[nt++] = base + o;
            }
            for (i64 j = 0; j < cb; ++j)
              outs[j] = acc.data() + ((j * nphh + rh) * nphw + rw) * band * pv.S1;
            taps_block(outs, wtab.data() + woff[p], nt, xt.data(), nt, (nq - 1) * pv.S1 + pw.Q,
                       cb);
          }
        }
        for (i64 rh = 0; rh < nphh; ++rh)
          for (i64 qh = qh0; qh < std::min(Ah.ph[rh].Q, qh0 + band); ++qh) {
            const i64 oh = Ah.s * qh + Ah.ph[rh].dst_off;
            for (i64 j = 0; j < cb; ++j) {
              for (i64 rw = 0; rw < nphw; ++rw)
                ph[rw] = acc.data() + ((j * nphh + rh) * nphw + rw) * band * pv.S1 +
                         (qh - qh0) * pv.S1;
              store_row<T, ACT>(Y, Pre, bias, slope, Aw, rwr, ph.data(), band * pv.S1,
                                row.data(), n, g * Cdst_g + cb0 + j, od, oh);
            }
          }
      }
    }
  }
}

// ------------------------------------------- depthwise forward, two w-phases, in registers
// The decoders' depthwise upsampler (forward, one source channel a group, 1-D or 2-D, stride 2
// along w with its phases in order: k4s2p1, k3s2p1op1, k2s2, ...). Per destination row, the even
// and odd w-phases' sums of 8 positions are made in two registers from the source rows its
// h-phase reads (zero-padded along w), the epilogue runs on them, and one unpack + permute writes
// 16 interleaved destination elements. No phase buffers and no per-row bookkeeping, which the
// general path pays per row: on small planes (256 channels of 16 x 16 -> 32 x 32 at batch 4) it
// spent most of its time there (1.26 ms against oneDNN's 0.80).
constexpr i64 kRowTaps = 32;   // most (h tap, w tap) pairs of one w-phase this path takes

bool rows_w2_applies(const Plan& P, bool swap, i64 Csrc_g, i64 y_w_stride, i64 pre_w_stride,
                     bool has_pre) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  if (!tuning().row_kernel || swap || Csrc_g != 1 || !have_fma() || y_w_stride != 1 || (has_pre && pre_w_stride != 1))
    return false;
  if (Ad.L_src != 1 || Ad.L_dst != 1 || Ad.ph.size() != 1 || Ad.ph[0].T() != 1 ||
      Ad.ph[0].Q != 1 || Ad.ph[0].soff[0] != 0)
    return false;   // 1-D and 2-D only
  if (Ah.a != 1 || Aw.a != 1 || Aw.s != 2 || !phases_in_order(Aw)) return false;
  i64 th = 0;
  for (const AxisPhase& p : Ah.ph) th = std::max(th, p.T());
  return th * std::max(Aw.ph[0].T(), Aw.ph[1].T()) <= kRowTaps;
}

template <int ACT>
__attribute__((target("avx2,fma"))) inline __m256 act_vec(__m256 v, __m256 slope) {
  // exactly act_fn's: max / min return their second operand when either is NaN
  if constexpr (ACT == RELU) return _mm256_max_ps(_mm256_setzero_ps(), v);
  else if constexpr (ACT == RELU6)
    return _mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(_mm256_setzero_ps(), v));
  else if constexpr (ACT == LEAKY)
    return _mm256_blendv_ps(_mm256_mul_ps(v, slope), v,
                            _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
  else return v;
}

// Destination elements [o, o + 16) of a row of L from 8 even (e) and 8 odd (o) phase sums:
// interleaved by one unpack + permute, pre (if any) before the activation; only those below L.
template <int ACT>
__attribute__((target("avx2,fma"))) inline void store_pair(__m256 e, __m256 od, __m256 slope,
                                                           float* y, float* pre, i64 o, i64 L,
                                                           bool nt) {
  const __m256 l = _mm256_unpacklo_ps(e, od), h = _mm256_unpackhi_ps(e, od);
  const __m256 v0 = _mm256_permute2f128_ps(l, h, 0x20), v1 = _mm256_permute2f128_ps(l, h, 0x31);
  if (o + 16 <= L) {
    if (pre) _mm256_storeu_ps(pre + o, v0), _mm256_storeu_ps(pre + o + 8, v1);
    if (nt) {
      _mm256_stream_ps(y + o, act_vec<ACT>(v0, slope));
      _mm256_stream_ps(y + o + 8, act_vec<ACT>(v1, slope));
    } else {
      _mm256_storeu_ps(y + o, act_vec<ACT>(v0, slope));
      _mm256_storeu_ps(y + o + 8, act_vec<ACT>(v1, slope));
    }
    return;
  }
  if (o >= L) return;
  alignas(32) float tail[16];
  if (pre) {
    _mm256_store_ps(tail, v0), _mm256_store_ps(tail + 8, v1);
    std::copy(tail, tail + (L - o), pre + o);
  }
  _mm256_store_ps(tail, act_vec<ACT>(v0, slope));
  _mm256_store_ps(tail + 8, act_vec<ACT>(v1, slope));
  std::copy(tail, tail + (L - o), y + o);
}

// The destination rows of one h-phase: row i (base y + i * ys, pre + i * ps) of L elements from
// source row base x + i * ld; the even w-phase sums taps (offE[t], we[t]), the odd (offO[t],
// wo[t]), over phase positions [0, Qv) (a multiple of 8). NE / NO > 0: the tap counts at compile
// time (the weights and offsets then live in registers across all rows), 0: ne / no at run time.
template <int ACT, int NE, int NO>
__attribute__((target("avx2,fma"))) void rows_w2(const float* x, i64 ld, const i64* offE,
                                                 const float* we, i64 ne, const i64* offO,
                                                 const float* wo, i64 no, float bias, float slope,
                                                 i64 rows, float* y, i64 ys, float* pre, i64 ps,
                                                 i64 Qv, i64 L, bool nt) {
  constexpr int ME = NE ? NE : kRowTaps, MO = NO ? NO : kRowTaps;
  const i64 te = NE ? NE : ne, to = NO ? NO : no;
  __m256 wE[ME], wO[MO];
  i64 oE[ME], oO[MO];
  for (i64 t = 0; t < te; ++t) wE[t] = _mm256_broadcast_ss(we + t), oE[t] = offE[t];
  for (i64 t = 0; t < to; ++t) wO[t] = _mm256_broadcast_ss(wo + t), oO[t] = offO[t];
  const __m256 vb = _mm256_set1_ps(bias), vs = _mm256_set1_ps(slope);
  for (i64 i = 0; i < rows; ++i, x += ld, y += ys, pre = pre ? pre + ps : nullptr) {
    i64 q = 0;
    for (; q + 16 <= Qv; q += 16) {   // two vectors a phase: four independent sums
      __m256 e0 = vb, o0 = vb, e1 = vb, o1 = vb;
      for (i64 t = 0; t < te; ++t) {
        e0 = _mm256_fmadd_ps(wE[t], _mm256_loadu_ps(x + oE[t] + q), e0);
        e1 = _mm256_fmadd_ps(wE[t], _mm256_loadu_ps(x + oE[t] + q + 8), e1);
      }
      for (i64 t = 0; t < to; ++t) {
        o0 = _mm256_fmadd_ps(wO[t], _mm256_loadu_ps(x + oO[t] + q), o0);
        o1 = _mm256_fmadd_ps(wO[t], _mm256_loadu_ps(x + oO[t] + q + 8), o1);
      }
      store_pair<ACT>(e0, o0, vs, y, pre, 2 * q, L, nt);
      store_pair<ACT>(e1, o1, vs, y, pre, 2 * q + 16, L, nt);
    }
    if (q < Qv) {
      __m256 e = vb, o = vb;
      for (i64 t = 0; t < te; ++t) e = _mm256_fmadd_ps(wE[t], _mm256_loadu_ps(x + oE[t] + q), e);
      for (i64 t = 0; t < to; ++t) o = _mm256_fmadd_ps(wO[t], _mm256_loadu_ps(x + oO[t] + q), o);
      store_pair<ACT>(e, o, vs, y, pre, 2 * q, L, nt);
    }
  }
}

using RowsFn = void (*)(const float*, i64, const i64*, const float*, i64, const i64*,
                        const float*, i64, float, float, i64, float*, i64, float*, i64, i64, i64,
                        bool);

// rows_w2 with the tap counts of the common kernels (1, 2 or 4 a phase: k2, k3, k4 at stride 2)
// fixed at compile time, else counted at run time.
template <int ACT>
RowsFn rows_w2_for(i64 ne, i64 no) {
  auto pick = [&](auto E) -> RowsFn {
    constexpr int NE = decltype(E)::value;
    switch (no) {
      case 1: return rows_w2<ACT, NE, 1>;
      case 2: return rows_w2<ACT, NE, 2>;
      case 4: return rows_w2<ACT, NE, 4>;
      default: return rows_w2<ACT, NE, 0>;
    }
  };
  switch (ne) {
    case 1: return pick(std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, 2>{});
    case 4: return pick(std::integral_constant<int, 4>{});
    default: return pick(std::integral_constant<int, 0>{});
  }
}

// Destination planes [b0, b1) of N x C_out (plane b: image b / C_out, channel b % C_out). The
// source plane is copied once into a buffer padded with zeros on every side that a tap reads
// past, so a tap of a row is one fixed offset from the row's base: per plane and h-phase the
// taps' offsets and weights are gathered once, and a row costs only its sums.
template <int ACT>
__attribute__((target("avx2,fma"))) void direct_rows_w2(const View5<const float>& X, const View5<const float>& W,
                    const View5<float>& Y, const View5<float>& Pre, const float* bias,
                    float slope, const Plan& P, i64 groups, i64 Cdst_g, bool stream, i64 b0,
                    i64 b1) {
  const Axis &Ah = P.ax[1], &Aw = P.ax[2];
  const AxisPhase &pe = Aw.ph[0], &po = Aw.ph[1];
  const i64 H = X.size[3], Ws = X.size[4], Lh = Ah.L_dst, Lw = Aw.L_dst;
  const i64 kd = P.ax[0].ph[0].widx[0], Cout = groups * Cdst_g;
  const i64 nph = i64(Ah.ph.size()), Te = pe.T(), To = po.T();
  // padding along w: phase positions q < Qv read inside a row of ld
  i64 lo = 0, hi = 0;
  for (const AxisPhase* p : {&pe, &po})
    for (i64 t = 0; t < p->T(); ++t) lo = std::min(lo, p->soff[t]), hi = std::max(hi, p->soff[t]);
  const i64 pad = -lo, Qv = ceil_div(std::max(pe.Q, po.Q), 8) * 8;
  const i64 ld = std::max(pad + Ws, pad + Qv + hi);
  // along h: rows qh + soff of every phase inside [-top, rows - top)
  i64 hlo = 0, hhi = H;
  for (const AxisPhase& p : Ah.ph)
    for (i64 t = 0; t < p.T() && p.Q > 0; ++t)
      hlo = std::min(hlo, p.soff[t]), hhi = std::max(hhi, p.Q + p.soff[t]);
  const i64 top = -hlo;
  std::vector<float> src(std::max<i64>(1, (top + hhi) * ld), 0.f);
  const float* base = src.data() + top * ld + pad;   // source (0, 0)
  const RowMap mh(Ah);
  // per h-phase: its taps x each w-phase's taps, offsets from the row's base and weights
  std::vector<i64> offE(nph * kRowTaps), offO(nph * kRowTaps);
  std::vector<float> wE(nph * kRowTaps), wO(nph * kRowTaps);
  std::vector<RowsFn> fn(nph);
  for (i64 rh = 0; rh < nph; ++rh) {
    const AxisPhase& ph = Ah.ph[rh];
    for (i64 th = 0; th < ph.T(); ++th) {
      for (i64 t = 0; t < Te; ++t) offE[rh * kRowTaps + th * Te + t] = ph.soff[th] * ld + pe.soff[t];
      for (i64 t = 0; t < To; ++t) offO[rh * kRowTaps + th * To + t] = ph.soff[th] * ld + po.soff[t];
    }
    fn[rh] = rows_w2_for<ACT>(ph.T() * Te, ph.T() * To);
  }
  i64 loaded = -1;   // image * groups + group whose source plane src holds
  for (i64 b = b0; b < b1; ++b) {
    const i64 n = b / Cout, c = b % Cout, g = c / Cdst_g, j = c % Cdst_g;
    if (loaded != n * groups + g) {
      for (i64 h = 0; h < H; ++h) {
        const float* x = X.at(n, g, 0, h, 0);
        float* r = src.data() + (top + h) * ld + pad;
        if (X.st[4] == 1) std::copy(x, x + Ws, r);
        else for (i64 w = 0; w < Ws; ++w) r[w] = x[w * X.st[4]];
      }
      loaded = n * groups + g;
    }
    for (i64 rh = 0; rh < nph; ++rh) {
      const AxisPhase& ph = Ah.ph[rh];
      for (i64 th = 0; th < ph.T(); ++th) {
        for (i64 t = 0; t < Te; ++t)
          wE[rh * kRowTaps + th * Te + t] = *W.at(g, j, kd, ph.widx[th], pe.widx[t]);
        for (i64 t = 0; t < To; ++t)
          wO[rh * kRowTaps + th * To + t] = *W.at(g, j, kd, ph.widx[th], po.widx[t]);
      }
    }
    const float bv = bias ? bias[c] : 0.f;
    for (i64 rh = 0; rh < nph; ++rh) {   // every row of the h-phase in one call
      const AxisPhase& ph = Ah.ph[rh];
      if (ph.Q == 0) continue;
      const i64 k = rh * kRowTaps;
      float* y = Y.at(n, c, 0, ph.dst_off, 0);
      fn[rh](base, ld, offE.data() + k, wE.data() + k, ph.T() * Te, offO.data() + k,
             wO.data() + k, ph.T() * To, bv, slope, ph.Q, y, Ah.s * Y.st[3],
             Pre.at(n, c, 0, ph.dst_off, 0), Ah.s * Pre.st[3], Qv, Lw,
             stream && reinterpret_cast<std::uintptr_t>(y) % 32 == 0 && Y.st[3] % 8 == 0);
    }
    for (i64 oh = 0; oh < Lh; ++oh) {   // rows no phase reaches: the bias alone
      if (mh.ph[oh] >= 0) continue;
      float* y = Y.at(n, c, 0, oh, 0);
      float* pr = Pre.at(n, c, 0, oh, 0);
      for (i64 o = 0; o < Lw; ++o) {
        if (pr) pr[o] = bv;
        y[o] = act_fn<float, ACT>(bv, slope);
      }
    }
  }
}

// Runs the forward by direct_rows_w2 where it applies; false where it does not (and for double).
template <typename T>
bool try_rows_w2(const View5<const T>&, const View5<const T>&, const View5<T>&, const View5<T>&,
                 const T*, double, const Plan&, bool, i64, i64, i64, int) {
  return false;
}
template <>
bool try_rows_w2<float>(const View5<const float>& X, const View5<const float>& W,
                        const View5<float>& Y, const View5<float>& Pre, const float* bias,
                        double slope, const Plan& P, bool swap, i64 groups, i64 Csrc_g,
                        i64 Cdst_g, int act) {
  if (!rows_w2_applies(P, swap, Csrc_g, Y.st[4], Pre.st[4], Pre.p != nullptr)) return false;
  row_kernel_runs().fetch_add(1, std::memory_order_relaxed);
  i64 dst_elems = 1;
  for (int d = 0; d < 5; ++d) dst_elems *= Y.size[d];
  const bool stream = dst_elems * i64(sizeof(float)) >= tuning().stream_bytes;
  with_act(act, [&](auto A) {
    at::parallel_for(0, Y.size[0] * Y.size[1], 1, [&](i64 b0, i64 b1) {
      direct_rows_w2<decltype(A)::value>(X, W, Y, Pre, bias, float(slope), P, groups, Cdst_g,
                                         stream, b0, b1);
      _mm_sfence();   // the non-temporal stores (if any) before the thread's work counts as done
    });
  });
  return true;
}

template <typename T>
void direct_impl(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                 at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap,
                 int act, double slope) {
  const i64 N = src.size(0), Csrc_g = src.size(1) / groups, Cdst_g = dst.size(1) / groups;
  if (dst.numel() == 0) return;
  View5<const T> X(src), W(weight);
  View5<T> Y(dst), Pre(pre);
  const T* bptr = bias.defined() ? bias.data_ptr<T>() : nullptr;
  if (try_rows_w2<T>(X, W, Y, Pre, bptr, slope, P, swap, groups, Csrc_g, Cdst_g, act)) return;
  with_act(act, [&](auto A) {
    const i64 blocks = N * groups * ceil_div(Cdst_g, kDirectBlock);
    at::parallel_for(0, blocks, 1, [&](i64 b0, i64 b1) {
      direct_volumes<T, decltype(A)::value>(X, W, Y, Pre, bptr, T(slope), P, swap, groups,
                                            Csrc_g, Cdst_g, b0, b1);
      _mm_sfence();   // the non-temporal stores (if any) before the thread's work counts as done
    });
  });
}

// For i < M, over rows r < rows (y and every x[i] `pitch` apart) and, in each, the 8-aligned
// head of [0, n): acc[8i : 8i + 8] += y[q] * x[i][q] lane by lane; tail[i] += the rest in order.
// Partial sums that persist across calls (one reduction at the very end, fixed order); each y
// vector is loaded once for M inputs, the accumulators stay in registers over all rows.
template <int M>
__attribute__((target("avx2,fma"))) void dots_acc8_avx2(const float* y, const float* const* x,
                                                        i64 rows, i64 pitch, i64 n, float* acc,
                                                        float* tail) {
  __m256 a0, a1, a2, a3, a4, a5, a6, a7;
  const float *x0 = x[0], *x1 = x[M > 1 ? 1 : 0], *x2 = x[M > 2 ? 2 : 0], *x3 = x[M > 3 ? 3 : 0],
              *x4 = x[M > 4 ? 4 : 0], *x5 = x[M > 5 ? 5 : 0], *x6 = x[M > 6 ? 6 : 0],
              *x7 = x[M > 7 ? 7 : 0];
#define KST_DOTS_EACH(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
#define KST_LOAD(i) if constexpr (M > i) a##i = _mm256_loadu_ps(acc + 8 * i);
  KST_DOTS_EACH(KST_LOAD)
  // a second set of sums for odd vectors where M alone is too few independent FMA chains to
  // hide their latency (one input: 4-5 cycles a vector instead of 1); added in at the end
  constexpr bool two = M <= 4;
  __m256 b0, b1, b2, b3;
#define KST_ZERO(i) if constexpr (two && M > i) b##i = _mm256_setzero_ps();
  KST_ZERO(0) KST_ZERO(1) KST_ZERO(2) KST_ZERO(3)
  const i64 n8 = n / 8 * 8;
  for (i64 r = 0; r < rows; ++r) {
    const float* yr = y + r * pitch;
    const i64 o = r * pitch;
    i64 q = 0;
    if constexpr (two) {
      for (; q + 16 <= n8; q += 16) {
        const __m256 ya = _mm256_loadu_ps(yr + q), yb = _mm256_loadu_ps(yr + q + 8);
#define KST_FMA2(i)                                                                   \
  if constexpr (M > i) {                                                              \
    a##i = _mm256_fmadd_ps(ya, _mm256_loadu_ps(x##i + o + q), a##i);                  \
    b##i = _mm256_fmadd_ps(yb, _mm256_loadu_ps(x##i + o + q + 8), b##i);              \
  }
        KST_FMA2(0) KST_FMA2(1) KST_FMA2(2) KST_FMA2(3)
      }
    }
    for (; q < n8; q += 8) {
      const __m256 yv = _mm256_loadu_ps(yr + q);
#define KST_FMA(i) if constexpr (M > i) a##i = _mm256_fmadd_ps(yv, _mm256_loadu_ps(x##i + o + q), a##i);
      KST_DOTS_EACH(KST_FMA)
    }
  }
#define KST_ADD(i) if constexpr (two && M > i) a##i = _mm256_add_ps(a##i, b##i);
  KST_ADD(0) KST_ADD(1) KST_ADD(2) KST_ADD(3)
#define KST_STORE(i) if constexpr (M > i) _mm256_storeu_ps(acc + 8 * i, a##i);
  KST_DOTS_EACH(KST_STORE)
  // the rows' tails after the vector sums (scalar code inside the row loop made GCC spill one
  // accumulator to the stack every iteration, a store-to-load chain: 3x slower)
  for (i64 r = 0; n8 < n && r < rows; ++r)
    for (i64 q = n8; q < n; ++q)
      for (int i = 0; i < M; ++i) tail[i] += y[r * pitch + q] * x[i][r * pitch + q];
#undef KST_STORE
#undef KST_ADD
#undef KST_FMA
#undef KST_FMA2
#undef KST_ZERO
#undef KST_LOAD
#undef KST_DOTS_EACH
}

// The same for any count of inputs: blocks of 8, then one block of the rest.
void dots_acc8(const float* y, const float* const* x, i64 m, i64 rows, i64 pitch, i64 n,
               float* acc, float* tail) {
  i64 i = 0;
  for (; i + 8 <= m; i += 8) dots_acc8_avx2<8>(y, x + i, rows, pitch, n, acc + 8 * i, tail + i);
  float* a = acc + 8 * i;
  float* t = tail + i;
  const float* const* xi = x + i;
  switch (m - i) {
    case 1: dots_acc8_avx2<1>(y, xi, rows, pitch, n, a, t); break;
    case 2: dots_acc8_avx2<2>(y, xi, rows, pitch, n, a, t); break;
    case 3: dots_acc8_avx2<3>(y, xi, rows, pitch, n, a, t); break;
    case 4: dots_acc8_avx2<4>(y, xi, rows, pitch, n, a, t); break;
    case 5: dots_acc8_avx2<5>(y, xi, rows, pitch, n, a, t); break;
    case 6: dots_acc8_avx2<6>(y, xi, rows, pitch, n, a, t); break;
    case 7: dots_acc8_avx2<7>(y, xi, rows, pitch, n, a, t); break;
    default: break;
  }
}

// dW[g x C_in/g, co, taps] for groups of at most kDirectMaxChannels input channels: dot
// products over images and destination rows, no GEMM. A thread takes a run of (g, co) of one
// group; per image it zero-pads the group's input volumes once (PaddedVolume: every tap of a
// phase row is one contiguous run). Per band of phase rows (below) each co's grad_out rows are
// split into their (h, w) phases, and every (tap, input channel) of a phase adds
// y_phase . x_tap over the band into its own 8-lane partial sums (8 inputs per y load), reduced
// once at the end. Each weight element is owned by one (g, co) and summed in a fixed order:
// deterministic, whatever the number of threads.
template <typename T>
void direct_grad_weight_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                             const Plan& P, i64 groups) {
  const i64 N = x.size(0), Cin_g = x.size(1) / groups, Cout_g = dy.size(1) / groups;
  View5<const T> X(x), DY(dy);
  View5<T> DW(dw);
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 KH = DW.size[3], KW = DW.size[4];
  const i64 nphw = i64(Aw.ph.size()), nphh = i64(Ah.ph.size());
  const PaddedVolume pv(P);
  constexpr bool f32 = std::is_same<T, float>::value;
  const bool vec = f32 && have_fma();
  // per phase: its taps' flat shifts and weight indices (kd, kh, kw flattened)
  std::vector<std::vector<i64>> toff(P.P), tk(P.P);
  std::vector<i64> tbase(P.P + 1, 0);
  for (i64 p = 0; p < P.P; ++p) {
    i64 c[3];
    P.phase_coords(p, c);
    const AxisPhase &pd = Ad.ph[c[0]], &ph = Ah.ph[c[1]], &pw = Aw.ph[c[2]];
    for (i64 td = 0; td < pd.T(); ++td)
      for (i64 th = 0; th < ph.T(); ++th)
        for (i64 tw = 0; tw < pw.T(); ++tw) {
          toff[p].push_back(pv.tap(c[0], c[1], c[2], td, th, tw));
          tk[p].push_back((pd.widx[td] * KH + ph.widx[th]) * KW + pw.widx[tw]);
        }
    tbase[p + 1] = tbase[p] + i64(toff[p].size());
  }
  // sums of one co: [phase tap j][input channel ci] (the order a phase row visits them)
  const i64 ntaps = tbase[P.P], nsum = ntaps * Cin_g;
  // Bands of phase rows: per band, grad_out's rows split into their (h, w) phases at the padded
  // volume's row pitch S1 (phase (rh, rw) row qh at ypl[(rh * nphw + rw) * plane + qh * S1]);
  // each tap is then one pass over the band's rows against the volume shifted by the tap (same
  // pitch), its sums in registers. A band's source rows (all channels) and grad_out rows (all
  // phases) fit L1 (4096 elements: 16 KiB in float32) across the taps that read them; splitting
  // whole planes first, then computing, left the grad_out reads unoverlapped (depthwise 128@64
  // k3s2p1op1 7.5 -> 14 ms).
  const bool in_order = phases_in_order(Aw);
  i64 qh_max = 0;
  for (const AxisPhase& ph : Ah.ph) qh_max = std::max(qh_max, ph.Q);
  const i64 S1 = pv.S1;
  const i64 band =
      std::max<i64>(1, (i64(4) << 10) / std::max<i64>(1, (Cin_g + nphh * nphw) * S1));
  i64 max_tp = 0;   // taps of a phase, at most
  for (const auto& tp : toff) max_tp = std::max(max_tp, i64(tp.size()));
  const i64 plane = band * S1;
  at::parallel_for(0, groups * Cout_g, 1, [&](i64 b0, i64 b1) {
    const RowMap md(Ad);
    std::vector<T> xs(Cin_g * pv.size, T(0)), ypl(nphh * nphw * plane, T(0));
    std::vector<const T*> xp(std::max<i64>(1, max_tp * Cin_g));
    for (i64 r0 = b0; r0 < b1;) {   // runs of one group
      const i64 g = r0 / Cout_g, co0 = r0 % Cout_g;
      const i64 r1 = std::min(b1, (g + 1) * Cout_g), nco = r1 - r0;
      std::vector<T> acc8(nco * nsum * 8, T(0)), tail(nco * nsum, T(0));
      for (i64 n = 0; n < N; ++n) {
        for (i64 ci = 0; ci < Cin_g; ++ci)
          pv.fill(X, n, g * Cin_g + ci, xs.data() + ci * pv.size);
        for (i64 od = 0; od < Ad.L_dst; ++od) {
          const i64 rd = md.ph[od], qd = md.q[od];
          if (rd < 0) continue;
          const T* xsl = xs.data() + qd * pv.S0;
          for (i64 c = 0; c < nco; ++c) {
            const i64 ys = DY.st[4];
            T* a8 = acc8.data() + c * nsum * 8;
            T* at = tail.data() + c * nsum;
            for (i64 qh0 = 0; qh0 < qh_max; qh0 += band) {
              // the band's grad_out rows, split into their phases (read once, used by every tap)
              for (i64 qh = qh0; qh < std::min(qh_max, qh0 + band); ++qh)   // rows in order
                for (i64 rh = 0; rh < nphh; ++rh) {
                  if (qh >= Ah.ph[rh].Q) continue;
                  const T* yrow = DY.at(n, g * Cout_g + co0 + c, od,
                                        Ah.s * qh + Ah.ph[rh].dst_off, 0);
                  T* out = ypl.data() + rh * nphw * plane + (qh - qh0) * S1;
                  if (in_order) {
                    split_residues(yrow, ys, Aw.L_dst, Aw.s, out, plane);
                  } else {
                    for (i64 rw = 0; rw < nphw; ++rw) {
                      const AxisPhase& pw = Aw.ph[rw];
                      for (i64 q = 0; q < pw.Q; ++q)
                        out[rw * plane + q] = yrow[(Aw.s * q + pw.dst_off) * ys];
                    }
                  }
                }
              for (i64 rh = 0; rh < nphh; ++rh)
                for (i64 rw = 0; rw < nphw; ++rw) {
                  const i64 p = (rd * nphh + rh) * nphw + rw;
                  const i64 Qh = std::min(Ah.ph[rh].Q, qh0 + band) - qh0, Qw = Aw.ph[rw].Q;
                  // a phase with no positions reads nothing (its taps' shifts may point outside)
                  if (Qh <= 0 || Qw <= 0) continue;
                  const T* yv = ypl.data() + (rh * nphw + rw) * plane;
                  // every (tap, channel) of the phase against its grad_out: sums j0 + i
                  const i64 m = i64(toff[p].size()) * Cin_g, j0 = tbase[p] * Cin_g;
                  for (i64 t = 0; t < i64(toff[p].size()); ++t)
                    for (i64 ci = 0; ci < Cin_g; ++ci)
                      xp[t * Cin_g + ci] = xsl + toff[p][t] + qh0 * S1 + ci * pv.size;
                  if constexpr (f32) {
                    if (vec) {
                      dots_acc8(yv, xp.data(), m, Qh, S1, Qw, a8 + 8 * j0, at + j0);
                      continue;
                    }
                  }
                  for (i64 i = 0; i < m; ++i)
                    for (i64 qh = 0; qh < Qh; ++qh)
                      for (i64 q = 0; q < Qw; ++q)
                        a8[8 * (j0 + i) + (q & 7)] += yv[qh * S1 + q] * xp[i][qh * S1 + q];
                }
            }
          }
        }
      }
      // every tap of the weight once (a tap that no phase uses stays zero)
      const i64 KK = DW.size[2] * KH * KW;
      std::vector<T> dwl(Cin_g * KK);
      for (i64 c = 0; c < nco; ++c) {
        std::fill(dwl.begin(), dwl.end(), T(0));
        for (i64 p = 0; p < P.P; ++p)
          for (i64 t = 0; t < i64(toff[p].size()); ++t)
            for (i64 ci = 0; ci < Cin_g; ++ci) {
              const i64 j = c * nsum + (tbase[p] + t) * Cin_g + ci;
              const T* a = acc8.data() + 8 * j;
              dwl[ci * KK + tk[p][t]] +=
                  (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + tail[j];
            }
        for (i64 ci = 0; ci < Cin_g; ++ci)
          for (i64 k = 0; k < KK; ++k)
            *DW.at(g * Cin_g + ci, co0 + c, k / (KH * KW), (k / KW) % KH, k % KW) =
                dwl[ci * KK + k];
      }
      r0 = r1;
    }
  });
}

}  // namespace

std::atomic<i64>& row_kernel_runs() {
  static std::atomic<i64> runs{0};
  return runs;
}

void conv_direct(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias,
                 at::Tensor& dst, at::Tensor& pre, const Plan& P, i64 groups, bool swap, int act,
                 double slope) {
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kstconv_direct", [&] {
    direct_impl<scalar_t>(src, weight, bias, dst, pre, P, groups, swap, act, slope);
  });
}

void grad_weight_direct(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                        i64 groups) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kstconv_grad_weight_direct", [&] {
    direct_grad_weight_impl<scalar_t>(x, dy, dw, P, groups);
  });
}

}  // namespace kst
