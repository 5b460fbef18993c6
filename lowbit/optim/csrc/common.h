// Shared pieces of the CPU step: constants, per-parameter hyper-parameters, bit helpers, and loading /
// storing parameters (fp32, or bf16 with nearest-even or stochastic rounding), in scalar and AVX2 form.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "abi.h"

#define LB_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace {  // internal linkage: each library is one translation unit (and GCC inlines more)

enum Mode { FP32 = LOWBIT_MODE_FP32, Q8 = LOWBIT_MODE_Q8, Q4 = LOWBIT_MODE_Q4, FP8 = LOWBIT_MODE_FP8,
            Q4_RANK1 = LOWBIT_MODE_Q4_RANK1 };
constexpr int MAX_BLOCK = 8192;
constexpr float SCALE_FLOOR = 1e-30f;
constexpr float FP8_MAX = 448.0f;
constexpr float FINITE_MAX = 3.4028234663852886e38f;  // the largest finite fp32

// One parameter's fp32 hyper-parameters (a row of lowbit_step_args.hyper) and options.
struct Hyper {
  float b1, omb1, b2, omb2, eps, step_size, inv_bc2_sqrt, decay, wd;
  uint32_t seed;
  bool maximize, coupled, sr;
};

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// the stochastic-rounding hash (lowbit.optim._torch_step.rand16 takes its top 16 bits)
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}

// ---------------------------------------------------------------- parameters, scalar
template <typename P> inline float load_p(const P* p, int64_t i);
template <> inline float load_p<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load_p<uint16_t>(const uint16_t* p, int64_t i) { return u2f((uint32_t)p[i] << 16); }

template <typename P> inline void store_p(P* p, int64_t i, float x, uint32_t gidx, const Hyper& h);
template <> inline void store_p<float>(float* p, int64_t i, float x, uint32_t, const Hyper&) { p[i] = x; }
template <> inline void store_p<uint16_t>(uint16_t* p, int64_t i, float x, uint32_t gidx, const Hyper& h) {
  uint32_t b = f2u(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) { p[i] = 0x7FC0; return; }
  uint32_t r = h.sr ? (hash32(gidx * 0x9E3779B1u + h.seed) >> 16) : (0x7FFFu + ((b >> 16) & 1u));
  p[i] = (uint16_t)((b + r) >> 16);
}

#ifdef __AVX2__
// ---------------------------------------------------------------- parameters and helpers, AVX2
template <typename P> inline __m256 load_p_vec(const P* p);
template <> inline __m256 load_p_vec<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load_p_vec<uint16_t>(const uint16_t* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

template <typename P> inline void store_p_vec(P* p, __m256 x, uint32_t gidx, const Hyper& h);
template <> inline void store_p_vec<float>(float* p, __m256 x, uint32_t, const Hyper&) { _mm256_storeu_ps(p, x); }
template <> inline void store_p_vec<uint16_t>(uint16_t* p, __m256 x, uint32_t gidx, const Hyper& h) {
  __m256i b = _mm256_castps_si256(x);
  __m256i r;
  if (h.sr) {
    __m256i i = _mm256_add_epi32(_mm256_set1_epi32((int)gidx), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i z = _mm256_add_epi32(_mm256_mullo_epi32(i, _mm256_set1_epi32((int)0x9E3779B1u)),
                                 _mm256_set1_epi32((int)h.seed));
    z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 16));
    z = _mm256_mullo_epi32(z, _mm256_set1_epi32(0x7feb352d));
    z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 15));
    z = _mm256_mullo_epi32(z, _mm256_set1_epi32((int)0x846ca68bu));
    z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 16));
    r = _mm256_srli_epi32(z, 16);
  } else {
    r = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)));
  }
  __m256i o = _mm256_srli_epi32(_mm256_add_epi32(b, r), 16);
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  o = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(o), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
  __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(o, o), 0x08);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(pk));
}

struct HyperV {
  __m256 b1, omb1, b2, omb2, eps, ss, ibc, decay, wd;
  explicit HyperV(const Hyper& h)
      : b1(_mm256_set1_ps(h.b1)), omb1(_mm256_set1_ps(h.omb1)), b2(_mm256_set1_ps(h.b2)),
        omb2(_mm256_set1_ps(h.omb2)), eps(_mm256_set1_ps(h.eps)), ss(_mm256_set1_ps(h.step_size)),
        ibc(_mm256_set1_ps(h.inv_bc2_sqrt)), decay(_mm256_set1_ps(h.decay)), wd(_mm256_set1_ps(h.wd)) {}
};

inline float hmax(__m256 x) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}
#endif

}  // namespace
}  // namespace lowbit
