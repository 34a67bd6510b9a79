// grad_weight strategies 1 and 2. 1: per phase, dW_r += dY_r x patches^T, reduced over batch
// and space into one private accumulator per thread, summed in thread order (deterministic for
// a given thread count). 2: the input times a patch matrix of grad_out in the weight's own order
// (all taps, zero where outside), straight into dW's layout.
#include <ATen/ATen.h>

#include "blas.h"
#include "packing.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// --------------------------------------------------------------------------- grad_weight
template <typename T>
void grad_weight_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                      i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  View5<const T> X(x), DY(dy);
  View5<T> DW(dw);
  const bool mk = channels_last_like(x);
  PackIndex pi(P, Cin_g, Cout_g);
  const i64 total = std::max<i64>(groups * pi.per_group, 1);

  const int nthreads = at::get_num_threads();
  const i64 Kmax = *std::max_element(pi.K.begin(), pi.K.end());
  const Items items = make_items(P, groups, N, im2col_target(Kmax, Cout_g), nthreads, true);
  const i64 n_items = dy.numel() == 0 ? 0 : items.count();
  const bool outer_parallel = items_in_parallel(n_items);
  std::vector<std::vector<T>> acc(outer_parallel ? nthreads : 1);

  auto run = [&](i64 begin, i64 end) {
    const int tid = outer_parallel ? at::get_thread_num() : 0;
    std::vector<T>& A = acc[tid];
    if (A.empty()) A.assign(total, T(0));
    std::vector<T> cols, gbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(P, items, item, [&](const Block& b) {
        if (b.no_taps() || Cin_g == 0) return;
        const i64 M = b.M();
        const i64 p = phase_index(P, b);
        const i64 Kc = b.nt(0) * b.nt(1) * b.nt(2) * Cin_g;
        if (i64(cols.size()) < Kc * M) cols.resize(Kc * M);
        if (i64(gbuf.size()) < Cout_g * M) gbuf.resize(Cout_g * M);
        im2col<T>(X, P, b, Cin_g, mk, cols.data());
        gather_dst<T>(DY, P, b, Cout_g, mk, gbuf.data());
        T* dwt = A.data() + pi.at(b.g, p);  // [Kp, Cout_g]
        for_each_k_run(P, b, Cin_g, [&](i64 kw, i64 kc, i64 Kb) {
          if (!mk)  // dWt[Kb, Cout_g] += cols[Kb, M] x G[Cout_g, M]^T
            gemm_rm<T>(false, true, Kb, Cout_g, M, T(1), cols.data() + kc * M, M, gbuf.data(), M,
                       T(1), dwt + kw * Cout_g, Cout_g);
          else      // dWt += cols[M, Kb]^T x G[M, Cout_g]
            gemm_rm<T>(true, false, Kb, Cout_g, M, T(1), cols.data() + kc, Kc, gbuf.data(),
                       Cout_g, T(1), dwt + kw * Cout_g, Cout_g);
        });
      });
    }
  };
  if (n_items > 0) {
    if (outer_parallel) at::parallel_for(0, n_items, 1, run);
    else run(0, n_items);
  }
  // Fixed-order reduction of the per-thread partial sums.
  std::vector<T> sum(total, T(0));
  for (auto& A : acc) {
    if (A.empty()) continue;
    for (i64 i = 0; i < total; ++i) sum[i] += A[i];
  }
  // taps that meet no input are not packed: their gradient is zero
  std::fill(dw.data_ptr<T>(), dw.data_ptr<T>() + dw.numel(), T(0));
  pack_or_unpack<T>(true, DW, sum.data(), P, pi, groups, false);
}

