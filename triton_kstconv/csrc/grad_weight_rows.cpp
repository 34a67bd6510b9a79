// grad_weight strategy 5 (float32, AVX-512): register tiles over grad_out rows read in place. For
// phase p and tap t,
//   dWt[c_out, c_in] = sum over pixels q of the phase  dy[c_out, s*q + r] x X[q + offset(t), c_in]
// with X a channels-last copy of the input (the only copy: grad_out is read where it lies, at
// stride s along w, whatever its strides). One tile of up to 6 output channels x 64 input
// channels (24 zmm accumulators) runs over a list of segments, one per grad_out row of the phase
// (the pixels along w whose tap meets a real input column), for every row of a chunk of images:
// the whole chunk is one reduction held in registers, loaded and stored once. ATen's brgemm
// (strategy 3) reduces one strided range a call, so on small images (DCGAN at 8x8: 56-64 pixels)
// it reloads its tile every image, and it needs grad_out de-interleaved into phase planes first.
// Work items are tiles of (group, block of c_out, block of 64 c_in) and, where that leaves
// threads idle, a fixed number of batch ranges whose partial sums are added in a fixed order;
// chunks are counted from each range's start: the result does not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "layout.h"
#include "strategies.h"
#include "wgrad_tiles.h"

namespace kst {

namespace {

constexpr int kMR = 6;            // output channels per register tile
constexpr i64 kNB = 64;           // input channels per tile (4 zmm)
constexpr i64 kChunkBytes = i64(128) << 10;  // the input one chunk reads (L2)
constexpr i64 kItems = 8;         // work items aimed at before the batch is split

// One reduction segment: offsets into grad_out (from the tile's first output channel) and into
// the channels-last input (from the tile's first input channel), and its length in pixels.
struct Seg {
  i64 a, b, len;
};

// C[r][c] += sum over segments and their pixels k of A[r * lda + k * as] x B[k * bs + c], for
// r < MR and c < 16 * (NV - 1) + popcount(last): the last vector of 16 input channels masked
// (every load and store is a masked one, the others with all lanes: a branch-free body keeps
// gcc's accumulators in registers).
template <int MR, int NV>
__attribute__((target("avx512f"))) void row_tile(const float* A, i64 lda, i64 as,
                                                 const float* B, i64 bs, const Seg* seg,
                                                 i64 nseg, float* C, i64 ldc, __mmask16 last) {
  __mmask16 m[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) m[j] = j == NV - 1 ? last : __mmask16(0xFFFF);
  __m512 c[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_maskz_loadu_ps(m[j], C + r * ldc + 16 * j);
  for (i64 s = 0; s < nseg; ++s) {
    const float* a = A + seg[s].a;
    const float* b = B + seg[s].b;
    for (i64 k = seg[s].len; k > 0; --k, a += as, b += bs) {
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bv[j] = _mm512_maskz_loadu_ps(m[j], b + 16 * j);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[r][j] = _mm512_fmadd_ps(av, bv[j], c[r][j]);
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(C + r * ldc + 16 * j, m[j], c[r][j]);
}

using TileFn = void (*)(const float*, i64, i64, const float*, i64, const Seg*, i64, float*, i64,
                        __mmask16);

template <int MR>
constexpr TileFn tile_fn(int nv) {
  return nv == 1 ? row_tile<MR, 1> : nv == 2 ? row_tile<MR, 2> : nv == 3 ? row_tile<MR, 3>
                                                                         : row_tile<MR, 4>;
}

TileFn pick(int mr, int nv) {
  switch (mr) {
    case 1: return tile_fn<1>(nv);
    case 2: return tile_fn<2>(nv);
    case 3: return tile_fn<3>(nv);
    case 4: return tile_fn<4>(nv);
    case 5: return tile_fn<5>(nv);
    default: return tile_fn<6>(nv);
  }
}

// The tiles of dW: c_out blocks of MB (a multiple of kMR where there are more channels) x c_in
// blocks of kNB, and a batch split into nsplit ranges fixed by the shape; MB is then cut where
// there would be fewer items than threads (no change to any sum).
struct Tiling {
  i64 MB, nmb, nnb, tiles, nsplit;
  Tiling(i64 N, i64 groups, i64 Cout_g, i64 Cin_g, i64 nthreads) {
    // blocks of at most 16 register tiles, of even sizes (the items are spread evenly)
    MB = Cout_g <= 16 * kMR ? Cout_g
                            : ceil_div(ceil_div(Cout_g, ceil_div(Cout_g, 16 * kMR)), kMR) * kMR;
    nnb = ceil_div(Cin_g, kNB);
    auto count = [&] { return groups * ceil_div(Cout_g, MB) * nnb; };
    nsplit = std::max<i64>(1, std::min<i64>(N, ceil_div(kItems, count())));
    while (count() * nsplit < nthreads && MB > kMR) MB = std::max<i64>(kMR, MB / 2 / kMR * kMR);
    nmb = ceil_div(Cout_g, MB);
    tiles = groups * nmb * nnb;
  }
  void tile(i64 t, i64 Cout_g, i64 Cin_g, i64& g, i64& co0, i64& mco, i64& ci0, i64& nci) const {
    g = t / (nmb * nnb);
    const i64 mb = (t / nnb) % nmb, nb = t % nnb;
    co0 = mb * MB, mco = std::min(MB, Cout_g - co0);
    ci0 = nb * kNB, nci = std::min(kNB, Cin_g - ci0);
  }
};

// What every item of one pass shares.
struct Pass {
  const Plan& P;
  View5<const float> Y;
  const float* xs;  // [N, D, H, W, C_in]
  i64 Cin, Cin_g, Cout_g;
  i64 kk[3];
  i64 Qd, Qh, Qw;   // the largest phase extents per axis
  i64 rows, cols;   // a chunk: `rows` phase rows (n, qd, qh) x `cols` pixels along w
};

// acc[j][co][ci] (+)= the tile's reduction over images [n0, n1), every phase and tap. A chunk
// of phase rows (and of columns, where one row alone outgrows it) is one reduction per tap;
// every phase takes its rows of the chunk, so that the input rows the chunk reads serve them all.
void reduce_tile(const Pass& S, float* acc, i64 g, i64 co0, i64 mco, i64 ci0, i64 nci, i64 n0,
                 i64 n1, std::vector<std::vector<Seg>>& segs, std::vector<i64>& js) {
  const Plan& P = S.P;
  const Axis &Ad = P.ax[0], &Ah = P.ax[1], &Aw = P.ax[2];
  const i64 D = Ad.L_src, H = Ah.L_src, W = Aw.L_src;
  const i64 lda = S.Y.st[1], as = Aw.s * S.Y.st[4], bs = Aw.a * S.Cin;
  const float* A0 = S.Y.p + (g * S.Cout_g + co0) * lda;
  const float* B0 = S.xs + g * S.Cin_g + ci0;
  const int nv = int(ceil_div(nci, 16));
  const __mmask16 last = __mmask16((1u << (nci - 16 * (nv - 1))) - 1u);
  const i64 tap_elems = mco * nci, plane = S.Qd * S.Qh, nrows = (n1 - n0) * plane;
  for (i64 r0 = 0; r0 < nrows; r0 += S.rows)
    for (i64 w0 = 0; w0 < S.Qw; w0 += S.cols)
      for (i64 p = 0; p < P.P; ++p) {
        i64 c3[3];
        P.phase_coords(p, c3);
        const AxisPhase &pd = Ad.ph[c3[0]], &ph = Ah.ph[c3[1]], &pw = Aw.ph[c3[2]];
        const i64 nt = pd.T() * ph.T() * pw.T();
        if (nt == 0 || pd.Q * ph.Q * pw.Q == 0) continue;
        // the segments of every tap of the phase, then every register tile runs over them all
        if (i64(segs.size()) < nt) segs.resize(nt);
        js.resize(nt);
        bool any = false;
        for (i64 td = 0, t = 0; td < pd.T(); ++td)
          for (i64 th = 0; th < ph.T(); ++th)
            for (i64 tw = 0; tw < pw.T(); ++tw, ++t) {
              js[t] = (pd.widx[td] * S.kk[1] + ph.widx[th]) * S.kk[2] + pw.widx[tw];
              std::vector<Seg>& sg = segs[t];
              sg.clear();
              // columns q of the chunk with 0 <= a * q + soff < W
              const i64 sw = pw.soff[tw];
              const i64 q0 = std::max(w0, ceil_div(-sw, Aw.a));
              const i64 q1 = std::min({pw.Q, w0 + S.cols, sw >= W ? 0 : (W - 1 - sw) / Aw.a + 1});
              if (q1 <= q0) continue;
              for (i64 r = r0; r < std::min(nrows, r0 + S.rows); ++r) {
                const i64 n = n0 + r / plane, qd = (r % plane) / S.Qh, qh = r % S.Qh;
                if (qd >= pd.Q || qh >= ph.Q) continue;
                const i64 sd = Ad.a * qd + pd.soff[td], sh = Ah.a * qh + ph.soff[th];
                if (sd < 0 || sd >= D || sh < 0 || sh >= H) continue;
                const i64 od = Ad.s * qd + pd.dst_off, oh = Ah.s * qh + ph.dst_off;
                const i64 ow = Aw.s * q0 + pw.dst_off;
                sg.push_back({n * S.Y.st[0] + od * S.Y.st[2] + oh * S.Y.st[3] + ow * S.Y.st[4],
                              (((n * D + sd) * H + sh) * W + Aw.a * q0 + sw) * S.Cin, q1 - q0});
              }
              any = any || !sg.empty();
            }
        if (!any) continue;
        for (i64 m0 = 0; m0 < mco; m0 += kMR) {
          const TileFn fn = pick(int(std::min<i64>(kMR, mco - m0)), nv);
          for (i64 t = 0; t < nt; ++t)
            if (!segs[t].empty())
              fn(A0 + m0 * lda, lda, as, B0, bs, segs[t].data(), i64(segs[t].size()),
                 acc + js[t] * tap_elems + m0 * nci, nci, last);
        }
      }
}

}  // namespace

bool grad_weight_rows_runs() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

void grad_weight_rows(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                      i64 groups) {
  TORCH_CHECK(grad_weight_rows_runs(), "kstconv: grad_weight method 5 needs AVX-512");
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  float* out = dw.data_ptr<float>();
  std::fill(out, out + dw.numel(), 0.f);
  if (x.numel() == 0 || dy.numel() == 0 || Cin_g == 0 || Cout_g == 0) return;
  const i64 D = P.ax[0].L_src, H = P.ax[1].L_src, W = P.ax[2].L_src;
  // X: channels-last, every element written once by the thread that owns its row
  std::unique_ptr<float[]> xs(new float[N * D * H * W * Cin]);
  View5<const float> Xv(x);
  at::parallel_for(0, N * D * H, 1, [&](i64 b0, i64 b1) {
    for (i64 r = b0; r < b1; ++r) {
      const i64 n = r / (D * H), d = (r / H) % D, h = r % H;
      row_to_channels_last(Xv.at(n, 0, d, h, 0), Xv.st[1], Xv.st[4], Cin, W,
                           xs.get() + r * W * Cin);
    }
  });
  Pass S{P, View5<const float>(dy), xs.get(), Cin, Cin_g, Cout_g,
         {dw.size(2), dw.size(3), dw.size(4)}, 0, 0, 0, 0, 0};
  for (const AxisPhase& ph : P.ax[0].ph) S.Qd = std::max(S.Qd, ph.Q);
  for (const AxisPhase& ph : P.ax[1].ph) S.Qh = std::max(S.Qh, ph.Q);
  for (const AxisPhase& ph : P.ax[2].ph) S.Qw = std::max(S.Qw, ph.Q);
  // a chunk reads about kChunkBytes of input rows: whole rows where one fits, else one row
  // in pieces
  const i64 row_bytes = std::max<i64>(1, S.Qw * std::min(Cin_g, kNB) * 4);
  S.rows = std::max<i64>(1, kChunkBytes / row_bytes);
  S.cols = row_bytes > kChunkBytes ? std::max<i64>(16, kChunkBytes / (std::min(Cin_g, kNB) * 4))
                                   : std::max<i64>(1, S.Qw);
  const Tiling T(N, groups, Cout_g, Cin_g, at::get_num_threads());
  const i64 KKt = S.kk[0] * S.kk[1] * S.kk[2];
  struct Segments {  // a thread's segment lists, reused across its items
    std::vector<std::vector<Seg>> segs;
    std::vector<i64> js;
  };
  run_wgrad_tiles<Segments>(
      out, N, Cin_g, Cout_g, KKt, T.tiles, T.nsplit, KKt * T.MB * std::min(Cin_g, kNB),
      [&](i64 t, i64& g, i64& co0, i64& mco, i64& ci0, i64& nci) {
        T.tile(t, Cout_g, Cin_g, g, co0, mco, ci0, nci);
      },
      [&](Segments& st, float* acc, i64 g, i64 co0, i64 mco, i64 ci0, i64 nci, i64 n0, i64 n1) {
        reduce_tile(S, acc, g, co0, mco, ci0, nci, n0, n1, st.segs, st.js);
      });
}

}  // namespace kst
