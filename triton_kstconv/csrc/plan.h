// The plan of a pass: per axis its phases (taps, source offsets, destinations), split into
// validity classes; the blocks (one class combination of one phase) a pass multiplies; and the
// work items (groups x images x destination rows) spread over the threads.
#pragma once

#include "kstconv.h"

namespace kst {

struct AxisPhase {
  i64 dst_off = 0, Q = 0;
  std::vector<i64> widx, soff;
  i64 T() const { return i64(widx.size()); }
};

struct Axis {
  i64 L_src = 1, L_dst = 1, a = 1, s = 1;  // a: source stride, s: destination stride
  std::vector<AxisPhase> ph;
};

// A run of q in [q0, q1) whose patches use taps [t0, t1) (t0 == t1: bias only).
struct Cls {
  i64 q0, q1, t0, t1;
};

struct Plan {
  Axis ax[3];
  std::vector<std::vector<Cls>> cls[3];  // per axis, per phase
  i64 P = 1;                             // number of n-d phases

  // Flat encoding (cpp_engine.py): per axis L_src, L_dst, src_stride, dst_stride, n_phases,
  // then per phase: dst_off, Q, T, widx[T], soff[T]. Classes merged while the zero taps a merge
  // adds stay under merge_tau of the useful ones (tau_w >= 0: along w instead); trim_taps drops
  // the taps no class uses.
  Plan(const std::vector<i64>& flat, double merge_tau, bool trim_taps = true, double tau_w = -1);

  // Valid tap range for q: taps t with 0 <= a*q + soff[t] < L_src (soff monotone: a range).
  static void valid_range(const Axis& A, const AxisPhase& ph, i64 q, i64& t0, i64& t1);
  static std::vector<Cls> classes(const Axis& A, const AxisPhase& ph, double tau);
  static void trim(AxisPhase& ph, std::vector<Cls>& cs);