// grad_weight strategy 2: dW[c_in, (c_out, tap)] = sum over input pixels of x[c_in, i] *
// grad_out[c_out, i*s - p + tap*d], i.e. the input itself times a patch matrix of grad_out (the
// grad_input plan's gather, all taps, zero where outside), straight into the weight's own layout.
template <typename T>
void grad_weight_gemm_first_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                                 const Plan& GI, i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  const i64 KK = dw.size(2) * dw.size(3) * dw.size(4), CK = Cout_g * KK;
  TORCH_CHECK(GI.ax[0].ph[0].T() * GI.ax[1].ph[0].T() * GI.ax[2].ph[0].T() == KK,
              "kstconv: grad_weight plan must keep every tap");
  View5<const T> X(x), DY(dy);
  const bool mk = channels_last_like(x);
  const i64 total = std::max<i64>(groups * Cin_g * CK, 1);
  const int nthreads = at::get_num_threads();
  T* out = dw.data_ptr<T>();
  if (dense_one_pixel(GI, dy) && X.st[1] == 1 && x.numel() > 0 && dy.numel() > 0) {
    // dW[c_in, (c_out, tap)] = x[n, c_in]^T x grad_out[n, (c_out, tap)], one GEMM per group
    for (i64 g = 0; g < groups; ++g)
      gemm_rm_short_k<T>(true, Cin_g, CK, N, X.p + g * Cin_g, X.st[0], DY.p + g * Cout_g * KK,
                         DY.st[0], T(0), out + g * Cin_g * CK, CK);
    return;
  }
  // A few input pixels a group (weight-heavy layers: pix2pix's 2x2 and 4x4 levels at batch 1):
  // each dW element sums a handful of products, so the time is dW's write. One block a group,
  // its pixels gathered channels-last, and one short-reduction GEMM writes dW once: no zero fill,
  // no per-thread copies (with them, pix2pix 1024-512 at 4x4 wrote its 32 MiB dW three times).
  const i64 in_px = x.size(2) * x.size(3) * x.size(4);
  const bool short_k = std::is_same<T, float>::value && skinny_gemm_available() &&
                       N * in_px <= kSmallK && x.numel() > 0 && dy.numel() > 0;
  const i64 Mt = short_k ? kSmallK
                         : std::max<i64>(64, std::min<i64>(4096, tuning().cols_cap /
                                                                     std::max<i64>(CK, 1)));
  const Items items = make_items(GI, groups, N, Mt, short_k ? 1 : nthreads, false);
  const i64 n_items = (x.numel() == 0 || dy.numel() == 0) ? 0 : items.count();
  std::vector<char> written(short_k ? groups : 0, 0);  // short_k: the groups dW holds
  const bool outer_parallel = !short_k && items_in_parallel(n_items);
  // Thread 0 accumulates straight into dW; other threads into private copies added at the end
  // in thread order (deterministic for a given thread count).
  if (!short_k) std::fill(out, out + dw.numel(), T(0));
  std::vector<std::vector<T>> accs(outer_parallel ? nthreads : 1);
  const bool mk_dy = short_k || channels_last_like(dy);

  auto run = [&](i64 begin, i64 end) {
    const int tid = outer_parallel ? at::get_thread_num() : 0;
    T* acc = out;
    if (tid > 0) {
      if (accs[tid].empty()) accs[tid].assign(total, T(0));
      acc = accs[tid].data();
    }
    std::vector<T> cols, xbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(GI, items, item, [&](const Block& b0) {
        const Block b = every_tap(GI, b0);
        const i64 M = b.M();
        if (M == 0 || Cin_g == 0 || CK == 0) return;
        if (i64(cols.size()) < CK * M) cols.resize(CK * M);
        im2col<T>(DY, GI, b, Cout_g, mk_dy, cols.data(), true);  // rows (c_out, tap)
        T* ag = acc + b.g * Cin_g * CK;
        if (short_k) {  // dW[Cin_g, CK] (+)= X[m, Cin_g]^T x cols[m, CK], one call a block
          if (i64(xbuf.size()) < M * Cin_g) xbuf.resize(M * Cin_g);
          T* xo = xbuf.data();
          for (i64 n = b.n0; n < b.n1; ++n)
            for (i64 d = b.q0[0]; d < b.q1[0]; ++d)
              for (i64 h = b.q0[1]; h < b.q1[1]; ++h)
                for (i64 w = b.q0[2]; w < b.q1[2]; ++w, xo += Cin_g) {
                  const T* px = X.at(n, b.g * Cin_g, d, h, w);
                  for (i64 c = 0; c < Cin_g; ++c) xo[c] = px[c * X.st[1]];
                }
          gemm_rm_short_k<T>(true, Cin_g, CK, M, xbuf.data(), Cin_g, cols.data(), CK,
                             T(written[b.g]), ag, CK);
          written[b.g] = 1;
          return;
        }
        // dW[Cin_g, CK] += X[Cin_g, m] x cols[CK, m]^T, run by run (X is [m, Cin_g] when mk,
        // cols is [m, CK] when mk_dy)
        for_each_source_run<T>(X, b.g, Cin_g, b.n0, b.n1, b.q0, b.q1, mk, xbuf,
                               [&](const T* xb, i64 ldx, i64 m0, i64 Mr) {
          const T* cb = mk_dy ? cols.data() + m0 * CK : cols.data() + m0;
          gemm_rm<T>(mk, !mk_dy, Cin_g, CK, Mr, T(1), xb, ldx, cb, mk_dy ? CK : M, T(1), ag, CK);
        });
      });
    }
  };
  if (n_items > 0) {
    if (outer_parallel) at::parallel_for(0, n_items, 1, run);
    else run(0, n_items);
  }
  for (i64 g = 0; g < i64(written.size()); ++g)  // a group no block reached: no gradient
    if (!written[g]) std::fill(out + g * Cin_g * CK, out + (g + 1) * Cin_g * CK, T(0));
  for (size_t t = 1; t < accs.size(); ++t) {
    if (accs[t].empty()) continue;
    const T* a = accs[t].data();
    for (i64 i = 0; i < dw.numel(); ++i) out[i] += a[i];
  }
}

}  // namespace

void grad_weight_patch(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw, const Plan& P,
                       i64 groups) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kstconv_grad_weight_patch", [&] {
    grad_weight_impl<scalar_t>(x, dy, dw, P, groups);
  });
}

void grad_weight_gemm_first(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dw,
                            const Plan& GI, i64 groups) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kstconv_grad_weight_gemm_first", [&] {
    grad_weight_gemm_first_impl<scalar_t>(x, dy, dw, GI, groups);
  });
}

}  // namespace kst
