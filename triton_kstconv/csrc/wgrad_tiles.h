// The work items both tiled grad_weight strategies share (grad_weight_brgemm.cpp,
// grad_weight_rows.cpp): tiles of dW, each [kernel tap][c_out][c_in], times a number of batch
// ranges fixed by the shape. With one range every item writes its tile into dW; with more, each
// range's partial sums are added in a fixed order (0, 1, 2, ...) before the write: the result
// does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kstconv.h"

namespace kst {

// tile_of(t, g, co0, mco, ci0, nci): tile t's group, c_out block and c_in block.
// reduce(state, acc, g, co0, mco, ci0, nci, n0, n1): acc (zeroed, KKt * mco * nci) += the tile's
// reduction over images [n0, n1); `state` is one State per thread, kept across its items.
// tile_elems: the room of the largest tile.
template <typename State, typename TileOf, typename Reduce>
void run_wgrad_tiles(float* out, i64 N, i64 Cin_g, i64 Cout_g, i64 KKt, i64 tiles, i64 nsplit,
                     i64 tile_elems, const TileOf& tile_of, const Reduce& reduce) {
  const i64 ci_stride = Cout_g * KKt;
  std::vector<float> part(nsplit > 1 ? tiles * nsplit * tile_elems : 0);
  // acc[j][co][ci] -> dW[g*Cin_g + ci0 + ci, co0 + co, j]: whole rows of KKt taps at a time
  auto write_tile = [&](i64 t, const float* acc) {
    i64 g, co0, mco, ci0, nci;
    tile_of(t, g, co0, mco, ci0, nci);
    for (i64 ci = 0; ci < nci; ++ci)
      for (i64 co = 0; co < mco; ++co) {
        float* w = out + (g * Cin_g + ci0 + ci) * ci_stride + (co0 + co) * KKt;
        const float* a = acc + co * nci + ci;
        for (i64 j = 0; j < KKt; ++j) w[j] = a[j * mco * nci];
      }
  };
  at::parallel_for(0, tiles * nsplit, 1, [&](i64 b0, i64 b1) {
    std::vector<float> own;  // the item's tile where it writes dW directly
    State state;
    for (i64 it = b0; it < b1; ++it) {
      const i64 t = it / nsplit, sp = it % nsplit;
      i64 g, co0, mco, ci0, nci;
      tile_of(t, g, co0, mco, ci0, nci);
      float* acc;
      if (nsplit > 1) {
        acc = part.data() + it * tile_elems;
      } else {
        own.resize(tile_elems);
        acc = own.data();
      }
      std::fill(acc, acc + KKt * mco * nci, 0.f);
      reduce(state, acc, g, co0, mco, ci0, nci, N * sp / nsplit, N * (sp + 1) / nsplit);
      if (nsplit == 1) write_tile(t, acc);
    }
  });
  if (nsplit > 1)
    at::parallel_for(0, tiles, 1, [&](i64 t0, i64 t1) {
      for (i64 t = t0; t < t1; ++t) {
        float* sum = part.data() + t * nsplit * tile_elems;
        for (i64 sp = 1; sp < nsplit; ++sp) {  // fixed order: range 0, 1, 2, ...
          const float* a = sum + sp * tile_elems;
          for (i64 e = 0; e < tile_elems; ++e) sum[e] += a[e];
        }
        write_tile(t, sum);
      }
    });
}

}  // namespace kst
