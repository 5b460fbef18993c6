// Test-only entry points of the CPU step (built into a separate library by tests/optim/kernel_testing.py,
// never into lowbit's): the step's other implementations, and the arithmetic encodes checked against the
// cell table over ranges of fp32 bit patterns.
#include "driver.h"

using namespace lowbit;

extern "C" {

int lowbit_test_adam_step(const lowbit_step_args* args, int scalar_only, int table_encode, int all_unsure) {
  Variant v;
  v.scalar_only = scalar_only != 0;
  v.table_encode = table_encode != 0;
  v.all_unsure = all_unsure != 0;
  return adam_step(*args, v);
}

int64_t lowbit_test_step_args_size() { return (int64_t)sizeof(lowbit_step_args); }

// Compare the arithmetic encode (8-bit or 4-bit map qmap) with the cell-table encode on every finite fp32
// bit pattern u in [u_lo, u_hi) and its negative. Returns the number of mismatches (the first in
// *first_bad), or -1 if the map has no arithmetic encode. no_fallback (8-bit): skip the table re-encode
// of the unsure lanes, a broken encode the check must catch.
int64_t lowbit_encode_check(int bits, const float* qmap, const int32_t* tab, const int32_t* meta, uint32_t u_lo,
                            uint32_t u_hi, int no_fallback, uint32_t* first_bad) {
#if defined(__AVX2__) && defined(__FMA__)
  Codec c{qmap, tab, meta[0], meta[1], meta[2], meta[3]};
  Fast8 f8;
  Fast4 f4;
  if (bits == 8) {
    build_fast8(qmap, f8);
    if (!f8.ok) return -1;
  } else {
    build_fast4(qmap, f4);
  }
  int64_t bad = 0;
  const int32_t cmask = bits == 8 ? 255 : 15;
  auto enc = [&](__m256 x) {
    if (bits != 8) return encode_fast4_vec(x, f4);
    if (!no_fallback) return encode8_checked(x, f8, c);
    __m256i unsure = _mm256_setzero_si256();
    return encode_fast8_vec(x, f8, unsure);
  };
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
