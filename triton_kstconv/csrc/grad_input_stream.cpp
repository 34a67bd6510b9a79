// grad_input strategy 6, for weight-heavy layers (few pixels, a big weight): the weight read in
// place, once, in row blocks split across threads, times a patch matrix of grad_out in the
// weight's own order.
#include <ATen/ATen.h>

#include "blas.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// grad_input for weight-heavy layers (few pixels, big weight): dX[c_in, i] = W[c_in, (c_out,
// tap)] x P[(c_out, tap), i], P the patch matrix of grad_out in the weight's own order (all taps,
// zero where outside). The weight is read in place, once, in row blocks split across threads
// (brgemm tiles, f32) instead of being packed and re-streamed per output row.
template <typename T>
void grad_input_weight_streaming_impl(const at::Tensor& dy, const at::Tensor& weight_in,
                                      at::Tensor& dx, const Plan& GI, i64 groups) {
  const i64 N = dy.size(0), Cout = dy.size(1), Cin = dx.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  if (dx.numel() == 0) return;
  const at::Tensor weight = weight_in.contiguous();
  const i64 KK = weight.size(2) * weight.size(3) * weight.size(4), CK = Cout_g * KK;
  View5<const T> DY(dy);
  const at::Tensor none;
  View5<T> DX(dx), NoPre(none);
  const T* w = weight.data_ptr<T>();
  if (dense_one_pixel(GI, dy) && DX.st[1] == 1) {
    // dX[n, c_in] = grad_out[n, (c_out, tap)] x W[c_in, (c_out, tap)]^T, one GEMM per group
    for (i64 g = 0; g < groups; ++g)
      gemm_rm<T>(false, true, N, Cin_g, CK, T(1), DY.p + g * Cout_g * KK, DY.st[0],
                 w + g * Cin_g * CK, CK, T(0), DX.p + g * Cin_g, DX.st[0]);
    return;
  }
  brgemm_t brg = nullptr;
  if constexpr (std::is_same<T, float>::value) brg = blas().brgemm;
  const int nthreads = at::get_num_threads();
  const i64 Mt = std::max<i64>(16, std::min<i64>(1024, tuning().cols_cap / std::max<i64>(CK, 1)));
  const Items items = make_items(GI, groups, N, Mt, nthreads, false);
  const i64 n_items = items.count();
  const bool outer_parallel = items_in_parallel(n_items);
  constexpr i64 MB = 32, KB = 512;
  auto run = [&](i64 begin, i64 end) {
    std::vector<T> cols, cbuf;
    for (i64 item = begin; item < end; ++item) {
      for_each_block(GI, items, item, [&](const Block& b0) {
        const Block b = every_tap(GI, b0);
        const i64 M = b.M();
        if (M == 0) return;
        if (i64(cols.size()) < CK * M) cols.resize(CK * M);
        if (i64(cbuf.size()) < Cin_g * M) cbuf.resize(Cin_g * M);
        if (CK > 0) im2col<T>(DY, GI, b, Cout_g, false, cols.data(), true);  // [CK, M]
        const T* wg = w + b.g * Cin_g * CK;
        if (brg == nullptr || CK == 0) {  // C[Cin_g, M] = W[Cin_g, CK] x P[CK, M]
          gemm_rm<T>(false, false, Cin_g, M, CK, T(1), wg, CK, cols.data(), M, T(0), cbuf.data(), M);
        } else if constexpr (std::is_same<T, float>::value) {
          maybe_parallel(!outer_parallel, ceil_div(Cin_g, MB), [&](i64 t0, i64 t1) {
            for (i64 t = t0; t < t1; ++t) {
              const i64 r0 = t * MB, mr = std::min(MB, Cin_g - r0);
              for (i64 k0 = 0; k0 < CK; k0 += KB)
                brg(mr, M, std::min(KB, CK - k0), CK, M, M, k0 > 0, wg + r0 * CK + k0,
                    cols.data() + k0 * M, cbuf.data() + r0 * M, false);
            }
          });
        }
        scatter<T, NONE>(cbuf.data(), false, DX, NoPre, nullptr, GI, b, Cin_g, T(0));
      });
    }
  };
  maybe_parallel(outer_parallel, n_items, run);
}

}  // namespace

void grad_input_stream_weight(const at::Tensor& dy, const at::Tensor& weight, at::Tensor& dx,
                              const Plan& GI, i64 groups) {
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "kstconv_grad_input_stream", [&] {
    grad_input_weight_streaming_impl<scalar_t>(dy, weight, dx, GI, groups);
  });
}

}  // namespace kst
