// The patch backward: grad_input, grad_weight and grad_bias from ONE patch matrix of grad_out.
// grad_input of a transposed convolution is an ordinary strided convolution of grad_out, so every
// input pixel m = (n, id, ih, iw) has one patch row over (c_out, kd, kh, kw), the weight's own
// order (taps that fall outside grad_out are zero):
//   cols[m, (co, t)] = grad_out[n, co, s*i - p + t*dil]
//   grad_input:  dX[m, ci]      = cols[m, :] . W[ci, :]        (one GEMM against W in place)
//   grad_weight: dW[ci, (co, t)] += X[m, ci] x cols[m, (co, t)] (one GEMM, X channels-last)
// Nothing is packed per call (the weight is read as it is), grad_out is gathered once for both
// products, and both GEMMs are large (MKL's own threading): where images are small and channels
// many (DCGAN's 4x4 and 8x8 layers, pix2pix's inner levels, HiFi-GAN's first upsampler), this is
// what the separate passes lose to: per-call packing, small exact-class blocks, short rows.
// Work runs over blocks of patch rows in order, so dW's sum is in a fixed order: deterministic.
// The zero taps at the image border are multiplied (the price of one dense product; the chooser
// takes this path where that share is small or the blocks of the exact paths would be tiny).
#include <ATen/ATen.h>

#include <memory>

#include "blas.h"
#include "layout.h"
#include "patches.h"
#include "strategies.h"