  void phase_coords(i64 p, i64 c[3]) const {
    c[2] = p % i64(ax[2].ph.size()); p /= i64(ax[2].ph.size());
    c[1] = p % i64(ax[1].ph.size()); p /= i64(ax[1].ph.size());
    c[0] = p;
  }
  i64 taps(i64 p) const {
    i64 c[3];
    phase_coords(p, c);
    return ax[0].ph[c[0]].T() * ax[1].ph[c[1]].T() * ax[2].ph[c[2]].T();
  }
};

// The pixels one class covers: images [n0, n1) x q ranges per axis, and its tap ranges.
struct Block {
  i64 g, n0, n1;
  i64 q0[3], q1[3], t0[3], t1[3];
  i64 r[3];  // phase coordinate per axis
  i64 M() const { return (n1 - n0) * (q1[0] - q0[0]) * (q1[1] - q0[1]) * (q1[2] - q0[2]); }
  i64 nt(int d) const { return t1[d] - t0[d]; }
  bool no_taps() const { return nt(0) == 0 || nt(1) == 0 || nt(2) == 0; }
};

// The block widened to every tap of a one-phase plan (the patch matrix zero-filled where a tap
// falls outside), for the paths that multiply in the weight's own order.
inline Block every_tap(const Plan& GI, Block b) {
  for (int d = 0; d < 3; ++d) b.t0[d] = 0, b.t1[d] = GI.ax[d].ph[0].T();
  return b;
}

inline i64 phase_index(const Plan& P, const Block& b) {
  return (b.r[0] * i64(P.ax[1].ph.size()) + b.r[1]) * i64(P.ax[2].ph.size()) + b.r[2];
}

inline bool full_taps(const Plan& P, const Block& b) {
  return b.nt(0) == P.ax[0].ph[b.r[0]].T() && b.nt(1) == P.ax[1].ph[b.r[1]].T() &&
         b.nt(2) == P.ax[2].ph[b.r[2]].T();
}

// The index of the class of a phase that holds q (-1 if none).
inline i64 class_index(const std::vector<Cls>& cs, i64 q) {
  for (i64 i = 0; i < i64(cs.size()); ++i)
    if (q >= cs[i].q0 && q < cs[i].q1) return i;
  return -1;
}

// The tap range of the class of a phase that holds q (0 taps if none).
inline i64 class_taps(const std::vector<Cls>& cs, i64 q, i64& t0, i64& t1) {
  const i64 i = class_index(cs, q);
  t0 = i < 0 ? 0 : cs[i].t0;
  t1 = i < 0 ? 0 : cs[i].t1;
  return t1 - t0;
}

// A 1x1 input whose output is exactly the kernel footprint (stride/padding/dilation irrelevant:
// DCGAN's first layer, a latent vector to a k x k map): grad_out[n] viewed as [C_out * k^d] is
// the patch row of input pixel n. True when the grad_input plan reads tap t at position t.
inline bool dense_one_pixel(const Plan& GI, const at::Tensor& dy) {
  for (int d = 0; d < 3; ++d) {
    const Axis& A = GI.ax[d];
    if (A.ph.size() != 1 || A.ph[0].Q != 1 || A.L_src != A.ph[0].T()) return false;
    for (i64 t = 0; t < A.ph[0].T(); ++t)
      if (A.ph[0].soff[t] != t) return false;
  }
  const i64 W = dy.size(4), H = dy.size(3), D = dy.size(2);
  return dy.stride(4) == 1 && dy.stride(3) == W && dy.stride(2) == H * W &&
         dy.stride(1) == D * H * W;
}

// Work items: (group, [phase,] block of images, block of destination positions along the split
// axis). An item aims at about `Mt` destination pixels per phase (GEMMs large enough to run near
// peak) within a memory cap for its patch matrix; when that leaves fewer items than threads, the
// phases become separate items too.
struct Items {
  i64 groups, N, nb, split, rows, nblk_n, nblk_o, nph;  // nph: 1 (all phases per item) or P
  i64 count() const { return groups * nph * nblk_n * nblk_o; }
};

// Destination pixels per phase that an item of a phase-im2col pass aims at.
i64 im2col_target(i64 Kmax, i64 Cdst_g);
Items make_items(const Plan& P, i64 groups, i64 N, i64 Mt, int nthreads, bool phase_items);

// For one item, call f(Block) for each (phase, class combination) that it covers.
template <typename F>
void for_each_block(const Plan& P, const Items& it, i64 item, F&& f) {
  const i64 per_g = it.nph * it.nblk_n * it.nblk_o;
  const i64 g = item / per_g;
  i64 rest = item % per_g;
  const i64 ph_item = rest / (it.nblk_n * it.nblk_o);
  rest %= it.nblk_n * it.nblk_o;
  const i64 bn = rest / it.nblk_o, bo = rest % it.nblk_o;
  const i64 n0 = bn * it.nb, n1 = std::min(it.N, n0 + it.nb);
  const i64 o0 = bo * it.rows, o1 = std::min(P.ax[it.split].L_dst, o0 + it.rows);
  const i64 p_begin = it.nph == 1 ? 0 : ph_item, p_end = it.nph == 1 ? P.P : ph_item + 1;
  for (i64 p = p_begin; p < p_end; ++p) {
    Block b;
    b.g = g; b.n0 = n0; b.n1 = n1;
    P.phase_coords(p, b.r);
    i64 lo[3], hi[3];
    bool empty = false;
    for (int d = 0; d < 3; ++d) {
      const AxisPhase& ph = P.ax[d].ph[b.r[d]];
      lo[d] = 0; hi[d] = ph.Q;
      if (d == it.split) {  // destination o = s*q + r in [o0, o1)
        const i64 s = P.ax[d].s;
        lo[d] = std::max<i64>(0, ceil_div(o0 - ph.dst_off, s));
        hi[d] = std::min<i64>(ph.Q, ceil_div(o1 - ph.dst_off, s));
      }
      if (lo[d] >= hi[d]) empty = true;
    }
    if (empty) continue;
    for (const Cls& cd : P.cls[0][b.r[0]]) {
      if (cd.q1 <= lo[0] || cd.q0 >= hi[0]) continue;
      for (const Cls& ch : P.cls[1][b.r[1]]) {
        if (ch.q1 <= lo[1] || ch.q0 >= hi[1]) continue;
        for (const Cls& cw : P.cls[2][b.r[2]]) {
          if (cw.q1 <= lo[2] || cw.q0 >= hi[2]) continue;
          const Cls* cs[3] = {&cd, &ch, &cw};
          for (int d = 0; d < 3; ++d) {
            b.q0[d] = std::max(cs[d]->q0, lo[d]);
            b.q1[d] = std::min(cs[d]->q1, hi[d]);
            b.t0[d] = cs[d]->t0;
            b.t1[d] = cs[d]->t1;
          }
          f(b);
        }
      }
    }
  }
}

// Calls gemm(k_offset_in_packed, k_offset_in_cols, K_block) for the maximal runs of the block's
// taps that are contiguous in both the packed weight and the patch matrix.
template <typename F>
void for_each_k_run(const Plan& P, const Block& b, i64 Cg, F&& gemm) {
  const i64 Th = P.ax[1].ph[b.r[1]].T(), Tw = P.ax[2].ph[b.r[2]].T();
  const bool full_w = b.nt(2) == Tw, full_h = full_w && b.nt(1) == Th;
  i64 kc = 0;
  if (full_h) {
    const i64 K = b.nt(0) * Th * Tw * Cg;
    gemm(b.t0[0] * Th * Tw * Cg, i64(0), K);
    return;
  }
  for (i64 td = b.t0[0]; td < b.t1[0]; ++td) {
    if (full_w) {
      const i64 K = b.nt(1) * Tw * Cg;
      gemm(((td * Th) + b.t0[1]) * Tw * Cg, kc, K);
      kc += K;
      continue;
    }
    for (i64 th = b.t0[1]; th < b.t1[1]; ++th) {
      const i64 K = b.nt(2) * Cg;
      gemm(((td * Th + th) * Tw + b.t0[2]) * Cg, kc, K);
      kc += K;
    }
  }
}

}  // namespace kst
