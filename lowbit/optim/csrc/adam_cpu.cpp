// Fused Adam/AdamW step with blockwise-quantized states, CPU (OpenMP + AVX2), plain C ABI.
//
// One call updates every parameter of one (param dtype, state format) bucket of a param group.
// Work is split into tasks of whole blocks; each block is independent (decode, update, absmax,
// encode), so results do not depend on threading. Math is fp32, no FMA contraction (build with
// -ffp-contract=off), in exactly the operation order of lowbit.optim._ref / _torch_step:
//
//   g = maximize ? -g : g;  if coupled: g = g + wd * p
//   m = b1 * m + omb1 * g;  v = b2 * v + omb2 * (g * g);  p = p * decay
//   u = v == 0 ? 0 : m / (sqrt(v) * inv_bc2_sqrt + eps);  p = p - step_size * u
//
// (v == 0 with m != 0 happens only when quantization flushed a tiny second moment to zero, e.g. an
// embedding row absent from the batch; exact AdamW has m == 0 there too, so the guard changes nothing
// for exact states and stops the m / eps blow-up for quantized ones.)
//
// then per block: amax = max |x| over finite x, scale = max(amax, 1e-30) (/ 448 for fp8),
// code = nearest(x * (1 / scale)) with non-finite x stored as the code of 0.
//
// fp8 stores the second moment as r = sqrt(v): decode gives r, v = r * r, and the stored value is
// sqrt(v_new), which is also the sqrt of the update (computed once, in stage A of the pipeline).
//
// Encode (AVX2): no table gather. 4-bit maps: code = #{c : x >= T[c]} over the 15 midpoint
// thresholds, counted in two levels of compares (the second with lane permutes; exact by construction). 8-bit dynamic maps: the positive
// values form <= 7 decades, each a near-linear grid, so code = floor(|x| * S[r] + B[r]) with the
// decade r = the count of exact decade boundaries <= |x| (7 independent compares); lanes whose t
// lies within delta of an integer (and exact midpoint ties on the negative side) are flagged, and a
// block with a flagged lane is re-encoded with the exact cell table (per vector, reencode8). The
// per-decade S, B and delta are built from the map at every call and checked at every code boundary
// (build_fast8); a map that fails the check keeps the table encode. fp8: e4m3 decode and encode by
// bit manipulation. Whole blocks run as a software pipeline (struct Pipe): stage B (the parameter
// update, sqrt/div) and C (encode) of block b share one loop with stage A (decode, moments, absmax)
// of block b+1. Measured on Zen 3 at 1 thread (8 x 1M fp32 params): the step is bound by the uop
// throughput of the 8-bit decode (scalar table loads) and encode (~30 uops per 8 lanes either way).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

enum Mode { FP32 = 0, Q8 = 1, Q4 = 2, FP8 = 3 };
constexpr int MAX_BLOCK = 8192;
constexpr float SCALE_FLOOR = 1e-30f;
constexpr float FP8_MAX = 448.0f;

struct Hyper {
  float b1, omb1, b2, omb2, eps, step_size, inv_bc2_sqrt, decay, wd;
  uint32_t seed;
  bool maximize, coupled, sr;
};

struct Codec {
  const float* qmap;      // decode table (256 entries, or 16 for 4-bit)
  const int32_t* table;   // encode cell table
  int32_t a_lo, a_hi, shift, ncells;
};

// Exact arithmetic encode of a dynamic 8-bit map (see the header); ok = 0: use the table.
struct Fast8 {
  int ok = 0, sgn = 0, z = 0, no_fallback = 0;  // no_fallback: tests only (must then fail)
  float top = 0.0f, delta = 0.0f, bnd[7] = {};
  float tie[2] = {NAN, NAN};
  float S[8] = {}, B[8] = {}, H[8] = {};  // per region: t = min(fma(a, S, B), H), code = floor(t)
  // the same boundaries as int32 bits minus 1 (a >= b <=> bits(a) > bits(b) - 1 for a, b >= 0)
  int32_t ib[7] = {}, itop = 0, itie[2] = {-1, -1};
  alignas(32) float rS[8] = {}, rB[8] = {}, rH[8] = {};  // S, B, H at index (8 - r) & 7
};

// Exact 4-bit encode: code = #{c : x >= T[c]} = 4 k + s with k = #{T[3], T[7], T[11] <= x} and
// s = #{T[4k], T[4k+1], T[4k+2] <= x} (tables a, b, c indexed by -k & 7).
struct Fast4 {
  float t3 = 0.0f, t7 = 0.0f, t11 = 0.0f;
  alignas(32) float a[8] = {}, b[8] = {}, c[8] = {};
};

#define LB_INLINE inline __attribute__((always_inline))

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}


// T[c] = the smallest fp32 >= the exact midpoint of q[c], q[c+1] (lowbit.quant.blockwise.thresholds)
inline void thresholds(const float* q, int n, float* T) {
  for (int c = 0; c + 1 < n; ++c) {
    double mid = ((double)q[c] + (double)q[c + 1]) / 2.0;
    float t = (float)mid;
    if ((double)t < mid) t = std::nextafter(t, INFINITY);
    T[c] = t;
  }
}

inline bool is_mid(const float* q, const float* T, int c) {
  return (double)T[c] == ((double)q[c] + (double)q[c + 1]) / 2.0;
}

// the fast 8-bit encode of a >= 0 (or any x <= 0 for unsigned maps) in scalar form, as the lanes do it
inline int fast8_region(float a, const Fast8& E) {
  int k = 0;
  for (int i = 0; i < 7; ++i) k += a >= E.bnd[i] ? 1 : 0;
  return k;
}
inline void fast8_pos(float a, const Fast8& E, int& lo, int& hi) {
  int r = fast8_region(a, E);
  float t = std::fmin(std::fmaf(a, E.S[r], E.B[r]), E.H[r]);
  lo = (int)(t - E.delta);
  hi = (int)(t + E.delta);
}

inline void build_fast4(const float* q, Fast4& E) {
  float T[15];
  thresholds(q, 16, T);
  E.t3 = T[3];
  E.t7 = T[7];
  E.t11 = T[11];
  for (int k = 0; k < 4; ++k) {
    E.a[(8 - k) & 7] = T[4 * k];
    E.b[(8 - k) & 7] = T[4 * k + 1];
    E.c[(8 - k) & 7] = T[4 * k + 2];
  }
}

