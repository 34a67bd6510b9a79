// The plan: decoding the flat encoding, validity classes, work items (see plan.h).
#include "plan.h"

#include <unistd.h>

namespace kst {

Tuning& tuning() {
  static Tuning t = [] {
    Tuning d;
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where the system does not say
    if (l2 >= (64 << 10) && l2 <= (64l << 20)) d.l2_bytes = l2;
#endif
    return d;
  }();
  return t;
}

Plan::Plan(const std::vector<i64>& flat, double merge_tau, bool trim_taps, double tau_w) {
  size_t i = 0;
  auto next = [&]() {
    TORCH_CHECK(i < flat.size(), "kstconv: truncated plan");
    return flat[i++];
  };
  for (int d = 0; d < 3; ++d) {
    Axis& A = ax[d];
    A.L_src = next(); A.L_dst = next(); A.a = next(); A.s = next();
    i64 n = next();
    TORCH_CHECK(n >= 1 && A.a >= 1 && A.s >= 1, "kstconv: bad plan");
    A.ph.resize(n);
    for (auto& ph : A.ph) {
      ph.dst_off = next(); ph.Q = next();
      i64 T = next();
      ph.widx.resize(T); ph.soff.resize(T);
      for (auto& v : ph.widx) v = next();
      for (auto& v : ph.soff) v = next();
    }
    P *= n;
    for (auto& ph : A.ph) {
      cls[d].push_back(classes(A, ph, (d == 2 && tau_w >= 0) ? tau_w : merge_tau));
      if (trim_taps) trim(ph, cls[d].back());
    }
  }
  TORCH_CHECK(i == flat.size(), "kstconv: plan has trailing entries");
}

void Plan::valid_range(const Axis& A, const AxisPhase& ph, i64 q, i64& t0, i64& t1) {
  t0 = 0; t1 = 0;
  bool found = false;
  for (i64 t = 0; t < ph.T(); ++t) {
    i64 s = A.a * q + ph.soff[t];
    if (s >= 0 && s < A.L_src) {
      if (!found) t0 = t, found = true;
      t1 = t + 1;
    }
  }
}

// Exact classes, then neighbours merged greedily while the zero taps that a merge adds stay
// under merge_tau of the useful taps (fewer, larger GEMMs for a little padded work).
std::vector<Cls> Plan::classes(const Axis& A, const AxisPhase& ph, double tau) {
  std::vector<Cls> exact;
  for (i64 q = 0; q < ph.Q; ++q) {
    i64 t0, t1;
    valid_range(A, ph, q, t0, t1);
    if (!exact.empty() && exact.back().q1 == q && exact.back().t0 == t0 && exact.back().t1 == t1)
      exact.back().q1 = q + 1;
    else
      exact.push_back({q, q + 1, t0, t1});
  }
  if (tau <= 0 || exact.size() <= 1) return exact;
  std::vector<Cls> out;
  i64 useful = 0;
  for (const Cls& c : exact) {
    const i64 u = (c.q1 - c.q0) * (c.t1 - c.t0);
    if (!out.empty()) {
      Cls& m = out.back();
      const bool m_empty = m.t0 == m.t1, c_empty = c.t0 == c.t1;
      const i64 t0 = m_empty ? c.t0 : (c_empty ? m.t0 : std::min(m.t0, c.t0));
      const i64 t1 = m_empty ? c.t1 : (c_empty ? m.t1 : std::max(m.t1, c.t1));
      const i64 cost = (c.q1 - m.q0) * (t1 - t0);
      if (double(cost - useful - u) <= tau * double(useful + u)) {
        m = {m.q0, c.q1, t0, t1};
        useful += u;
        continue;
      }
    }
    out.push_back(c);
    useful = u;
  }
  return out;
}

// Drop the taps that no class uses (they never meet a real input) and rebase the classes.
void Plan::trim(AxisPhase& ph, std::vector<Cls>& cs) {
  i64 lo = ph.T(), hi = 0;
  for (const Cls& c : cs)
    if (c.t1 > c.t0) lo = std::min(lo, c.t0), hi = std::max(hi, c.t1);
  if (hi <= lo) lo = hi = 0;
  ph.widx = std::vector<i64>(ph.widx.begin() + lo, ph.widx.begin() + hi);
  ph.soff = std::vector<i64>(ph.soff.begin() + lo, ph.soff.begin() + hi);
  for (Cls& c : cs) {
    if (c.t1 > c.t0) c.t0 -= lo, c.t1 -= lo;
    else c.t0 = c.t1 = 0;
  }
}

// Destination pixels per phase that an item of a phase-im2col pass aims at.
i64 im2col_target(i64 Kmax, i64 Cdst_g) {
  return std::max<i64>(64, std::min({tuning().item_pixels, tuning().cols_cap / std::max<i64>(Kmax, 1),
                                     tuning().cols_cap / std::max<i64>(Cdst_g, 1)}));
}

Items make_items(const Plan& P, i64 groups, i64 N, i64 Mt, int nthreads, bool phase_items) {
  Items it;
  it.groups = groups;
  it.N = std::max<i64>(N, 1);
  it.split = 2;
  for (int d = 0; d < 3; ++d)
    if (P.ax[d].L_dst > 1) { it.split = d; break; }
  const i64 pix_img = P.ax[0].L_dst * P.ax[1].L_dst * P.ax[2].L_dst;
  const i64 Ls = P.ax[it.split].L_dst, s = P.ax[it.split].s;
  const i64 target = Mt * P.P;  // destination pixels per item, all phases
  if (pix_img <= target || Ls <= s) {
    it.nb = std::max<i64>(1, std::min<i64>(it.N, target / std::max<i64>(pix_img, 1)));
    it.rows = Ls;
  } else {
    it.nb = 1;
    const i64 row = std::max<i64>(1, pix_img / Ls);
    it.rows = std::min(Ls, std::max<i64>(s, (target / row) / s * s));
  }
  it.nblk_n = (it.N + it.nb - 1) / it.nb;
  it.nblk_o = (Ls + it.rows - 1) / it.rows;
  // Few items: round their number up to a multiple of the threads, for balance.
  i64 items = groups * it.nblk_n * it.nblk_o;
  if (items < 4 * nthreads && items % nthreads != 0 && items >= nthreads) {
    const i64 want = (items + nthreads - 1) / nthreads * nthreads;
    if (it.nblk_o == 1 && it.nblk_n > 1) {
      it.nblk_n = std::min(it.N, (want + groups - 1) / groups);
      it.nb = (it.N + it.nblk_n - 1) / it.nblk_n;
      it.nblk_n = (it.N + it.nb - 1) / it.nb;
    } else if (it.nblk_o >= 1) {
      const i64 nbo = std::min(ceil_div(Ls, s), (want + groups * it.nblk_n - 1) / (groups * it.nblk_n));
      it.rows = std::max<i64>(s, ceil_div(ceil_div(Ls, nbo), s) * s);
      it.nblk_o = (Ls + it.rows - 1) / it.rows;
    }
  }
  it.nph = (phase_items && groups * it.nblk_n * it.nblk_o < nthreads && P.P > 1) ? P.P : 1;
  return it;
}

}  // namespace kst
