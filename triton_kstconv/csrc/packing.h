// Weight packing: per (group, phase) the sub-kernel of the phase's taps, laid out for the GEMMs
// (plain, or in MKL's packed-operand format), and the weight prepared for one strategy.
#pragma once

#include "plan.h"

namespace kst {

// Packed layout per (group, phase): Wt[td][th][tw][c_src][c_dst] (the reduction index k runs over
// (taps, c_src), destination channels contiguous), phases consecutive within a group, groups
// consecutive. w5 is the ConvTranspose weight [C_in, C_out/g, kd, kh, kw]. swap=false (forward,
// grad_weight): source channels are C_in (dim 0), destination channels C_out/g (dim 1);
// swap=true (grad_input): the other way round. Only taps that meet a real input are packed.
struct PackIndex {
  std::vector<i64> off;  // per phase: offset of its block within a group, size P + 1
  std::vector<i64> K;    // per phase: reduction length
  i64 Csrc_g, Cdst_g, per_group;
  PackIndex(const Plan& P, i64 Csrc_g_, i64 Cdst_g_) : Csrc_g(Csrc_g_), Cdst_g(Cdst_g_) {
    off.push_back(0);
    for (i64 p = 0; p < P.P; ++p) {
      K.push_back(P.taps(p) * Csrc_g);
      off.push_back(off.back() + Cdst_g * K[p]);
    }
    per_group = off.back();
  }
  i64 at(i64 g, i64 p) const { return g * per_group + off[p]; }
};

// Copies between the weight and the packed buffer (unpack=true: buffer -> weight), tiled over
// (c_in, c_out) so that reads and writes both use whole cache lines.
template <typename T>
void pack_or_unpack(bool unpack, const View5<T>& W, T* buf, const Plan& P, const PackIndex& pi,
                    i64 groups, bool swap, bool dst_major = false);

// The plain packing of a weight as a tensor.
template <typename T>
at::Tensor pack_plain(const at::Tensor& weight, const Plan& P, i64 groups, i64 Csrc_g,
                      i64 Cdst_g, bool swap, bool dst_major);

// Per (group, phase): the packed weight in MKL's packed-operand format (float only), all in one
// byte tensor at 64-byte aligned offsets (-1: that phase is multiplied from the plain packing).
// Made once per weight version and cached by the Python side (weight_cache.py).
struct MklPacked {
  at::Tensor bytes, off;  // uint8 [total]; int64 [groups * phases]
  const float* at(i64 i) const {
    if (!off.defined()) return nullptr;
    const i64 o = off.data_ptr<i64>()[i];
    return o < 0 ? nullptr : reinterpret_cast<const float*>(bytes.data_ptr<uint8_t>() + o);
  }
};

// MKL's packed operands of a plain packing (float with MKL's packed API; else empty).
template <typename T>
MklPacked mkl_pack_weights(const T* packed, const PackIndex& pi, i64 groups, i64 nP, bool mk);

// A weight prepared for one conv method: the plain packing (pack_or_unpack layout), MKL's
// packed operands (method 1, float), or a contiguous copy (methods 2 and 6). Either made by
// pack_weight (once per weight version, cached in Python) or, where absent, per call.
struct Prepared {
  at::Tensor packed;  // T [groups * per_group], or the contiguous weight (methods 2, 6)
  MklPacked mkl;
  static Prepared from(const std::vector<at::Tensor>& v) {
    Prepared p;
    if (v.size() >= 1) p.packed = v[0];
    if (v.size() >= 3) p.mkl.bytes = v[1], p.mkl.off = v[2];
    return p;
  }
  std::vector<at::Tensor> to_list() const {
    std::vector<at::Tensor> v;
    if (packed.defined()) v.push_back(packed);
    if (packed.defined() && mkl.off.defined()) v.push_back(mkl.bytes), v.push_back(mkl.off);
    return v;
  }
};

}  // namespace kst