namespace kst {

namespace {

// The patch rows m in [m0, m1) (m = (n, id, ih, iw)) of group g, [m1 - m0, Cout_g * KK].
template <typename T>
void patch_rows(const View5<const T>& DY, const Plan& GI, i64 g, i64 Cout_g, i64 m_begin,
                i64 m_end, T* cols) {
  const Axis &Ad = GI.ax[0], &Ah = GI.ax[1], &Aw = GI.ax[2];
  const AxisPhase &pd = Ad.ph[0], &ph = Ah.ph[0], &pw = Aw.ph[0];
  const i64 Td = pd.T(), Th = ph.T(), Tw = pw.T(), KK = Td * Th * Tw, K = Cout_g * KK;
  const i64 Qd = pd.Q, Qh = ph.Q, Qw = pw.Q, per_img = Qd * Qh * Qw;
  const T* base = DY.p + g * Cout_g * DY.st[1];
  // taps along w one pixel apart in a row of unit stride: each run is a plain copy
  bool unit = DY.st[4] == 1;
  for (i64 tw = 1; tw < Tw; ++tw) unit = unit && pw.soff[tw] - pw.soff[tw - 1] == 1;
  // Blocks of up to 16 rows, channel by channel: the block's rows are written as 16 streams
  // and each grad_out row is read once per block (rows outer and channels inner jumped across
  // every channel's row for each patch row).
  constexpr i64 RB = 16;
  at::parallel_for(m_begin, m_end, RB, [&](i64 m0, i64 m1) {
    for (i64 b0 = m0; b0 < m1; b0 += RB) {
      const i64 nb = std::min(RB, m1 - b0);
      i64 n_[RB], qd_[RB], qh_[RB], w0_[RB], w1_[RB], sw0_[RB];
      for (i64 j = 0; j < nb; ++j) {
        const i64 m = b0 + j, r = m % per_img, qw = r % Qw;
        n_[j] = m / per_img, qd_[j] = r / (Qh * Qw), qh_[j] = (r / Qw) % Qh;
        // the valid tap range along w (soff is increasing): taps outside read zero
        w0_[j] = 0, w1_[j] = Tw;
        Plan::valid_range(Aw, pw, qw, w0_[j], w1_[j]);
        sw0_[j] = Aw.a * qw;
      }
      for (i64 c = 0; c < Cout_g; ++c)
        for (i64 j = 0; j < nb; ++j) {
          const i64 w0 = w0_[j], w1 = w1_[j];
          const T* src_c = base + n_[j] * DY.st[0] + c * DY.st[1];
          T* row = cols + (b0 + j - m_begin) * K;
          for (i64 td = 0; td < Td; ++td) {
            const i64 sd = Ad.a * qd_[j] + pd.soff[td];
            const bool dok = sd >= 0 && sd < Ad.L_src;
            for (i64 th = 0; th < Th; ++th) {
              T* o = row + ((c * Td + td) * Th + th) * Tw;
              const i64 sh = Ah.a * qh_[j] + ph.soff[th];
              if (!dok || sh < 0 || sh >= Ah.L_src || w0 >= w1) {
                std::fill(o, o + Tw, T(0));
                continue;
              }
              const T* s = src_c + sd * DY.st[2] + sh * DY.st[3];
              std::fill(o, o + w0, T(0));
              if (unit) {  // (from the first valid tap: no pointer before grad_out's start)
                const T* run = s + sw0_[j] + pw.soff[w0];
                for (i64 tw = w0; tw < w1; ++tw) o[tw] = run[tw - w0];
              } else {
                for (i64 tw = w0; tw < w1; ++tw) o[tw] = s[(sw0_[j] + pw.soff[tw]) * DY.st[4]];
              }
              std::fill(o + w1, o + Tw, T(0));
            }
          }
        }
    }
  });
}

// dx[n, c, pixels pix0 .. pix0 + run) = src[0 .. run), pixels in (d, h, w) order.
template <typename T>
void copy_pixels(const T* src, i64 run, const View5<T>& DX, i64 n, i64 c, i64 pix0, i64 H,
                 i64 W) {
  i64 pix = pix0;
  while (run > 0) {
    const i64 d = pix / (H * W), h = (pix / W) % H, w = pix % W;
    const i64 len = std::min(run, W - w);  // to the end of this row
    T* o = DX.at(n, c, d, h, w);
    if (DX.st[4] == 1) {
      std::copy(src, src + len, o);
    } else {
      for (i64 j = 0; j < len; ++j) o[j * DX.st[4]] = src[j];
    }
    src += len, pix += len, run -= len;
  }
}

template <typename T>
void backward_patch_impl(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight_in,
                         at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const Plan& GI,
                         i64 groups) {
  const i64 N = x.size(0), Cin = x.size(1), Cout = dy.size(1);
  const i64 Cin_g = Cin / groups, Cout_g = Cout / groups;
  const i64 KK = weight_in.size(2) * weight_in.size(3) * weight_in.size(4), K = Cout_g * KK;
  const i64 per_img = x.size(2) * x.size(3) * x.size(4);
  for (int d = 0; d < 3; ++d) {
    const Axis& A = GI.ax[d];
    TORCH_CHECK(A.ph.size() == 1 && A.ph[0].T() == weight_in.size(2 + d) &&
                    A.ph[0].Q == x.size(2 + d) && A.L_src == dy.size(2 + d),
                "kstconv: the patch backward needs the grad_input plan with every tap, matching "
                "the tensors (axis ", d, ")");
  }
  View5<const T> DY(dy);
  if (db.defined()) {  // per channel, in double, in a fixed order
    T* o = db.data_ptr<T>();
    at::parallel_for(0, Cout, 1, [&](i64 c0, i64 c1) {
      for (i64 c = c0; c < c1; ++c) {
        double s = 0;
        for (i64 n = 0; n < N; ++n)
          for (i64 d = 0; d < DY.size[2]; ++d)
            for (i64 h = 0; h < DY.size[3]; ++h) {
              const T* r = DY.at(n, c, d, h, 0);
              for (i64 w = 0; w < DY.size[4]; ++w) s += double(r[w * DY.st[4]]);
            }
        o[c] = T(s);
      }
    });
  }
  if (!dx.defined() && !dw.defined()) return;
  if (dx.defined() && (K == 0 || dy.numel() == 0)) dx.zero_();
  if (dw.defined() && (N * per_img == 0 || Cout_g == 0)) dw.zero_();
  if (K == 0 || N * per_img == 0 || Cin_g == 0) return;

  const at::Tensor weight = weight_in.contiguous();
  const T* W = weight.data_ptr<T>();  // [Cin, Cout_g * KK]: group g's rows are [Cin_g, K]
  // X channels-last: row m = (n, pixel) holds the C_in channels
  const at::Tensor xcl = dw.defined() ? to_channels_last<T>(x) : at::Tensor();
  const T* X = dw.defined() ? xcl.data_ptr<T>() : nullptr;
  // dx straight from the GEMM where it is channels-last, else through a buffer
  const bool dx_cl = dx.defined() && dx.stride(1) == 1 && dx.stride(4) == Cin &&
                     dx.stride(3) == Cin * dx.size(4) &&
                     dx.stride(2) == Cin * dx.size(4) * dx.size(3) &&
                     dx.stride(0) == Cin * per_img;
  View5<T> DX(dx);
  T* DW = dw.defined() ? dw.data_ptr<T>() : nullptr;

  // blocks of patch rows within the patch-matrix cap, in order (dW's sum order is fixed)
  const i64 rows = N * per_img;
  const i64 MB = std::min(rows, std::max<i64>(16, tuning().cols_cap / std::max<i64>(1, K)));
  // every element of a block's rows is written by patch_rows: no zeroing
  std::unique_ptr<T[]> cols_buf(new T[size_t(MB * K)]);
  T* const cols = cols_buf.get();
  std::unique_ptr<T[]> cbuf;
  const bool dx_via_buf = dx.defined() && !dx_cl;
  if (dx_via_buf) cbuf.reset(new T[size_t(MB * Cin_g)]);
  const i64 Hh = x.size(3), Ww = x.size(4);
  for (i64 g = 0; g < groups; ++g)
    for (i64 m0 = 0; m0 < rows; m0 += MB) {
      const i64 M = std::min(MB, rows - m0);
      patch_rows<T>(DY, GI, g, Cout_g, m0, m0 + M, cols);
      const T* Wg = W + g * Cin_g * K;
      if (dw.defined())  // dW_g[Cin_g, K] (+)= X[M, Cin_g]^T x cols[M, K]
        gemm_rm_short_k<T>(true, Cin_g, K, M, X + m0 * Cin + g * Cin_g, Cin, cols, K,
                           T(m0 > 0), DW + g * Cin_g * K, K);
      if (!dx.defined()) continue;
      if (dx_cl) {  // dX[M, Cin_g] = cols[M, K] x W_g[Cin_g, K]^T, into dx in place
        gemm_rm<T>(false, true, M, Cin_g, K, T(1), cols, K, Wg, K, T(0),
                   DX.p + m0 * Cin + g * Cin_g, Cin);
        continue;
      }
      // dX^T[Cin_g, M] = W_g[Cin_g, K] x cols[M, K]^T: each channel's pixels come out in a row,
      // copied into dx image by image (runs along the pixels, no transposes)
      gemm_rm<T>(false, true, Cin_g, M, K, T(1), Wg, K, cols, K, T(0), cbuf.get(), M);
      at::parallel_for(0, Cin_g, 8, [&](i64 c0, i64 c1) {
        for (i64 ci = c0; ci < c1; ++ci) {
          const T* src = cbuf.get() + ci * M;
          for (i64 m = m0; m < m0 + M;) {
            const i64 n = m / per_img, pix0 = m % per_img;
            const i64 run = std::min(per_img - pix0, m0 + M - m);
            copy_pixels(src + (m - m0), run, DX, n, g * Cin_g + ci, pix0, Hh, Ww);
            m += run;
          }
        }
      });
    }
}

}  // namespace

void backward_patch(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& weight,
                    at::Tensor& dx, at::Tensor& dw, at::Tensor& db, const Plan& GI, i64 groups) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kstconv_backward_patch", [&] {
    backward_patch_impl<scalar_t>(x, dy, weight, dx, dw, db, GI, groups);
  });
}

}  // namespace kst
