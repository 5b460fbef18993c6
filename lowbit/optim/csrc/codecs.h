// The state formats' codecs, each once: decode (code -> value) and exact nearest-code encode, in scalar
// and AVX2 form.
//
// 8-bit and 4-bit maps: the reference encode is the cell table (lowbit.quant.blockwise.encode_cell_table:
// one gather, exact). The vector path avoids the gather with an arithmetic encode proved against the
// table: 4-bit maps count the 15 midpoint thresholds <= x in two levels of compares (Fast4, exact by
// construction); 8-bit dynamic maps, whose positive values form <= 7 decades of near-linear grids, take
// code = floor(|x| * S[r] + B[r]) with the decade r = #{decade boundaries <= |x|} (Fast8). Lanes whose
// t lies within delta of an integer (and exact midpoint ties on the negative side) are flagged, and
// flagged vectors are re-encoded with the table. S, B and delta are built from the map at every call
// and checked at every code boundary (build_fast8); a map that fails the check keeps the table encode.
// fp8 (e4m3fn): decode and encode by bit manipulation.
#pragma once
#include "common.h"

namespace lowbit {
namespace {  // internal linkage: each library is one translation unit (and GCC inlines more)

struct Codec {
  const float* qmap;      // decode table (256 entries, or 16 for 4-bit)
  const int32_t* table;   // encode cell table
  int32_t a_lo, a_hi, shift, ncells;
};

// Exact arithmetic encode of a dynamic 8-bit map (see the header); ok = 0: use the table.
struct Fast8 {
  int ok = 0, sgn = 0, z = 0;
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

// ---------------------------------------------------------------- building the arithmetic encodes
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

inline void build_fast8(const float* q, Fast8& E) {
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

// ---------------------------------------------------------------- scalar codecs
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

inline float decode_scalar(const uint8_t* codes, int64_t i, const float* qmap, bool four) {
  int c = four ? (codes[i >> 1] >> ((i & 1) * 4)) & 15 : codes[i];
  return qmap[c];
}

#ifdef __AVX2__
// ---------------------------------------------------------------- AVX2 codecs
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
  if (__builtin_expect(!_mm256_testz_si256(bad, bad), 0)) return encode_table_vec(x, c);
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
inline __attribute__((noinline, cold)) void reencode8(const float* buf, int64_t n, __m256 inv, uint8_t* codes, const Fast8& E,
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
#endif

// The codecs of one call: the maps' tables and, where they apply, their arithmetic encodes.
struct Formats {
  int mode;
  int64_t block_size;
  const Codec* cm;
  const Codec* cv;
  const Fast8* f8m;  // null: table encode
  const Fast8* f8v;
  const Fast4* f4m;
  const Fast4* f4v;
  bool fp8_arith;  // arithmetic e4m3 decode (else the 256-entry decode table)
};

}  // namespace
}  // namespace lowbit