inline void build_fast8(const float* q, Fast8& E, bool all_unsure = false) {
  E = Fast8();
#ifndef __FMA__
  return;
#endif
  float T[255];
  thresholds(q, 256, T);
  for (int c = 0; c < 255; ++c)
    if (!(q[c] < q[c + 1])) return;
  if (q[255] != 1.0f) return;
  int z = -1;
  for (int c = 0; c < 256; ++c)
    if (q[c] == 0.0f) z = c;
  if (z < 0) return;
  const bool sgn = z > 0;
  if (sgn) {
    if (2 * z != 254) return;
    for (int j = 1; j <= z; ++j)
      if (q[z - j] != -q[z + j]) return;
  } else if (z != 0) {
    return;
  }
  // regions: 0 = the code of 0, then the decades of the positive codes z+1..254
  int lo[8], hi[8], nr = 1, prevk = 1 << 30;
  lo[0] = hi[0] = z;
  for (int c = z + 1; c <= 254; ++c) {
    int k = (int)std::floor(-std::log10((double)q[c]));
    if (k != prevk) {
      if (nr == 8) return;
      lo[nr] = hi[nr] = c;
      ++nr;
      prevk = k;
    } else {
      hi[nr - 1] = c;
    }
  }
  float bnd[7];
  for (int i = 0; i < 7; ++i) bnd[i] = i + 1 < nr ? T[lo[i + 1] - 1] : INFINITY;
  int nties = 0;
  if (sgn) {
    for (int i = 0; i + 1 < nr; ++i) {
      if (is_mid(q, T, lo[i + 1] - 1)) {
        if (nties == 2) return;
        E.tie[nties++] = bnd[i];
      }
    }
  }
  for (int r = 0; r < 8; ++r) {
    if (r >= nr) { E.S[r] = 0.0f; E.B[r] = 0.5f; E.H[r] = 0.5f; continue; }
    if (lo[r] == hi[r]) {
      E.S[r] = 0.0f;
      E.B[r] = (float)lo[r] + 0.5f;
    } else {
      double sl = hi[r] - lo[r] >= 2 ? (hi[r] - lo[r] - 1) / ((double)T[hi[r] - 1] - (double)T[lo[r]])
                                     : 1.0 / ((double)q[hi[r]] - (double)q[lo[r]]);
      E.S[r] = (float)sl;
      E.B[r] = (float)((lo[r] + 1) - (double)T[lo[r]] * sl);
    }
    E.H[r] = (float)hi[r] + 0.5f;
  }
  for (int i = 0; i < 7; ++i) E.bnd[i] = bnd[i];
  E.top = T[254];
  E.sgn = sgn;
  E.z = z;
  // delta: the smallest that makes every code's interval right (t is monotone in a, so checking
  // both ends of each interval suffices); exact negative-side ties must land in the unsure band.
  for (float delta : {0x1p-18f, 0x1p-17f, 0x1p-16f, 0x1p-15f, 0x1p-14f, 0x1p-12f, 0x1p-10f, 0x1p-8f}) {
    E.delta = delta;
    bool good = true;
    for (int r = 0; r < nr && good; ++r) {
      for (int c = lo[r]; c <= hi[r] && good; ++c) {
        float L = c > lo[r] ? T[c - 1] : (r == 0 ? 0.0f : bnd[r - 1]);
        float U = c < hi[r] ? T[c] : (r + 1 < nr ? bnd[r] : E.top);
        float Um = std::nextafter(U, 0.0f);
        if (fast8_region(L, E) != r || fast8_region(Um, E) != r) { good = false; break; }
        int l, h;
        fast8_pos(L, E, l, h);
        if (h < c) good = false;
        fast8_pos(Um, E, l, h);
        if (l > c) good = false;
        if (sgn && c < hi[r] && is_mid(q, T, c)) {
          fast8_pos(T[c], E, l, h);
          if (l == h) good = false;
        }
      }
    }
    if (good) {
      if (all_unsure) E.delta = 0.5f;  // tests: t +- 1/2 always straddles an integer
      auto ib = [](float f) { return (int32_t)f2u(f) - 1; };
      for (int i = 0; i < 7; ++i) E.ib[i] = ib(bnd[i]);
      E.itop = ib(E.top);
      for (int r = 0; r < 8; ++r) {
        E.rS[(8 - r) & 7] = E.S[r];
        E.rB[(8 - r) & 7] = E.B[r];
        E.rH[(8 - r) & 7] = E.H[r];
      }
      for (int i = 0; i < 2; ++i) E.itie[i] = std::isnan(E.tie[i]) ? -1 : (int32_t)f2u(E.tie[i]);
      E.ok = 1;
      return;
    }
  }
}

// ---------------------------------------------------------------- scalar pieces
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


inline int encode_table_scalar(float x, const Codec& c) {
  uint32_t b = f2u(x);
  int32_t neg = -(int32_t)(b >> 31);
  int32_t a = (int32_t)(b & 0x7FFFFFFFu);
  if (a >= 0x7F800000) a = 0;
  a = std::min(std::max(a, c.a_lo), c.a_hi) - c.a_lo;
  int32_t mask = (1 << c.shift) - 1;
  int32_t cell = (a >> c.shift) + (neg & c.ncells);
  int32_t off = (a & mask) ^ (neg & mask);
  uint32_t e = (uint32_t)c.table[cell];
  return (int)(e >> 23) - (off < (int32_t)(e & 0x7FFFFFu) ? 1 : 0);
}

inline uint8_t encode_fp8_scalar(float x) {  // x finite; saturate then round to nearest even
  x = std::min(std::max(x, -FP8_MAX), FP8_MAX);
  uint32_t b = f2u(x);
  uint32_t sign = (b >> 24) & 0x80u;
  uint32_t a = b & 0x7FFFFFFFu;
  uint32_t mag;
  if (u2f(a) < 0x1p-6f) {
    mag = (uint32_t)std::nearbyint(u2f(a) * 512.0f);
  } else {
    mag = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  }
  return (uint8_t)(sign | mag);
}

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

