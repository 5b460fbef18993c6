// 4-bit state with a rank-1 normalized second moment (LOWBIT_MODE_Q4_RANK1), one 2-D parameter at a time.
//
// Element (i, j) of v is map[code] * min(row[i], col[j]), and the new row / column scales are the maxima of
// the new v over its rows / columns, so the new v of the whole tensor is needed before any of it can be
// encoded. Two passes over the parameter, both in the scalar step's operations (adam_scalar.h):
//   1. the new v of every element (nothing written) -> row and column maxima (finite values, >= 1e-30);
//   2. per block of m: the whole step, m encoded blockwise, v encoded with the new row / column scales;
// then the new scales replace the old. Row chunks (pass 1) and blocks (pass 2) run on OpenMP threads;
// maxima do not depend on the order, so neither do the results.
#pragma once
#include <vector>

#include "adam_scalar.h"

namespace lowbit {
namespace {

// the new second moment of one element, as adam_scalar computes it
LB_INLINE float rank1_new_v(float p, float g, float v, const Hyper& h) {
  if (h.maximize) g = -g;
  if (h.coupled) g = g + h.wd * p;
  return h.b2 * v + h.omb2 * (g * g);
}

template <typename P>
void rank1_param(P* p, const P* g, uint8_t* mc, float* ms, uint8_t* vc, float* vrow, float* vcol, int64_t numel,
                 int64_t cols, const Hyper& h, const Formats& A, int threads) {
  const int64_t rows = numel / cols, bs = A.block_size;
  const float* qv = A.cv->qmap;
  std::vector<float> row_new(rows, 0.0f), col_new(cols, 0.0f);
  // pass 1: maxima of the new v (per-thread column maxima, merged)
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> col_part(cols, 0.0f);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      float rmax = 0.0f;
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t e = i * cols + j;
        const float v_old = decode_scalar(vc, e, qv, true) * std::min(vrow[i], vcol[j]);
        const float v = rank1_new_v(load_p<P>(p, e), load_p<P>(g, e), v_old, h);
        const float a = std::isfinite(v) ? std::fabs(v) : 0.0f;
        rmax = std::max(rmax, a);
        col_part[j] = std::max(col_part[j], a);
      }
      row_new[i] = std::max(rmax, SCALE_FLOOR);
    }
#pragma omp critical
    for (int64_t j = 0; j < cols; ++j) col_new[j] = std::max(col_new[j], col_part[j]);
  }
  for (int64_t j = 0; j < cols; ++j) col_new[j] = std::max(col_new[j], SCALE_FLOOR);

  // pass 2: the step, block by block of m
  const int64_t nb = (numel + bs - 1) / bs;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b) {
    alignas(32) float mb[MAX_BLOCK];
    alignas(32) float vb[MAX_BLOCK];
    const int64_t s = b * bs, n = std::min(bs, numel - s);
    uint8_t* mcb = mc + s / 2;
    uint8_t* vcb = vc + s / 2;
    float am = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = s + k, i = e / cols, j = e % cols;
      float mm = decode_scalar(mcb, k, A.cm->qmap, true) * ms[b];
      float vv = decode_scalar(vcb, k, qv, true) * std::min(vrow[i], vcol[j]);
      const float pp = adam_scalar(load_p<P>(p, e), load_p<P>(g, e), mm, vv, h);
      store_p<P>(p, e, pp, (uint32_t)e, h);
      mb[k] = std::isfinite(mm) ? mm : 0.0f;
      vb[k] = std::isfinite(vv) ? vv : 0.0f;
      am = std::max(am, std::fabs(mb[k]));
    }
    const float nsm = std::max(am, SCALE_FLOOR), im = 1.0f / nsm;
    ms[b] = nsm;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = s + k, i = e / cols, j = e % cols;
      const int cm = encode_table_scalar(mb[k] * im, *A.cm);
      const int cv = encode_table_scalar(vb[k] * (1.0f / std::min(row_new[i], col_new[j])), *A.cv);
      if ((k & 1) == 0) {
        mcb[k >> 1] = (uint8_t)cm;
        vcb[k >> 1] = (uint8_t)cv;
      } else {
        mcb[k >> 1] = (uint8_t)((mcb[k >> 1] & 15) | (cm << 4));
        vcb[k >> 1] = (uint8_t)((vcb[k >> 1] & 15) | (cv << 4));
      }
    }
  }
  std::copy(row_new.begin(), row_new.end(), vrow);
  std::copy(col_new.begin(), col_new.end(), vcol);
}

}  // namespace
}  // namespace lowbit
