// Direct strategy (method 7, grad_weight method 4) for grouped layers of few channels
// (depthwise, channel multipliers): each destination element sums over a handful of source
// channels, so there is no GEMM worth forming (a GEMM library sees matrices of width 1-4) and
// the layer is bound by memory. Every destination plane is computed from its group's source
// planes directly, one destination row at a time, vectorised along w:
//   - per plane, each source row is copied once into a zero-padded row split into its `a`
//     residues (a: the stride the source is read at; grad_input reads grad_out at stride s),
//     so that every tap of every phase is a contiguous run over the phase's pixels;
//   - per destination row and w-phase, all taps (source channel x d x h x w) are summed in one
//     pass with the sums in registers (AVX2 FMA), the phases interleaved into the row, and the
//     epilogue (bias, activation) run in place.
//   forward:     dst = output, src = input, every output channel of the group
//   grad_input:  dst = grad_in, src = grad_out, a sum over the group's output channels
//   grad_weight: dW[g, co, taps] = sum over images and phase pixels of grad_out x input (one
//                input channel a group), each (g, co) owned by one thread and summed in a
//                fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// parts[r * ld + i] = x[(a * i + r) * xst] for the L elements of a row: `a` contiguous rows.
template <typename T>
void split_row(const T* x, i64 xst, i64 L, i64 a, T* parts, i64 ld) {
  i64 done = 0;
  if constexpr (std::is_same<T, float>::value)
    if (a == 2 && xst == 1 && have_avx2()) done = deinterleave2(x, L / 2, parts, parts + ld);
  for (i64 r = 0; r < a; ++r)   // the rest (all of it but for a = 2): no division per element
    for (i64 i = done; a * i + r < L; ++i) parts[r * ld + i] = x[(a * i + r) * xst];
}

// The contiguous view of a source row read at stride a: element a * q + off sits at
// view(off)[q]. A row already contiguous with a = 1 is used in place.
template <typename T>
struct SourceRow {
  const T* base = nullptr;
  i64 a = 1, ld = 0;
  void load(const T* x, i64 xst, i64 L, i64 stride, std::vector<T>& buf) {
    a = stride;
    if (a == 1 && xst == 1) { base = x; ld = 0; return; }
    ld = (L + a - 1) / a;
    buf.resize(a * ld);
    split_row(x, xst, L, a, buf.data(), ld);
    base = buf.data();
  }
  // the offset of view(off) from base, for rows of length L read at stride a (floor
  // division: off may be negative, padding); a pass computes its taps' offsets once
  static i64 offset(i64 off, i64 a, i64 ld) {
    if (a == 1) return off;
    const i64 r = ((off % a) + a) % a;
    return r * ld + (off - r) / a;
  }
  const T* view(i64 off) const { return base + offset(off, a, ld); }
  const T* at(i64 precomputed) const { return base + precomputed; }
};

// Per w-phase and w-tap, where the tap's source elements start in a SourceRow: the divisions
// done once per pass, not once per row.
struct TapOffsets {
  std::vector<std::vector<i64>> off;
  TapOffsets(const Axis& Aw, i64 a, i64 ld, bool src) {
    for (const AxisPhase& p : Aw.ph) {
      off.emplace_back();
      for (i64 t = 0; t < i64(src ? p.soff.size() : 1); ++t)
        off.back().push_back(SourceRow<float>::offset(src ? p.soff[t] : p.dst_off, a, ld));
    }
  }
};

// The ld a SourceRow will use for rows of length L at stride a (0: used in place).
inline i64 row_ld(i64 L, i64 a, i64 xst) { return (a == 1 && xst == 1) ? 0 : (L + a - 1) / a; }

bool have_fma() {
  static const bool ok = have_avx2() && __builtin_cpu_supports("fma");
  return ok;
}

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

