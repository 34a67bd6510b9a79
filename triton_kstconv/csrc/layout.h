// Layout copies: 8 x 8 register transposes, channels-last copies of the source (optionally with
// zero columns along w), one row of C x W into channels-last, and stride-2 (de-)interleaving.
#pragma once

#include "kstconv.h"

namespace kst {

bool have_avx2();
// AVX2 and FMA (the engine's own vector kernels: direct.cpp, gemm_skinny.cpp).
bool have_fma();
// dst[j][i] = src[i][j] for an 8 x 8 block of floats (AVX2; check have_avx2() first); stream:
// non-temporal stores (dst and ldd 32-byte aligned)
void transpose8x8(const float* src, i64 lds, float* dst, i64 ldd, bool stream = false);
// o0[i] = y[2i], o1[i] = y[2i + 1] for i < q, 8 at a time (AVX2); returns how many were done
i64 deinterleave2(const float* y, i64 q, float* o0, float* o1);
// y[2i] = a0[i], y[2i + 1] = a1[i] for i < q, 8 at a time (AVX2); returns how many were done.
// stream: non-temporal stores where y is 32-byte aligned (a destination far larger than the
// caches: no read for ownership; the caller fences with _mm_sfence before the data is read)
i64 interleave2(const float* a0, const float* a1, i64 q, float* y, bool stream = false);
// y[8i + r] = a[r * lda + i] for r < 8 and i < q, 8 at a time (AVX2, 8 x 8 transposes); returns
// how many i were done; stream as above
i64 interleave8(const float* a, i64 lda, i64 q, float* y, bool stream = false);
// One row of C channels x W pixels, element (c, w) at src[c * cst + w * wst], into channels-last
// dst[w * C + c]: 8 x 8 register transposes where the pixels are contiguous, then the tails.
void row_to_channels_last(const float* src, i64 cst, i64 wst, i64 C, i64 W, float* dst);
// A channels-last (N, D, H, W, C) copy of a 5-d tensor, optionally with zero columns added on
// both sides of w. Already channels-last tensors (unpadded) are returned as they are.
template <typename T>
at::Tensor to_channels_last(const at::Tensor& t, i64 pad_lo = 0, i64 pad_hi = 0);

}  // namespace kst
