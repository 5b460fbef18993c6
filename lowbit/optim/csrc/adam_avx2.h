// The AVX2 step: the scalar step's operations (adam_scalar.h) on 8 lanes, and whole quantized blocks as a
// software pipeline.
//
// Pipe splits a block's work into three stages over its 8-lane vectors:
//   A: decode the moments, update m and v, absmax  (-> raw m, v in a block buffer)
//   B: the parameter update (sqrt, div) from the buffer
//   C: encode the buffer with the new scales
// and one loop does B and C of block b together with A of block b+1, so the long sqrt/div latency of B
// overlaps independent decode/encode work (one block's chain alone stalls the out-of-order window).
// Blocks with a non-finite moment (rare) run the stages one by one with the buffer zeroed where
// non-finite before C. Only whole blocks come here; a partial last block takes the scalar path.
// Measured on Zen 3 at 1 thread (8 x 1M fp32 params): the step is bound by the uop throughput of the
// 8-bit decode (scalar table loads) and encode (~30 uops per 8 lanes either way).
#pragma once
#include "adam_scalar.h"

#ifdef __AVX2__
namespace lowbit {
namespace {  // internal linkage: each library is one translation unit (and GCC inlines more)

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

// fp32 state: the whole vectors of elements [0, n); returns how many were done (the rest: scalar)
template <typename P>
int64_t fp32_chunk_vec(P* p, const P* g, float* m, float* v, int64_t base, int64_t n, const Hyper& h) {
  HyperV H(h);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 mm = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
    __m256 pp = adam_vec(load_p_vec<P>(p + i), load_p_vec<P>(g + i), mm, vv, H, h);
    store_p_vec<P>(p + i, pp, (uint32_t)(base + i), h);
    _mm256_storeu_ps(m + i, mm);
    _mm256_storeu_ps(v + i, vv);
  }
  return i;
}

template <typename P>
struct Pipe {
  const Hyper& h;
  const Formats& A;
  HyperV H;
  P* p;
  const P* g;
  uint8_t* mcodes;
  uint8_t* vcodes;
  float* msc;
  float* vsc;
  int64_t bs;
  alignas(32) float buf[2][2][MAX_BLOCK];  // [ping-pong][m, v]

  Pipe(const Hyper& h_, const Formats& A_, P* p_, const P* g_, uint8_t* mc_, uint8_t* vc_, float* ms_, float* vs_)
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
    const bool clean = _mm256_movemask_ps(st.nan) == 0 && am <= FINITE_MAX && av <= FINITE_MAX;
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
    return _mm256_movemask_ps(st.nan) == 0 && hmax(st.am) <= FINITE_MAX &&
           hmax(st.av) <= FINITE_MAX;
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

}  // namespace
}  // namespace lowbit
#endif