// ---------------------------------------------------------------- AVX2 pieces
#ifdef __AVX2__
struct HyperV {
  __m256 b1, omb1, b2, omb2, eps, ss, ibc, decay, wd;
  explicit HyperV(const Hyper& h)
      : b1(_mm256_set1_ps(h.b1)), omb1(_mm256_set1_ps(h.omb1)), b2(_mm256_set1_ps(h.b2)),
        omb2(_mm256_set1_ps(h.omb2)), eps(_mm256_set1_ps(h.eps)), ss(_mm256_set1_ps(h.step_size)),
        ibc(_mm256_set1_ps(h.inv_bc2_sqrt)), decay(_mm256_set1_ps(h.decay)), wd(_mm256_set1_ps(h.wd)) {}
};

inline __m256 adam_vec(__m256 p, __m256 g, __m256& m, __m256& v, const HyperV& H, const Hyper& h) {
  if (h.maximize) g = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
  if (h.coupled) g = _mm256_add_ps(g, _mm256_mul_ps(H.wd, p));
  m = _mm256_add_ps(_mm256_mul_ps(H.b1, m), _mm256_mul_ps(H.omb1, g));
  v = _mm256_add_ps(_mm256_mul_ps(H.b2, v), _mm256_mul_ps(H.omb2, _mm256_mul_ps(g, g)));
  p = _mm256_mul_ps(p, H.decay);
  __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), H.ibc), H.eps);
  __m256 u = _mm256_and_ps(_mm256_div_ps(m, denom), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  return _mm256_sub_ps(p, _mm256_mul_ps(H.ss, u));
}


inline __m256 zero_non_finite(__m256 x) {
  __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_and_ps(x, _mm256_cmp_ps(a, _mm256_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ));
}

inline float hmax(__m256 x) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

LB_INLINE __m256i encode_table_vec(__m256 x, const Codec& c) {
  __m256i b = _mm256_castps_si256(x);
  __m256i neg = _mm256_srai_epi32(b, 31);
  __m256i a = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF));
  a = _mm256_and_si256(a, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7F800000), a));
  __m256i alo = _mm256_set1_epi32(c.a_lo);
  a = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(a, alo), _mm256_set1_epi32(c.a_hi)), alo);
  __m256i mask = _mm256_set1_epi32((1 << c.shift) - 1);
  __m256i cell = _mm256_add_epi32(_mm256_srl_epi32(a, _mm_cvtsi32_si128(c.shift)),
                                  _mm256_and_si256(neg, _mm256_set1_epi32(c.ncells)));
  __m256i off = _mm256_xor_si256(_mm256_and_si256(a, mask), _mm256_and_si256(neg, mask));
  __m256i e = _mm256_i32gather_epi32(c.table, cell, 4);
  __m256i c1 = _mm256_srli_epi32(e, 23);
  __m256i t = _mm256_and_si256(e, _mm256_set1_epi32(0x7FFFFF));
  return _mm256_add_epi32(c1, _mm256_cmpgt_epi32(t, off));
}

// x finite (non-finite moments were zeroed); codes of unsure lanes come from the table
// Lanes whose code is unsure set bits in bad_acc (the caller re-encodes them with the table).
LB_INLINE __m256i encode_fast8_vec(__m256 x, const Fast8& E, __m256i& bad_acc) {
  // a >= 0 here (or any x <= 0 for unsigned maps, whose int bits are <= 0): compare as int32 bits
  __m256 a = E.sgn ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x) : x;
  __m256i ai = _mm256_castps_si256(a);
  // region r = #{i : a >= bnd[i]} by 7 independent compares (short latency chain); the sum of the
  // masks is -r, and -r & 7 indexes tables stored at (8 - r) & 7
  __m256i k0 = _mm256_add_epi32(_mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[0])),
                                _mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[1])));
  __m256i k1 = _mm256_add_epi32(_mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[2])),
                                _mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[3])));
  __m256i k2 = _mm256_add_epi32(_mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[4])),
                                _mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[5])));
  __m256i k = _mm256_add_epi32(_mm256_add_epi32(k0, k1),
                               _mm256_add_epi32(k2, _mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.ib[6]))));
#ifdef __FMA__
  __m256 t = _mm256_fmadd_ps(a, _mm256_permutevar8x32_ps(_mm256_load_ps(E.rS), k),
                             _mm256_permutevar8x32_ps(_mm256_load_ps(E.rB), k));
#else  // unused: build_fast8 leaves ok = 0 without FMA (its checks model the fused multiply-add)
  __m256 t = _mm256_add_ps(_mm256_mul_ps(a, _mm256_permutevar8x32_ps(_mm256_load_ps(E.rS), k)),
                           _mm256_permutevar8x32_ps(_mm256_load_ps(E.rB), k));
#endif
  t = _mm256_min_ps(t, _mm256_permutevar8x32_ps(_mm256_load_ps(E.rH), k));
  __m256 d = _mm256_set1_ps(E.delta);
  __m256i lo = _mm256_cvttps_epi32(_mm256_sub_ps(t, d));
  __m256i bad = _mm256_xor_si256(lo, _mm256_cvttps_epi32(_mm256_add_ps(t, d)));
  __m256i top = _mm256_cmpgt_epi32(ai, _mm256_set1_epi32(E.itop));
  __m256i code = _mm256_or_si256(lo, _mm256_and_si256(top, _mm256_set1_epi32(255)));
  if (E.sgn) {
    bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpeq_epi32(ai, _mm256_set1_epi32(E.itie[0])),
                                               _mm256_cmpeq_epi32(ai, _mm256_set1_epi32(E.itie[1]))));
    __m256i neg = _mm256_sub_epi32(_mm256_set1_epi32(2 * E.z), lo);
    code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(code), _mm256_castsi256_ps(neg), x));
  }
  bad_acc = _mm256_or_si256(bad_acc, bad);
  return code;
}

LB_INLINE __m256i encode8_checked(__m256 x, const Fast8& E, const Codec& c) {
  __m256i bad = _mm256_setzero_si256();
  __m256i code = encode_fast8_vec(x, E, bad);
  if (__builtin_expect(!_mm256_testz_si256(bad, bad), 0) && !E.no_fallback) return encode_table_vec(x, c);
  return code;
}


LB_INLINE __m256i encode_fast4_vec(__m256 x, const Fast4& E) {
  auto ge = [&](__m256 t) { return _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GE_OQ)); };
  __m256i k = _mm256_add_epi32(_mm256_add_epi32(ge(_mm256_set1_ps(E.t3)), ge(_mm256_set1_ps(E.t7))),
                               ge(_mm256_set1_ps(E.t11)));  // -k
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(ge(_mm256_permutevar8x32_ps(_mm256_load_ps(E.a), k)),
                                                ge(_mm256_permutevar8x32_ps(_mm256_load_ps(E.b), k))),
                               ge(_mm256_permutevar8x32_ps(_mm256_load_ps(E.c), k)));  // -s
  return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_add_epi32(_mm256_slli_epi32(k, 2), s));
}

