// Weight packing (see packing.h).
#include "packing.h"

#include <ATen/ATen.h>

#include "blas.h"

namespace kst {

template <typename T>
void pack_or_unpack(bool unpack, const View5<T>& W, T* buf, const Plan& P, const PackIndex& pi,
                    i64 groups, bool swap, bool dst_major) {
  const i64 kd = W.size[2], kh = W.size[3], kw = W.size[4], KK = kd * kh * kw;
  std::vector<i64> map(KK, -1);  // kernel tap -> offset of its [c_src][c_dst] block in a group
  for (i64 p = 0; p < P.P; ++p) {
    i64 c3[3];
    P.phase_coords(p, c3);
    const AxisPhase &pd = P.ax[0].ph[c3[0]], &ph = P.ax[1].ph[c3[1]], &pw = P.ax[2].ph[c3[2]];
    i64 t = 0;
    for (i64 td = 0; td < pd.T(); ++td)
      for (i64 th = 0; th < ph.T(); ++th)
        for (i64 tw = 0; tw < pw.T(); ++tw, ++t)
          map[(pd.widx[td] * kh + ph.widx[th]) * kw + pw.widx[tw]] =
              pi.off[p] + t * pi.Csrc_g * pi.Cdst_g;
  }
  std::vector<i64> jst(KK);  // element offset of each tap in w
  for (i64 a = 0; a < kd; ++a)
    for (i64 b = 0; b < kh; ++b)
      for (i64 c = 0; c < kw; ++c) jst[(a * kh + b) * kw + c] = a * W.st[2] + b * W.st[3] + c * W.st[4];
  const i64 Cin_g = swap ? pi.Cdst_g : pi.Csrc_g, Cout_g = swap ? pi.Csrc_g : pi.Cdst_g;
  // packed index of (ci, co) within a tap block: [c_src][c_dst], or [c_dst][c_src] (dst_major)
  const i64 s_src = dst_major ? 1 : pi.Cdst_g, s_dst = dst_major ? pi.Csrc_g : 1;
  const i64 s_ci = swap ? s_dst : s_src, s_co = swap ? s_src : s_dst;
  const bool co_inner = s_co == 1;
  std::vector<i64> used;
  for (i64 j = 0; j < KK; ++j)
    if (map[j] >= 0) used.push_back(j);
  constexpr i64 TB = 16;  // block of the channel that is strided in the packed buffer
  const i64 nci = co_inner ? Cin_g : (Cin_g + TB - 1) / TB;
  at::parallel_for(0, groups * nci, 1, [&](i64 begin, i64 end) {
    for (i64 it = begin; it < end; ++it) {
      const i64 g = it / nci, c = it % nci;
      T* gb = buf + g * pi.per_group;
      if (co_inner) {  // one input channel: co contiguous in the buffer
        T* w = W.p + (g * Cin_g + c) * W.st[0];
        for (i64 j : used) {
          T* b = gb + map[j] + c * s_ci;
          T* wj = w + jst[j];
          for (i64 co = 0; co < Cout_g; ++co) {
            if (unpack) wj[co * W.st[1]] = b[co];
            else b[co] = wj[co * W.st[1]];
          }
        }
      } else {      // a block of input channels: ci contiguous in the buffer
        const i64 ci0 = c * TB, ci1 = std::min(Cin_g, ci0 + TB);
        for (i64 j : used)
          for (i64 co = 0; co < Cout_g; ++co) {
            T* b = gb + map[j] + co * s_co;
            T* w = W.p + (g * Cin_g) * W.st[0] + co * W.st[1] + jst[j];
            for (i64 ci = ci0; ci < ci1; ++ci) {
              if (unpack) w[ci * W.st[0]] = b[ci];
              else b[ci] = w[ci * W.st[0]];
            }
          }
      }
    }
  });
}

template <typename T>
at::Tensor pack_plain(const at::Tensor& weight, const Plan& P, i64 groups, i64 Csrc_g,
                      i64 Cdst_g, bool swap, bool dst_major) {
  PackIndex pi(P, Csrc_g, Cdst_g);
  at::Tensor packed = at::empty({std::max<i64>(groups * pi.per_group, 1)}, weight.options());
  View5<T> W(weight);
  pack_or_unpack<T>(false, W, packed.data_ptr<T>(), P, pi, groups, swap, dst_major);
  return packed;
}

template <typename T>
MklPacked mkl_pack_weights(const T* packed, const PackIndex& pi, i64 groups, i64 nP, bool mk) {
  MklPacked out;
  if constexpr (std::is_same<T, float>::value) {
    const Blas& bl = blas();
    if (!bl.spack || bl.brgemm_gemm || pi.Cdst_g < 16) return out;
    std::vector<i64> off(groups * nP, -1);
    i64 total = 64;  // room to align the first matrix
    for (i64 g = 0; g < groups; ++g)
      for (i64 p = 0; p < nP; ++p) {
        const i64 K = pi.K[p], C = pi.Cdst_g;
        if (K < 16 || K >= INT32_MAX || C * K < 4096) continue;
        // KM: A = Wt^T [C, K]; MK: B = Wt [K, C]
        const size_t bytes = mk ? bl.spack_size(kBMatrix, 1, int(C), int(K))
                                : bl.spack_size(kAMatrix, int(C), 1, int(K));
        off[g * nP + p] = total;
        total += i64((bytes + 63) / 64 * 64);
      }
    if (total == 64) return out;
    out.bytes = at::empty({total}, at::kByte);
    const i64 shift = i64((64 - reinterpret_cast<uintptr_t>(out.bytes.data_ptr<uint8_t>()) % 64) % 64);
    out.off = at::empty({groups * nP}, at::kLong);
    i64* o = out.off.data_ptr<i64>();
    for (i64 i = 0; i < groups * nP; ++i) o[i] = off[i] < 0 ? -1 : off[i] - 64 + shift;
    for (i64 g = 0; g < groups; ++g)
      for (i64 p = 0; p < nP; ++p) {
        float* dst = const_cast<float*>(out.at(g * nP + p));
        if (!dst) continue;
        const i64 K = pi.K[p], C = pi.Cdst_g;
        const float* wt = packed + pi.at(g, p);  // [K, C] row-major
        if (mk) bl.spack(kRowMajor, kBMatrix, kNoTrans, 1, int(C), int(K), 1.0f, wt, int(C), dst);
        else bl.spack(kRowMajor, kAMatrix, kTrans, int(C), 1, int(K), 1.0f, wt, int(C), dst);
      }
  }
  return out;
}

template void pack_or_unpack<float>(bool, const View5<float>&, float*, const Plan&,
                                    const PackIndex&, i64, bool, bool);
template void pack_or_unpack<double>(bool, const View5<double>&, double*, const Plan&,
                                     const PackIndex&, i64, bool, bool);
template at::Tensor pack_plain<float>(const at::Tensor&, const Plan&, i64, i64, i64, bool, bool);
template at::Tensor pack_plain<double>(const at::Tensor&, const Plan&, i64, i64, i64, bool, bool);
template MklPacked mkl_pack_weights<float>(const float*, const PackIndex&, i64, i64, bool);
template MklPacked mkl_pack_weights<double>(const double*, const PackIndex&, i64, i64, bool);

}  // namespace kst
