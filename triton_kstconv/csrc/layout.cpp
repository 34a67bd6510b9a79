// Layout copies (see layout.h).
#include "layout.h"

#include <cstdint>

#include <ATen/ATen.h>
#include <immintrin.h>

namespace kst {

// 8 x 8 float transpose in AVX2 registers: dst[j][i] = src[i][j].
__attribute__((target("avx2"))) void transpose8x8(const float* src, i64 lds, float* dst,
                                                          i64 ldd, bool stream) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  if (stream) {
    for (int i = 0; i < 4; ++i) {
      _mm256_stream_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_stream_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
    return;
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// o0[i] = y[2i], o1[i] = y[2i + 1] for i < q, 8 at a time in AVX2; returns how many were done
__attribute__((target("avx2"))) i64 deinterleave2(const float* y, i64 q, float* o0,
                                                          float* o1) {
  i64 i = 0;
  for (; i + 8 <= q; i += 8) {
    const __m256 a = _mm256_loadu_ps(y + 2 * i), b = _mm256_loadu_ps(y + 2 * i + 8);
    // a = y0..y7, b = y8..y15; within 128-bit lanes pick evens / odds, then fix lane order
    const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // 0 2 8 10 | 4 6 12 14
    const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));  // 1 3 9 11 | 5 7 13 15
    const __m256i perm = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    _mm256_storeu_ps(o0 + i, _mm256_permutevar8x32_ps(ev, perm));
    _mm256_storeu_ps(o1 + i, _mm256_permutevar8x32_ps(od, perm));
  }
  return i;
}

// y[2i] = a0[i], y[2i + 1] = a1[i] for i < q, 8 at a time in AVX2; returns how many were done
__attribute__((target("avx2"))) i64 interleave2(const float* a0, const float* a1, i64 q,
                                                float* y, bool stream) {
  i64 i = 0;
  const bool nt = stream && reinterpret_cast<std::uintptr_t>(y) % 32 == 0;
  for (; i + 8 <= q; i += 8) {
    const __m256 e = _mm256_loadu_ps(a0 + i), o = _mm256_loadu_ps(a1 + i);
    const __m256 lo = _mm256_unpacklo_ps(e, o);  // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 hi = _mm256_unpackhi_ps(e, o);  // e2 o2 e3 o3 | e6 o6 e7 o7
    if (nt) {
      _mm256_stream_ps(y + 2 * i, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_stream_ps(y + 2 * i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    } else {
      _mm256_storeu_ps(y + 2 * i, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(y + 2 * i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
  return i;
}

i64 interleave8(const float* a, i64 lda, i64 q, float* y, bool stream) {
  const bool nt = stream && reinterpret_cast<std::uintptr_t>(y) % 32 == 0;
  i64 i = 0;
  for (; i + 8 <= q; i += 8) transpose8x8(a + i, lda, y + 8 * i, 8, nt);
  return i;
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

bool have_fma() {
  static const bool ok = have_avx2() && __builtin_cpu_supports("fma");
  return ok;
}

// One row of C channels x W pixels, element (c, w) at src[c * cst + w * wst], into channels-last
// dst[w * C + c]: 8 x 8 register transposes where the pixels are contiguous, then the tails.
void row_to_channels_last(const float* src, i64 cst, i64 wst, i64 C, i64 W, float* dst) {
  i64 c8 = 0, w8 = 0;
  if (wst == 1 && have_avx2()) {
    c8 = C / 8 * 8;
    w8 = W / 8 * 8;
    for (i64 c = 0; c < c8; c += 8)
      for (i64 w = 0; w < w8; w += 8) transpose8x8(src + c * cst + w, cst, dst + w * C + c, C);
  }
  for (i64 w = 0; w < W; ++w)
    for (i64 c = (w < w8 ? c8 : 0); c < C; ++c) dst[w * C + c] = src[c * cst + w * wst];
}

// A channels-last (N, D, H, W, C) copy of a 5-d tensor, optionally with zero columns added on
// both sides of w. Already channels-last tensors (unpadded) are returned as they are.
template <typename T>
at::Tensor to_channels_last(const at::Tensor& t, i64 pad_lo, i64 pad_hi) {
  if (pad_lo == 0 && pad_hi == 0 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return t;
  const i64 N = t.size(0), C = t.size(1), D = t.size(2), H = t.size(3), W = t.size(4);
  const i64 Wp = W + pad_lo + pad_hi;
  at::Tensor out = at::empty({N, C, D, H, Wp},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  View5<const T> X(t);
  T* o = out.data_ptr<T>();
  // items: (n, d, block of RB rows); an item walks 8 channels at a time through all of its
  // rows, so that each channel plane is read in longer contiguous runs, while the rows it
  // writes stay within about 32 KiB (wide rows of many channels: one row per item)
  const int nthreads = at::get_num_threads();
  i64 RB = std::min<i64>(H, std::max<i64>(1, (i64(32) << 10) / std::max<i64>(1, Wp * C * i64(sizeof(T)))));
  while (RB > 1 && N * D * ceil_div(H, RB) < 4 * nthreads) RB = ceil_div(RB, 2);
  const i64 nrb = ceil_div(H, RB);
  bool fast = false;
  if constexpr (std::is_same<T, float>::value) fast = X.st[4] == 1 && have_avx2();
  const bool cl_in = X.st[1] == 1 && X.st[4] == C;
  at::parallel_for(0, N * D * nrb, 1, [&](i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
      const i64 nd = b / nrb, h0 = (b % nrb) * RB, h1 = std::min(H, h0 + RB);
      const i64 n = nd / D, d = nd % D;
      const T* xd = X.p + n * X.st[0] + d * X.st[2];
      T* od = o + (nd * H) * Wp * C;
      for (i64 h = h0; h < h1; ++h) {
        T* orow = od + h * Wp * C;
        std::fill(orow, orow + pad_lo * C, T(0));
        std::fill(orow + (pad_lo + W) * C, orow + Wp * C, T(0));
        if (cl_in) std::memcpy(orow + pad_lo * C, xd + h * X.st[3], sizeof(T) * W * C);
      }
      if (cl_in) continue;
      i64 c8 = 0, w8 = 0;
      if constexpr (std::is_same<T, float>::value) {
        if (fast) {
          c8 = C / 8 * 8;
          w8 = W / 8 * 8;
          for (i64 c = 0; c < c8; c += 8)
            for (i64 h = h0; h < h1; ++h) {
              const T* xr = xd + h * X.st[3] + c * X.st[1];
              T* ob = od + (h * Wp + pad_lo) * C + c;
              for (i64 w = 0; w < w8; w += 8) transpose8x8(xr + w, X.st[1], ob + w * C, C);
            }
        }
      }
      // what the 8 x 8 blocks left: the channel tail, and the pixel tail of every channel
      for (i64 h = h0; h < h1; ++h) {
        const T* xr = xd + h * X.st[3];
        T* ob = od + (h * Wp + pad_lo) * C;
        for (i64 w = 0; w < W; ++w) {
          T* op = ob + w * C;
          const T* xp = xr + w * X.st[4];
          for (i64 c = (w < w8 ? c8 : 0); c < C; ++c) op[c] = xp[c * X.st[1]];
        }
      }
    }
  });
  return out;
}

template at::Tensor to_channels_last<float>(const at::Tensor&, i64, i64);
template at::Tensor to_channels_last<double>(const at::Tensor&, i64, i64);

}  // namespace kst