// |x| <= 448 (1 + 4e-7) here (x = moment / (absmax / 448)), so no saturation is needed: the
// largest such x rounds to 448 like the clamped value would.
LB_INLINE __m256i encode_fp8_vec(__m256 x) {  // x finite
  __m256i b = _mm256_castps_si256(x);
  __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 24), _mm256_set1_epi32(0x80));
  __m256i a = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF));
  __m256 af = _mm256_castsi256_ps(a);
  // subnormal: round |x| to a multiple of 2^-9 (ties to even) by adding 2^14 (ulp 2^-9)
  __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(af, _mm256_set1_ps(16384.0f))),
                                 _mm256_set1_epi32(0x46800000));
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i nrm = _mm256_sub_epi32(
      _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), odd)), 20),
      _mm256_set1_epi32(120 << 3));
  __m256 is_sub = _mm256_cmp_ps(af, _mm256_set1_ps(0x1p-6f), _CMP_LT_OQ);
  __m256i mag = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(nrm), _mm256_castsi256_ps(sub), is_sub));
  return _mm256_or_si256(mag, sign);
}

// the eight codes from one 8-byte load, split in a register (fewer load uops than byte loads)
LB_INLINE __m256 decode8_vec(const uint8_t* c, const float* q) {
  uint64_t w; std::memcpy(&w, c, 8);
  __m128 lo = _mm_setr_ps(q[w & 255], q[(w >> 8) & 255], q[(w >> 16) & 255], q[(w >> 24) & 255]);
  __m128 hi = _mm_setr_ps(q[(w >> 32) & 255], q[(w >> 40) & 255], q[(w >> 48) & 255], q[w >> 56]);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// e4m3fn bits -> fp32, exactly: normals by moving the bits (exponent bias 7 -> 127), subnormals
// m * 2^-9 by an int -> float conversion (no denormal operands); 0x7F is NaN.
LB_INLINE __m256 decode_fp8_vec(const uint8_t* c) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c));
  __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  __m256i nrm = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23));
  __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-9f));
  __m256 x = _mm256_blendv_ps(_mm256_castsi256_ps(nrm), sub,
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag)));
  __m256i nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F));
  __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(b, 7), 31);
  return _mm256_or_ps(x, _mm256_castsi256_ps(_mm256_or_si256(sign, nan)));
}

// 32 codes (0..255, int32 lanes, elements in order c0..c3) -> 32 bytes / 16 nibble-pair bytes
LB_INLINE __m256i pack32_codes(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
LB_INLINE void store32_codes8(uint8_t* dst, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  _mm256_storeu_si256((__m256i*)dst, pack32_codes(c0, c1, c2, c3));
}
LB_INLINE void store32_codes4(uint8_t* dst, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  __m256i y = _mm256_maddubs_epi16(pack32_codes(c0, c1, c2, c3), _mm256_set1_epi16(0x1001));  // lo | hi << 4
  __m256i z = _mm256_permute4x64_epi64(_mm256_packus_epi16(y, y), 0x08);
  _mm_storeu_si128((__m128i*)dst, _mm256_castsi256_si128(z));
}

LB_INLINE void store8_codes(uint8_t* dst, __m256i c) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i s = _mm256_shuffle_epi8(c, pick);
  uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(s));
  uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(s, 1));
  uint64_t w = (uint64_t)lo | ((uint64_t)hi << 32);
  std::memcpy(dst, &w, 8);
}

// re-encode n (multiple of 8) codes of buf * inv where the arithmetic encode was unsure
__attribute__((noinline, cold)) void reencode8(const float* buf, int64_t n, __m256 inv, uint8_t* codes, const Fast8& E,
                                               const Codec& c) {
  for (int64_t i = 0; i < n; i += 8) store8_codes(codes + i, encode8_checked(_mm256_mul_ps(_mm256_load_ps(buf + i), inv), E, c));
}

inline __m256i nibble_shifts() { return _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28); }

LB_INLINE __m256 decode4_vec(const uint8_t* packed, const float* qmap16) {
  uint32_t w; std::memcpy(&w, packed, 4);
  __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), nibble_shifts()),
                                 _mm256_set1_epi32(15));
  __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(qmap16), idx);
  __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(qmap16 + 8), idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