// A source row along w, zero-padded so that every tap of every phase reads inside it, and
// split into its `a` residues (a: the stride the source is read at): residue r, element i is
// padded position a * i + r, i.e. source position a * i + r - left.
struct PaddedRows {
  i64 a = 1, left = 0, ld = 0;   // left: a multiple of a
  std::vector<std::vector<i64>> off;  // per phase, per tap: where q = 0 reads, from the row
  explicit PaddedRows(const Axis& A) : a(A.a) {
    i64 lo = 0, hi = A.L_src;
    for (const AxisPhase& p : A.ph)
      for (i64 t = 0; t < p.T() && p.Q > 0; ++t) {
        lo = std::min(lo, p.soff[t]);
        hi = std::max(hi, a * (p.Q - 1) + p.soff[t] + 1);
      }
    left = ((-lo + a - 1) / a) * a;
    ld = (left + hi + a - 1) / a;
    for (const AxisPhase& p : A.ph) {
      off.emplace_back();
      for (i64 t = 0; t < p.T(); ++t) {
        const i64 pos = p.soff[t] + left, r = pos % a;
        off.back().push_back(r * ld + (pos - r) / a);
      }
    }
  }
  i64 size() const { return a * ld; }
  template <typename T>
  void fill(const T* x, i64 xst, i64 L, T* dst) const {
    if (a == 1) {
      std::fill(dst, dst + left, T(0));
      if (xst == 1) std::copy(x, x + L, dst + left);
      else for (i64 j = 0; j < L; ++j) dst[left + j] = x[j * xst];
      std::fill(dst + left + L, dst + ld, T(0));
      return;
    }
    std::fill(dst, dst + size(), T(0));
    if constexpr (std::is_same<T, float>::value)
      if (a == 2 && xst == 1 && have_avx2()) {   // left is even: residues stay in place
        const i64 h = left / 2, done = deinterleave2(x, L / 2, dst + h, dst + ld + h);
        for (i64 j = 2 * done; j < L; ++j) dst[(j % 2) * ld + h + j / 2] = x[j];
        return;
      }
    for (i64 r = 0; r < a; ++r) {
      // padded positions a * i + r with source position a * i + r - left in [0, L)
      const i64 i0 = (left - r + a - 1) / a;
      T* d = dst + r * ld;
      for (i64 i = i0, j = a * i0 + r - left; j < L; ++i, j += a) d[i] = x[j * xst];
    }
  }
};

// sum over [q0, q1) of y[q] * x[q], eight fixed partial sums (vectorised, deterministic)
template <typename T>
inline T dot(const T* __restrict y, const T* __restrict x, i64 q0, i64 q1) {
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  i64 q = q0;
  for (; q + 8 <= q1; q += 8)
    for (int j = 0; j < 8; ++j) s[j] += y[q + j] * x[q + j];
  T t = 0;
  for (; q < q1; ++q) t += y[q] * x[q];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + t;
}

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

// The row-invariant parts of a pass: per w-phase its accumulator offset.
struct RowShape {
  std::vector<i64> off;
  i64 total = 0;
  explicit RowShape(const Axis& Aw) {
    for (const AxisPhase& p : Aw.ph) off.push_back(total), total += p.Q;
  }
};

// One destination row from its w-phases' accumulators `a`: the phases into one contiguous row
// (the destination row itself where it is contiguous), then the epilogue in place.
template <typename T, int ACT>
void store_row(const View5<T>& Y, const View5<T>& Pre, const T* bias, T slope, const Axis& Aw,
               const RowShape& rs, bool pair, bool plain, const T* a, T* row, i64 n, i64 c,
               i64 od, i64 oh) {
  const i64 Lw = Aw.L_dst, nph = i64(Aw.ph.size());
  const T bv = bias ? bias[c] : T(0);
  T* y = Y.at(n, c, od, oh, 0);
  const i64 ys = Y.st[4];
  T* out = (ys == 1 && !Pre.p) ? y : row;
  i64 done = 0;
  if (plain) {
    std::copy(a, a + Lw, out);
    done = Lw;
  } else if (pair) {
    if constexpr (std::is_same<T, float>::value)
      done = interleave2(a, a + rs.off[1], Aw.ph[1].Q, out);
  }
  for (i64 rw = 0; rw < nph && done < Lw; ++rw) {
    const AxisPhase& pw = Aw.ph[rw];
    const T* ar = a + rs.off[rw];
    for (i64 q = pair ? done : 0; q < pw.Q; ++q) out[Aw.s * q + pw.dst_off] = ar[q];
  }
  if (out == y) {
    if (ACT != 0 || bias)
      for (i64 o = 0; o < Lw; ++o) y[o] = act_fn<T, ACT>(y[o] + bv, slope);
  } else if (Pre.p) {
    T* pp = Pre.at(n, c, od, oh, 0);
    for (i64 o = 0; o < Lw; ++o) {
      const T v = out[o] + bv;
      pp[o * Pre.st[4]] = v;
      y[o * ys] = act_fn<T, ACT>(v, slope);
    }
  } else {
    for (i64 o = 0; o < Lw; ++o) y[o * ys] = act_fn<T, ACT>(out[o] + bv, slope);
  }
}

