// The scalar step: the reference form of the update that every other path reproduces bit for bit.
//
//   g = maximize ? -g : g;  if coupled: g = g + wd * p
//   m = b1 * m + omb1 * g;  v = b2 * v + omb2 * (g * g);  p = p * decay
//   u = v == 0 ? 0 : m / (sqrt(v) * inv_bc2_sqrt + eps);  p = p - step_size * u
//
// in fp32, one rounding per operation (built with -ffp-contract=off), as lowbit.optim._torch_step.
// v == 0 with m != 0 happens only when quantization flushed a tiny second moment to zero (e.g. an
// embedding row absent from the batch); exact AdamW has m == 0 there too, so the guard changes nothing for
// exact states and stops the m / eps blow-up of quantized ones. Then, per block: the new moments'
// absmax over finite values, scale = max(absmax, 1e-30) (/ 448 for fp8), code = nearest(x * (1 / scale)),
// non-finite moments stored as the code of 0. fp8 stores r = sqrt(v): decode gives v = r * r.
//
// Used for partial last blocks, on CPUs without AVX2, and (tests) everywhere.
#pragma once
#include "codecs.h"

namespace lowbit {
namespace {  // internal linkage: each library is one translation unit (and GCC inlines more)

inline float adam_scalar(float p, float g, float& m, float& v, const Hyper& h) {
  if (h.maximize) g = -g;
  if (h.coupled) g = g + h.wd * p;
  m = h.b1 * m + h.omb1 * g;
  v = h.b2 * v + h.omb2 * (g * g);
  p = p * h.decay;
  float denom = std::sqrt(v) * h.inv_bc2_sqrt + h.eps;
  float u = v == 0.0f ? 0.0f : m / denom;  // see the header: no update where the second moment is 0
  return p - h.step_size * u;
}

// fp32 state, elements [0, n) from element index base of the parameter
template <typename P>
void fp32_chunk_scalar(P* p, const P* g, float* m, float* v, int64_t base, int64_t n, const Hyper& h) {
  for (int64_t i = 0; i < n; ++i) {
    float mm = m[i], vv = v[i];
    float pp = adam_scalar(load_p<P>(p, i), load_p<P>(g, i), mm, vv, h);
    store_p<P>(p, i, pp, (uint32_t)(base + i), h);
    m[i] = mm;
    v[i] = vv;
  }
}

// One quantized block of n <= block_size elements: p, g and the codes point at its first element (for
// 4-bit codes, at its first byte), ms / vs at its scales.
template <typename P>
void quant_block_scalar(P* p, const P* g, uint8_t* mc, float* ms, uint8_t* vc, float* vs, int64_t base, int64_t n,
                        const Hyper& h, const Formats& A) {
  alignas(32) float mb[MAX_BLOCK];
  alignas(32) float vb[MAX_BLOCK];
  const bool four = A.mode == Q4;
  const bool v_sqrt = A.mode == FP8;
  const float sm = *ms, sv = *vs;
  const float* qm = A.cm->qmap;
  const float* qv = A.cv->qmap;
  float am = 0.0f, av = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float mm = decode_scalar(mc, i, qm, four) * sm;
    float vv = decode_scalar(vc, i, qv, four) * sv;
    if (v_sqrt) vv = vv * vv;
    float pp = adam_scalar(load_p<P>(p, i), load_p<P>(g, i), mm, vv, h);
    store_p<P>(p, i, pp, (uint32_t)(base + i), h);
    if (v_sqrt) vv = std::sqrt(vv);
    mb[i] = std::isfinite(mm) ? mm : 0.0f;  // non-finite moments: stored as 0, out of the absmax
    vb[i] = std::isfinite(vv) ? vv : 0.0f;
    am = std::max(am, std::fabs(mb[i]));
    av = std::max(av, std::fabs(vb[i]));
  }

  const bool fp8 = A.mode == FP8;
  float nsm = std::max(am, SCALE_FLOOR), nsv = std::max(av, SCALE_FLOOR);
  if (fp8) { nsm = nsm / FP8_MAX; nsv = nsv / FP8_MAX; }
  const float im = 1.0f / nsm, iv = 1.0f / nsv;
  *ms = nsm;
  *vs = nsv;
  for (int64_t i = 0; i < n; ++i) {
    float xm = mb[i] * im;
    float xv = vb[i] * iv;
    if (fp8) {
      mc[i] = encode_fp8_scalar(xm);
      vc[i] = encode_fp8_scalar(xv);
    } else if (four) {
      int cm = encode_table_scalar(xm, *A.cm), cv = encode_table_scalar(xv, *A.cv);
      int64_t j = i >> 1;
      if ((i & 1) == 0) {
        mc[j] = (uint8_t)cm;
        vc[j] = (uint8_t)cv;
      } else {
        mc[j] = (uint8_t)((mc[j] & 15) | (cm << 4));
        vc[j] = (uint8_t)((vc[j] & 15) | (cv << 4));
      }
    } else {
      mc[i] = (uint8_t)encode_table_scalar(xm, *A.cm);
      vc[i] = (uint8_t)encode_table_scalar(xv, *A.cv);
    }
  }
}

}  // namespace
}  // namespace lowbit