LB_INLINE void store4_codes(uint8_t* dst, __m256i c) {
  __m256i s = _mm256_sllv_epi32(c, nibble_shifts());
  __m128i x = _mm_or_si128(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  x = _mm_or_si128(x, _mm_unpackhi_epi64(x, x));
  x = _mm_or_si128(x, _mm_srli_epi64(x, 32));
  uint32_t w = (uint32_t)_mm_cvtsi128_si32(x);
  std::memcpy(dst, &w, 4);
}

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
#endif

// ---------------------------------------------------------------- one block
struct Args {
  int mode;
  int64_t block_size;
  const Codec* cm;
  const Codec* cv;
  bool scalar_only;
  const Fast8* f8m;  // null: table encode
  const Fast8* f8v;
  const Fast4* f4m;
  const Fast4* f4v;
  bool fp8_arith;  // arithmetic e4m3 decode
};

template <typename P>
void fp32_chunk(P* p, const P* g, float* m, float* v, int64_t base, int64_t n, const Hyper& h, const Args& A) {
  int64_t i = 0;
#ifdef __AVX2__
  if (!A.scalar_only) {
    HyperV H(h);
    for (; i + 8 <= n; i += 8) {
      __m256 mm = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
      __m256 pp = adam_vec(load_p_vec<P>(p + i), load_p_vec<P>(g + i), mm, vv, H, h);
      store_p_vec<P>(p + i, pp, (uint32_t)(base + i), h);
      _mm256_storeu_ps(m + i, mm);
      _mm256_storeu_ps(v + i, vv);
    }
  }
#endif
  for (; i < n; ++i) {
    float mm = m[i], vv = v[i];
    float pp = adam_scalar(load_p<P>(p, i), load_p<P>(g, i), mm, vv, h);
    store_p<P>(p, i, pp, (uint32_t)(base + i), h);
    m[i] = mm;
    v[i] = vv;
  }
}

inline float decode_scalar(const uint8_t* codes, int64_t i, const float* qmap, bool four) {
  int c = four ? (codes[i >> 1] >> ((i & 1) * 4)) & 15 : codes[i];
  return qmap[c];
}

// p, g, element codes point at the block's first element; block index blk; n elements.
template <typename P>
void quant_block(P* p, const P* g, uint8_t* mc, float* ms, uint8_t* vc, float* vs, int64_t base, int64_t n,
                 const Hyper& h, const Args& A) {
  alignas(32) float mb[MAX_BLOCK];
  alignas(32) float vb[MAX_BLOCK];
  const bool four = A.mode == Q4;
  const bool v_sqrt = A.mode == FP8;
  const float sm = *ms, sv = *vs;
  const float* qm = A.cm->qmap;
  const float* qv = A.cv->qmap;
  float am = 0.0f, av = 0.0f;
  int64_t i = 0;
#ifdef __AVX2__
  if (!A.scalar_only) {
    HyperV H(h);
    __m256 vsm = _mm256_set1_ps(sm), vsv = _mm256_set1_ps(sv);
    __m256 vam = _mm256_setzero_ps(), vav = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      __m256 mm, vv;
      if (four) {
        mm = decode4_vec(mc + (i >> 1), qm);
        vv = decode4_vec(vc + (i >> 1), qv);
      } else if (A.fp8_arith) {
        mm = decode_fp8_vec(mc + i);
        vv = decode_fp8_vec(vc + i);
      } else {
        mm = decode8_vec(mc + i, qm);
        vv = decode8_vec(vc + i, qv);
      }
      mm = _mm256_mul_ps(mm, vsm);
      vv = _mm256_mul_ps(vv, vsv);
      if (v_sqrt) vv = _mm256_mul_ps(vv, vv);
      __m256 pp = adam_vec(load_p_vec<P>(p + i), load_p_vec<P>(g + i), mm, vv, H, h);
      store_p_vec<P>(p + i, pp, (uint32_t)(base + i), h);
      if (v_sqrt) vv = _mm256_sqrt_ps(vv);
      // non-finite moments are stored as 0 and stay out of the absmax
      mm = zero_non_finite(mm);
      vv = zero_non_finite(vv);
      _mm256_store_ps(mb + i, mm);
      _mm256_store_ps(vb + i, vv);
      vam = _mm256_max_ps(vam, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), mm));
      vav = _mm256_max_ps(vav, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), vv));
    }
    am = hmax(vam);
    av = hmax(vav);
  }