// Destination planes in blocks of up to kDirectBlock channels of one (image, group): block b
// is (n, g, channels [cb0, cb0 + cb)); the channels of a block share every source row load.
template <typename T, int ACT>
void direct_planes(const View5<const T>& X, const View5<const T>& W, const View5<T>& Y,
                   const View5<T>& Pre, const T* bias, T slope, const Plan& P, bool swap,
                   i64 groups, i64 Csrc_g, i64 Cdst_g, i64 b0, i64 b1) {
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const RowMap md(Ad), mh(Ah);
  const RowShape rs(Aw);
  const PaddedRows pr(Aw);
  const i64 KD = W.size[2], KH = W.size[3], KW = W.size[4], KK = KD * KH * KW;
  const i64 Lw = Aw.L_dst, nph = i64(Aw.ph.size()), Lh = Ah.L_src, Ld = Ad.L_src;
  const i64 nblk = ceil_div(Cdst_g, kDirectBlock);
  // phases written into the destination row: two interleaved (AVX2) or in order
  const bool pair = std::is_same<T, float>::value && Aw.s == 2 && nph == 2 &&
                    Aw.ph[0].dst_off == 0 && Aw.ph[1].dst_off == 1 && have_avx2();
  const bool plain = nph == 1 && Aw.s == 1 && Aw.ph[0].dst_off == 0;
  i64 max_taps = 0;
  for (const AxisPhase& p : Aw.ph) max_taps = std::max(max_taps, p.T());
  max_taps *= Csrc_g * KD * KH;
  // per block channel j: its weights wl[j], accumulators acc[j], tap weights wt[j]
  std::vector<T> wl(kDirectBlock * Csrc_g * KK), acc(kDirectBlock * rs.total), row(Lw);
  // tap weights per (d-phase, d-class, h-phase, h-class), each [w-phase][channel][tap]
  i64 ncd = 1, nch = 1;
  for (const auto& c : P.cls[0]) ncd = std::max<i64>(ncd, i64(c.size()));
  for (const auto& c : P.cls[1]) nch = std::max<i64>(nch, i64(c.size()));
  const i64 nphd = i64(Ad.ph.size()), nphh = i64(Ah.ph.size());
  const i64 wstride = nph * kDirectBlock * max_taps;
  std::vector<T> wtab(std::max<i64>(1, nphd * ncd * nphh * nch) * wstride);
  std::vector<char> have(nphd * ncd * nphh * nch);
  std::vector<const T*> xt(max_taps);
  T* outs[kDirectBlock];
  // the group's source planes, each row padded and split once per plane
  std::vector<T> src(Csrc_g * Ld * Lh * pr.size());
  i64 loaded = -1;   // (n, g) whose source planes src holds
  for (i64 blk = b0; blk < b1; ++blk) {
    const i64 n = blk / (groups * nblk), g = (blk / nblk) % groups;
    const i64 cb0 = (blk % nblk) * kDirectBlock, cb = std::min(kDirectBlock, Cdst_g - cb0);
    if (loaded != n * groups + g) {
      for (i64 cs = 0; cs < Csrc_g; ++cs)
        for (i64 d = 0; d < Ld; ++d)
          for (i64 h = 0; h < Lh; ++h)
            pr.fill(X.at(n, g * Csrc_g + cs, d, h, 0), X.st[4], Aw.L_src,
                    src.data() + ((cs * Ld + d) * Lh + h) * pr.size());
      loaded = n * groups + g;
    }
    // weight [C_in, C_out/g, kd, kh, kw]: forward (the source in the group's C_in, the
    // destination's column), grad_input (the destination in C_in, the source's column)
    std::fill(have.begin(), have.end(), char(0));
    for (i64 j = 0; j < cb; ++j) {
      const i64 c = g * Cdst_g + cb0 + j;
      for (i64 cs = 0; cs < Csrc_g; ++cs)
        for (i64 k = 0; k < KK; ++k) {
          const i64 kd = k / (KH * KW), kh = (k / KW) % KH, kw = k % KW;
          wl[(j * Csrc_g + cs) * KK + k] =
              swap ? *W.at(c, cs, kd, kh, kw) : *W.at(g * Csrc_g + cs, cb0 + j, kd, kh, kw);
        }
    }
    for (i64 od = 0; od < Ad.L_dst; ++od)
      for (i64 oh = 0; oh < Ah.L_dst; ++oh) {
        const i64 rd = md.ph[od], qd = md.q[od], rh = mh.ph[oh], qh = mh.q[oh];
        const i64 id = rd < 0 ? -1 : class_index(P.cls[0][rd], qd);
        const i64 ih = rh < 0 ? -1 : class_index(P.cls[1][rh], qh);
        i64 td0 = 0, td1 = 0, th0 = 0, th1 = 0;
        if (id >= 0 && ih >= 0) {
          td0 = P.cls[0][rd][id].t0, td1 = P.cls[0][rd][id].t1;
          th0 = P.cls[1][rh][ih].t0, th1 = P.cls[1][rh][ih].t1;
        }
        // the block's tap weights depend on the phases and tap classes only: built once per
        // block for each combination met (the rows of a stride-2 plane alternate phases); a row
        // of no class has no taps
        const i64 key = id < 0 || ih < 0 ? -1 : ((rd * ncd + id) * nphh + rh) * nch + ih;
        T* wkey = key < 0 ? wtab.data() : wtab.data() + key * wstride;
        if (key >= 0 && !have[key]) {
          have[key] = 1;
          for (i64 rw = 0; rw < nph; ++rw) {
            const AxisPhase& pw = Aw.ph[rw];
            T* wph = wkey + rw * kDirectBlock * max_taps;
            for (i64 j = 0; j < cb; ++j) {
              T* wj = wph + j * max_taps;
              const T* wlj = wl.data() + j * Csrc_g * KK;
              for (i64 cs = 0; cs < Csrc_g; ++cs)
                for (i64 td = td0; td < td1; ++td)
                  for (i64 th = th0; th < th1; ++th) {
                    const T* wrow = wlj + cs * KK +
                                    (Ad.ph[rd].widx[td] * KH + Ah.ph[rh].widx[th]) * KW;
                    for (i64 tw = 0; tw < pw.T(); ++tw) *wj++ = wrow[pw.widx[tw]];
                  }
            }
          }
        }
        // per w-phase: every (source channel, d tap, h tap, w tap) in one pass
        for (i64 rw = 0; rw < nph; ++rw) {
          const AxisPhase& pw = Aw.ph[rw];
          const T* wph = wkey + rw * kDirectBlock * max_taps;
          i64 nt = 0;
          for (i64 cs = 0; cs < Csrc_g; ++cs)
            for (i64 td = td0; td < td1; ++td)
              for (i64 th = th0; th < th1; ++th) {
                const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh];
                const i64 sd = Ad.a * qd + pd.soff[td], sh = Ah.a * qh + ph.soff[th];
                const T* xrow = src.data() + ((cs * Ld + sd) * Lh + sh) * pr.size();
                const i64* xo = pr.off[rw].data();
                for (i64 tw = 0, nw = pw.T(); tw < nw; ++tw) xt[nt++] = xrow + xo[tw];
              }
          for (i64 j = 0; j < cb; ++j) outs[j] = acc.data() + j * rs.total + rs.off[rw];
          taps_block(outs, wph, max_taps, xt.data(), nt, pw.Q, cb);
        }
        for (i64 j = 0; j < cb; ++j)
          store_row<T, ACT>(Y, Pre, bias, slope, Aw, rs, pair, plain, acc.data() + j * rs.total,
                            row.data(), n, g * Cdst_g + cb0 + j, od, oh);
      }
  }
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
  with_act(act, [&](auto A) {
    const i64 blocks = N * groups * ceil_div(Cdst_g, kDirectBlock);
    at::parallel_for(0, blocks, 1, [&](i64 b0, i64 b1) {
      direct_planes<T, decltype(A)::value>(X, W, Y, Pre, bptr, T(slope), P, swap, groups,
                                           Csrc_g, Cdst_g, b0, b1);
    });
  });
}