#endif
  for (; i < n; ++i) {
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

  i = 0;
#ifdef __AVX2__
  if (!A.scalar_only) {
    __m256 vim = _mm256_set1_ps(im), viv = _mm256_set1_ps(iv);
    for (; i + 8 <= n; i += 8) {
      __m256 xm = _mm256_mul_ps(_mm256_load_ps(mb + i), vim);
      __m256 xv = _mm256_mul_ps(_mm256_load_ps(vb + i), viv);
      if (fp8) {
        store8_codes(mc + i, encode_fp8_vec(xm));
        store8_codes(vc + i, encode_fp8_vec(xv));
      } else if (four) {
        store4_codes(mc + (i >> 1), A.f4m ? encode_fast4_vec(xm, *A.f4m) : encode_table_vec(xm, *A.cm));
        store4_codes(vc + (i >> 1), A.f4v ? encode_fast4_vec(xv, *A.f4v) : encode_table_vec(xv, *A.cv));
      } else {
        store8_codes(mc + i, A.f8m ? encode8_checked(xm, *A.f8m, *A.cm) : encode_table_vec(xm, *A.cm));
        store8_codes(vc + i, A.f8v ? encode8_checked(xv, *A.f8v, *A.cv) : encode_table_vec(xv, *A.cv));
      }
    }
  }
#endif
  for (; i < n; ++i) {
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

#ifdef __AVX2__
// ---------------------------------------------------------------- pipelined blocks (AVX2)
// The same math as quant_block, split into three stages over a block's 8-lane vectors:
//   A: decode the moments, update m and v, absmax  (-> raw m, v in a block buffer)
//   B: the parameter update (sqrt, div) from the buffer
//   C: encode the buffer with the new scales
// and run as a software pipeline: one loop does B and C of block b together with A of block b+1,
// so the long sqrt/div latency of B overlaps independent decode/encode work (one block's chain alone
// stalls the out-of-order window). Blocks with a non-finite moment (rare) run the stages one by one
// with the buffer zeroed where non-finite before C. Only whole-vector blocks come here.
template <typename P>
struct Pipe {
  const Hyper& h;
  const Args& A;
  HyperV H;
  P* p;
  const P* g;
  uint8_t* mcodes;
  uint8_t* vcodes;
  float* msc;
  float* vsc;
  int64_t bs;
  alignas(32) float buf[2][2][MAX_BLOCK];  // [ping-pong][m, v]

  Pipe(const Hyper& h_, const Args& A_, P* p_, const P* g_, uint8_t* mc_, uint8_t* vc_, float* ms_, float* vs_)
      : h(h_), A(A_), H(h_), p(p_), g(g_), mcodes(mc_), vcodes(vc_), msc(ms_), vsc(vs_), bs(A_.block_size) {}

  uint8_t* mcb(int64_t b) const { return mcodes + (A.mode == Q4 ? b * bs / 2 : b * bs); }
  uint8_t* vcb(int64_t b) const { return vcodes + (A.mode == Q4 ? b * bs / 2 : b * bs); }

  // stage A state of one block
  struct AState {
    __m256 sm, sv, am, av, nan;
  };
  AState a_begin(int64_t b) const {
    return AState{_mm256_set1_ps(msc[b]), _mm256_set1_ps(vsc[b]), _mm256_setzero_ps(), _mm256_setzero_ps(),
                  _mm256_setzero_ps()};
  }
  LB_INLINE void a_vec(int64_t b, int64_t i, float* bm, float* bv, AState& st) const {
    const uint8_t* mc = mcb(b);
    const uint8_t* vc = vcb(b);
    __m256 mm, vv;
    if (A.mode == Q4) {
      mm = decode4_vec(mc + (i >> 1), A.cm->qmap);
      vv = decode4_vec(vc + (i >> 1), A.cv->qmap);
    } else if (A.fp8_arith) {
      mm = decode_fp8_vec(mc + i);
      vv = decode_fp8_vec(vc + i);
    } else {
      mm = decode8_vec(mc + i, A.cm->qmap);
      vv = decode8_vec(vc + i, A.cv->qmap);
    }
    mm = _mm256_mul_ps(mm, st.sm);
    vv = _mm256_mul_ps(vv, st.sv);
    if (A.mode == FP8) vv = _mm256_mul_ps(vv, vv);  // stored: sqrt(v)
    const int64_t e = b * bs + i;
    __m256 gg = load_p_vec<P>(g + e);
    if (h.maximize) gg = _mm256_xor_ps(gg, _mm256_set1_ps(-0.0f));
    if (h.coupled) gg = _mm256_add_ps(gg, _mm256_mul_ps(H.wd, load_p_vec<P>(p + e)));
    mm = _mm256_add_ps(_mm256_mul_ps(H.b1, mm), _mm256_mul_ps(H.omb1, gg));
    vv = _mm256_add_ps(_mm256_mul_ps(H.b2, vv), _mm256_mul_ps(H.omb2, _mm256_mul_ps(gg, gg)));
    if (A.mode == FP8) vv = _mm256_sqrt_ps(vv);  // the buffer holds sqrt(v) (B and C use it as is)
    _mm256_store_ps(bm + i, mm);
    _mm256_store_ps(bv + i, vv);
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    st.am = _mm256_max_ps(_mm256_andnot_ps(sgn, mm), st.am);  // a NaN lane keeps the running max
    st.av = _mm256_max_ps(_mm256_andnot_ps(sgn, vv), st.av);
    st.nan = _mm256_or_ps(st.nan, _mm256_cmp_ps(mm, vv, _CMP_UNORD_Q));
  }
  LB_INLINE void b_vec(int64_t b, int64_t i, const float* bm, const float* bv) const {
    const int64_t e = b * bs + i;
    __m256 pp = _mm256_mul_ps(load_p_vec<P>(p + e), H.decay);
    __m256 m = _mm256_load_ps(bm + i), v = _mm256_load_ps(bv + i);
    __m256 r = A.mode == FP8 ? v : _mm256_sqrt_ps(v);  // (v >= 0 or NaN: sqrt(v) == 0 iff v == 0)
    __m256 denom = _mm256_add_ps(_mm256_mul_ps(r, H.ibc), H.eps);
    __m256 u = _mm256_and_ps(_mm256_div_ps(m, denom), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
    store_p_vec<P>(p + e, _mm256_sub_ps(pp, _mm256_mul_ps(H.ss, u)), (uint32_t)e, h);
  }
  LB_INLINE void c_vec(int64_t b, int64_t i, const float* bm, const float* bv, __m256 im, __m256 iv, __m256i& bad_m,
                       __m256i& bad_v) const {
    __m256 xm = _mm256_mul_ps(_mm256_load_ps(bm + i), im);
    __m256 xv = _mm256_mul_ps(_mm256_load_ps(bv + i), iv);
    uint8_t* mc = mcb(b);
    uint8_t* vc = vcb(b);
    if (A.mode == FP8) {
      store8_codes(mc + i, encode_fp8_vec(xm));
      store8_codes(vc + i, encode_fp8_vec(xv));
    } else if (A.mode == Q4) {
      store4_codes(mc + (i >> 1), A.f4m ? encode_fast4_vec(xm, *A.f4m) : encode_table_vec(xm, *A.cm));
      store4_codes(vc + (i >> 1), A.f4v ? encode_fast4_vec(xv, *A.f4v) : encode_table_vec(xv, *A.cv));
    } else {
      store8_codes(mc + i, A.f8m ? encode_fast8_vec(xm, *A.f8m, bad_m) : encode_table_vec(xm, *A.cm));
      store8_codes(vc + i, A.f8v ? encode_fast8_vec(xv, *A.f8v, bad_v) : encode_table_vec(xv, *A.cv));
    }
  }
  // after C of a whole block: redo the 8-bit codes if any lane was unsure
  void c_fix(int64_t b, const float* bm, const float* bv, __m256 im, __m256 iv, __m256i& bad_m, __m256i& bad_v) const {
    if (A.mode == Q8) {
      if (__builtin_expect(!_mm256_testz_si256(bad_m, bad_m), 0)) reencode8(bm, bs, im, mcb(b), *A.f8m, *A.cm);
      if (__builtin_expect(!_mm256_testz_si256(bad_v, bad_v), 0)) reencode8(bv, bs, iv, vcb(b), *A.f8v, *A.cv);
    }
    bad_m = bad_v = _mm256_setzero_si256();
  }
  LB_INLINE __m256i enc_m(__m256 x) const {
    if (A.mode == FP8) return encode_fp8_vec(x);
    if (A.mode == Q4) return A.f4m ? encode_fast4_vec(x, *A.f4m) : encode_table_vec(x, *A.cm);
    return A.f8m ? encode8_checked(x, *A.f8m, *A.cm) : encode_table_vec(x, *A.cm);
  }
  LB_INLINE __m256i enc_v(__m256 x) const {
    if (A.mode == FP8) return encode_fp8_vec(x);
    if (A.mode == Q4) return A.f4v ? encode_fast4_vec(x, *A.f4v) : encode_table_vec(x, *A.cv);
    return A.f8v ? encode8_checked(x, *A.f8v, *A.cv) : encode_table_vec(x, *A.cv);
  }
  // C on 32 elements, codes packed into one store per moment
  LB_INLINE void c_vec4(int64_t b, int64_t i, const float* bm, const float* bv, __m256 im, __m256 iv) const {
    __m256i k0 = enc_m(_mm256_mul_ps(_mm256_load_ps(bm + i), im));
    __m256i k1 = enc_m(_mm256_mul_ps(_mm256_load_ps(bm + i + 8), im));
    __m256i k2 = enc_m(_mm256_mul_ps(_mm256_load_ps(bm + i + 16), im));
    __m256i k3 = enc_m(_mm256_mul_ps(_mm256_load_ps(bm + i + 24), im));
    __m256i j0 = enc_v(_mm256_mul_ps(_mm256_load_ps(bv + i), iv));
    __m256i j1 = enc_v(_mm256_mul_ps(_mm256_load_ps(bv + i + 8), iv));
    __m256i j2 = enc_v(_mm256_mul_ps(_mm256_load_ps(bv + i + 16), iv));
    __m256i j3 = enc_v(_mm256_mul_ps(_mm256_load_ps(bv + i + 24), iv));
    if (A.mode == Q4) {
      store32_codes4(mcb(b) + (i >> 1), k0, k1, k2, k3);
      store32_codes4(vcb(b) + (i >> 1), j0, j1, j2, j3);
    } else {
      store32_codes8(mcb(b) + i, k0, k1, k2, k3);
      store32_codes8(vcb(b) + i, j0, j1, j2, j3);
    }
  }
  // after stage A of block b (n elements): new scales; false if a moment is non-finite
  bool a_end(int64_t b, int64_t n, const AState& st, float* bm, float* bv, __m256& im, __m256& iv) const {
    float am = hmax(st.am), av = hmax(st.av);
    const bool clean = _mm256_movemask_ps(st.nan) == 0 && am <= 3.4028234663852886e38f && av <= 3.4028234663852886e38f;
    if (!clean) {  // zero the non-finite moments (B has used them already) and redo the absmax
      am = av = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(bm[i])) bm[i] = 0.0f;
        if (!std::isfinite(bv[i])) bv[i] = 0.0f;
        am = std::max(am, std::fabs(bm[i]));
        av = std::max(av, std::fabs(bv[i]));
      }
    }
    float nsm = std::max(am, SCALE_FLOOR), nsv = std::max(av, SCALE_FLOOR);
    if (A.mode == FP8) { nsm = nsm / FP8_MAX; nsv = nsv / FP8_MAX; }
    im = _mm256_set1_ps(1.0f / nsm);
    iv = _mm256_set1_ps(1.0f / nsv);
    msc[b] = nsm;
    vsc[b] = nsv;
    return clean;
  }
  bool clean_a(const AState& st) const {
    return _mm256_movemask_ps(st.nan) == 0 && hmax(st.am) <= 3.4028234663852886e38f &&
           hmax(st.av) <= 3.4028234663852886e38f;
  }

  // blocks [b0, b1), each of bs elements
  void run(int64_t b0, int64_t b1) {
    if (b0 >= b1) return;
    __m256i bad_m = _mm256_setzero_si256(), bad_v = _mm256_setzero_si256();  // unsure 8-bit lanes of a block
    int cur = 0;
    AState st = a_begin(b0);
    for (int64_t i = 0; i < bs; i += 8) a_vec(b0, i, buf[cur][0], buf[cur][1], st);
    for (int64_t b = b0; b < b1; ++b) {
      float* bm = buf[cur][0];
      float* bv = buf[cur][1];
      float* nm = buf[cur ^ 1][0];
      float* nv = buf[cur ^ 1][1];
      const bool next = b + 1 < b1;
      if (clean_a(st)) {
        __m256 im, iv;
        a_end(b, bs, st, bm, bv, im, iv);
        if (next) {
          AState sn = a_begin(b + 1);
          if (bs % 32 == 0 && A.mode != Q8) {  // (measured: the 8-bit encode does better unpacked)
            for (int64_t i = 0; i < bs; i += 32) {
              for (int64_t k = 0; k < 32; k += 8) b_vec(b, i + k, bm, bv);
              c_vec4(b, i, bm, bv, im, iv);
              for (int64_t k = 0; k < 32; k += 8) a_vec(b + 1, i + k, nm, nv, sn);
            }
          } else {
            for (int64_t i = 0; i < bs; i += 8) {
              b_vec(b, i, bm, bv);
              c_vec(b, i, bm, bv, im, iv, bad_m, bad_v);
              a_vec(b + 1, i, nm, nv, sn);
            }
            c_fix(b, bm, bv, im, iv, bad_m, bad_v);
          }
          st = sn;
        } else {
          for (int64_t i = 0; i < bs; i += 8) {
            b_vec(b, i, bm, bv);
            c_vec(b, i, bm, bv, im, iv, bad_m, bad_v);
          }
          c_fix(b, bm, bv, im, iv, bad_m, bad_v);
        }
      } else {
        for (int64_t i = 0; i < bs; i += 8) b_vec(b, i, bm, bv);
        __m256 im, iv;
        a_end(b, bs, st, bm, bv, im, iv);
        for (int64_t i = 0; i < bs; i += 8) c_vec(b, i, bm, bv, im, iv, bad_m, bad_v);
        c_fix(b, bm, bv, im, iv, bad_m, bad_v);
        if (next) {
          st = a_begin(b + 1);
          for (int64_t i = 0; i < bs; i += 8) a_vec(b + 1, i, nm, nv, st);
        }
      }
      cur ^= 1;
    }
  }
};
#endif

template <typename P>
void run_task(int64_t b0, int64_t b1, int64_t numel, void* pp, void* gp, void* mp, float* msp, void* vp, float* vsp,
              const Hyper& h, const Args& A) {
  P* p = (P*)pp;
  const P* g = (const P*)gp;
  const int64_t bs = A.block_size;
#ifdef __AVX2__
  if (A.mode != FP32 && !A.scalar_only) {  // whole blocks through the pipeline, a partial last one below
    int64_t full_end = std::min(b1, numel / bs);
    if (full_end > b0) {
      Pipe<P> pipe(h, A, p, g, (uint8_t*)mp, (uint8_t*)vp, msp, vsp);
      pipe.run(b0, full_end);
      b0 = full_end;
    }
  }
#endif
  for (int64_t b = b0; b < b1; ++b) {
    int64_t s = b * bs, n = std::min(bs, numel - s);
    if (A.mode == FP32) {
      fp32_chunk<P>(p + s, g + s, (float*)mp + s, (float*)vp + s, s, n, h, A);
    } else if (A.mode == Q4) {
      quant_block<P>(p + s, g + s, (uint8_t*)mp + s / 2, msp + b, (uint8_t*)vp + s / 2, vsp + b, s, n, h, A);
    } else {
      quant_block<P>(p + s, g + s, (uint8_t*)mp + s, msp + b, (uint8_t*)vp + s, vsp + b, s, n, h, A);
    }
  }
}

}  // namespace

extern "C" {

int lowbit_max_block() { return MAX_BLOCK; }

#ifdef __AVX2__
int lowbit_has_avx2() { return 1; }
#else
int lowbit_has_avx2() { return 0; }
#endif

// Returns 0 on success, a negative number on bad arguments.
// hyper: [n, 9] fp32 rows (b1, omb1, b2, omb2, eps, step_size, inv_bc2_sqrt, decay, wd).
// meta_*: a_lo, a_hi, shift, ncells of the encode cell table.
// flags: 1 maximize, 2 coupled weight decay (Adam), 4 bf16 stochastic rounding, 8 scalar only,
// 16 table encode (no arithmetic encode), 32 (tests) 8-bit arithmetic encode with every lane unsure.
int lowbit_adam_step(int64_t n_params, int mode, int param_bf16, int64_t block_size, void** params, void** grads,
                     void** m_data, float** m_scale, void** v_data, float** v_scale, const int64_t* numels,
                     const float* hyper, const uint32_t* seeds, const float* qmap_m, const float* qmap_v,
                     const int32_t* tab_m, const int32_t* meta_m, const int32_t* tab_v, const int32_t* meta_v,
                     int flags, int num_threads) {
  if (block_size <= 0 || block_size > MAX_BLOCK || block_size % 8 != 0) return -1;
  if (mode < FP32 || mode > FP8) return -2;
  Codec cm{qmap_m, tab_m, 0, 0, 1, 0}, cv{qmap_v, tab_v, 0, 0, 1, 0};
  if (mode == Q8 || mode == Q4) {
    cm = Codec{qmap_m, tab_m, meta_m[0], meta_m[1], meta_m[2], meta_m[3]};
    cv = Codec{qmap_v, tab_v, meta_v[0], meta_v[1], meta_v[2], meta_v[3]};
  }
  Fast8 f8m, f8v;
  Fast4 f4m, f4v;
  const bool fast = (flags & 16) == 0;  // 16: table encode (tests, benchmarks)
  if (mode == Q8 && fast) {
    build_fast8(qmap_m, f8m, (flags & 32) != 0);
    build_fast8(qmap_v, f8v, (flags & 32) != 0);
  }
  if (mode == Q4 && fast) {
    build_fast4(qmap_m, f4m);
    build_fast4(qmap_v, f4v);
  }
  Args A{mode, block_size, &cm, &cv, (flags & 8) != 0, f8m.ok ? &f8m : nullptr, f8v.ok ? &f8v : nullptr,
         mode == Q4 && fast ? &f4m : nullptr, mode == Q4 && fast ? &f4v : nullptr, mode == FP8 && fast};
  // tasks of whole blocks, about 16K elements each
  const int64_t per_task = std::max<int64_t>(1, 16384 / block_size);
  struct Task { int64_t j, b0, b1; };
  std::vector<Task> tasks;
  for (int64_t j = 0; j < n_params; ++j) {
    int64_t nb = (numels[j] + block_size - 1) / block_size;
    for (int64_t b = 0; b < nb; b += per_task) tasks.push_back({j, b, std::min(nb, b + per_task)});
  }
  std::vector<Hyper> hs(n_params);
  for (int64_t j = 0; j < n_params; ++j) {
    const float* r = hyper + 9 * j;
    hs[j] = Hyper{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], seeds[j],
                  (flags & 1) != 0, (flags & 2) != 0, (flags & 4) != 0};
  }
  const int64_t nt = (int64_t)tasks.size();
  int threads = std::max(1, std::min<int>(num_threads, (int)nt));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < nt; ++t) {
    const Task& k = tasks[t];
    const int64_t j = k.j;
    float* ms = m_scale ? m_scale[j] : nullptr;
    float* vs = v_scale ? v_scale[j] : nullptr;
    if (param_bf16)
      run_task<uint16_t>(k.b0, k.b1, numels[j], params[j], grads[j], m_data[j], ms, v_data[j], vs, hs[j], A);
    else
      run_task<float>(k.b0, k.b1, numels[j], params[j], grads[j], m_data[j], ms, v_data[j], vs, hs[j], A);
  }
  return 0;
}