// dW[g, co, taps] for C_in/g = 1: per (g, co), over images and every destination row; each
// grad_out row is split into its w-phases once, every tap is then a contiguous dot product.
template <typename T>
void direct_grad_weight_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                             const Plan& P, i64 groups) {
  const i64 N = x.size(0), Cout_g = dy.size(1) / groups;
  View5<const T> X(x), DY(dy);
  View5<T> DW(dw);
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 KD = DW.size[2], KH = DW.size[3], KW = DW.size[4], KK = KD * KH * KW;
  const TapOffsets xo(Aw, Aw.a, row_ld(Aw.L_src, Aw.a, X.st[4]), true);
  const TapOffsets yo(Aw, Aw.s, row_ld(Aw.L_dst, Aw.s, DY.st[4]), false);
  at::parallel_for(0, groups * Cout_g, 1, [&](i64 b0, i64 b1) {
    const RowMap md(Ad), mh(Ah);
    std::vector<T> dwl(KK), ybuf, xbuf;
    // grad_out's w-phase rw of a row: element q at yrow.view(dst_off)[q] (stride Aw.s)
    SourceRow<T> yrow, xrow;
    for (i64 gc = b0; gc < b1; ++gc) {
      const i64 g = gc / Cout_g, co = gc % Cout_g;
      std::fill(dwl.begin(), dwl.end(), T(0));  // taps that meet no input stay zero
      for (i64 n = 0; n < N; ++n)
        for (i64 od = 0; od < Ad.L_dst; ++od)
          for (i64 oh = 0; oh < Ah.L_dst; ++oh) {
            const i64 rd = md.ph[od], qd = md.q[od], rh = mh.ph[oh], qh = mh.q[oh];
            if (rd < 0 || rh < 0) continue;
            i64 td0, td1, th0, th1;
            class_taps(P.cls[0][rd], qd, td0, td1);
            class_taps(P.cls[1][rh], qh, th0, th1);
            if (td0 == td1 || th0 == th1) continue;
            yrow.load(DY.at(n, g * Cout_g + co, od, oh, 0), DY.st[4], Aw.L_dst, Aw.s, ybuf);
            const AxisPhase &pd = Ad.ph[rd], &ph = Ah.ph[rh];
            for (i64 td = td0; td < td1; ++td)
              for (i64 th = th0; th < th1; ++th) {
                xrow.load(X.at(n, g, Ad.a * qd + pd.soff[td], Ah.a * qh + ph.soff[th], 0),
                          X.st[4], Aw.L_src, Aw.a, xbuf);
                T* dwrow = dwl.data() + (pd.widx[td] * KH + ph.widx[th]) * KW;
                for (i64 rw = 0; rw < i64(Aw.ph.size()); ++rw) {
                  const AxisPhase& pw = Aw.ph[rw];
                  const T* yv = yrow.at(yo.off[rw][0]);
                  for (const Cls& cw : P.cls[2][rw])
                    for (i64 tw = cw.t0; tw < cw.t1; ++tw)
                      dwrow[pw.widx[tw]] += dot(yv, xrow.at(xo.off[rw][tw]), cw.q0, cw.q1);
                }
              }
          }
      for (i64 k = 0; k < KK; ++k)
        *DW.at(g, co, k / (KH * KW), (k / KW) % KH, k % KW) = dwl[k];
    }
  });
}

}  // namespace

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