// Tests: compare the arithmetic encode (8-bit or 4-bit map qmap) with the cell-table encode on
// every finite fp32 bit pattern u in [u_lo, u_hi) (and its negative). Returns the number of
// mismatches (first one in *first_bad), or -1 if the map has no arithmetic encode.
// bits | 256: 8-bit maps without the table re-encode of unsure lanes (the check must then fail).
int64_t lowbit_encode_check(int bits, const float* qmap, const int32_t* tab, const int32_t* meta, uint32_t u_lo,
                            uint32_t u_hi, uint32_t* first_bad) {
#if defined(__AVX2__) && defined(__FMA__)
  Codec c{qmap, tab, meta[0], meta[1], meta[2], meta[3]};
  Fast8 f8;
  Fast4 f4;
  const int no_fallback = (bits & 256) != 0;
  bits &= 255;
  if (bits == 8) {
    build_fast8(qmap, f8);
    if (!f8.ok) return -1;
    f8.no_fallback = no_fallback;
  } else {
    build_fast4(qmap, f4);
  }
  int64_t bad = 0;
  const int32_t cmask = bits == 8 ? 255 : 15;
  auto enc = [&](__m256 x) { return bits == 8 ? encode8_checked(x, f8, c) : encode_fast4_vec(x, f4); };
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint64_t u = u_lo; u < u_hi; u += 8) {
      alignas(32) uint32_t in[8];
      bool plain = u + 8 <= u_hi && u + 8 <= 0x7F800000u;
      for (int j = 0; j < 8; ++j) {
        uint32_t w = (uint32_t)std::min<uint64_t>(u + j, u_hi - 1);
        if ((w & 0x7FFFFFFFu) >= 0x7F800000u) w = 0;  // finite inputs only
        in[j] = w | sign;
      }
      __m256i got = _mm256_and_si256(enc(_mm256_load_ps((const float*)in)), _mm256_set1_epi32(cmask));
      int32_t c0 = encode_table_scalar(u2f(in[0]), c), c7 = encode_table_scalar(u2f(in[7]), c);
      if (plain && c0 == c7) {  // the code is monotone in u: all eight lanes have code c0
        if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(got, _mm256_set1_epi32(c0))) == -1) continue;
      }
      alignas(32) int32_t g[8];
      _mm256_store_si256((__m256i*)g, got);  // (already masked)
      for (int j = 0; j < 8; ++j) {
        if (g[j] != encode_table_scalar(u2f(in[j]), c)) {
          if (bad == 0 && first_bad) *first_bad = in[j];
          ++bad;
        }
      }
    }
  }
  return bad;
#else
  return -1;
#endif
}

}  // extern "C"
