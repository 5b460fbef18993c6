// One call of the step: check the arguments, build the codecs, cut the parameters into tasks of whole
// blocks and run them on OpenMP threads. Blocks are independent, so results do not depend on threading.
#pragma once
#include <vector>

#include "adam_avx2.h"
#include "adam_scalar.h"
#include "rank1.h"

namespace lowbit {
namespace {  // internal linkage: each library is one translation unit (and GCC inlines more)

// Which implementation runs. lowbit_adam_step always uses the default (the fastest exact one); the test
// library (tests/optim/csrc/kernel_testing.cpp) selects the others to prove them equal.
struct Variant {
  bool scalar_only = false;   // the scalar step everywhere (no AVX2 lanes)
  bool table_encode = false;  // 8-bit / 4-bit codes by the cell-table gather (no arithmetic encode)
  bool all_unsure = false;    // every lane of the 8-bit arithmetic encode goes through the table re-encode
};

template <typename P>
void run_task(int64_t b0, int64_t b1, int64_t numel, void* pp, void* gp, void* mp, float* msp, void* vp, float* vsp,
              const Hyper& h, const Formats& A, bool scalar_only) {
  P* p = (P*)pp;
  const P* g = (const P*)gp;
  const int64_t bs = A.block_size;
#ifdef __AVX2__
  if (!scalar_only) {
    if (A.mode == FP32) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * bs, n = std::min(bs, numel - s);
        const int64_t done = fp32_chunk_vec<P>(p + s, g + s, (float*)mp + s, (float*)vp + s, s, n, h);
        fp32_chunk_scalar<P>(p + s + done, g + s + done, (float*)mp + s + done, (float*)vp + s + done, s + done,
                             n - done, h);
      }
      return;
    }
    const int64_t full_end = std::min(b1, numel / bs);  // whole blocks through the pipeline
    if (full_end > b0) {
      Pipe<P> pipe(h, A, p, g, (uint8_t*)mp, (uint8_t*)vp, msp, vsp);
      pipe.run(b0, full_end);
      b0 = full_end;
    }
  }
#endif
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * bs, n = std::min(bs, numel - s);
    if (A.mode == FP32) {
      fp32_chunk_scalar<P>(p + s, g + s, (float*)mp + s, (float*)vp + s, s, n, h);
    } else {
      const int64_t c = A.mode == Q4 ? s / 2 : s;  // first code byte of the block
      quant_block_scalar<P>(p + s, g + s, (uint8_t*)mp + c, msp + b, (uint8_t*)vp + c, vsp + b, s, n, h, A);
    }
  }
}

inline int adam_step(const lowbit_step_args& a, const Variant& var) {
  const int64_t bs = a.block_size;
  if (bs <= 0 || bs > MAX_BLOCK || bs % 8 != 0) return -1;
  if (a.mode < FP32 || a.mode > Q4_RANK1) return -2;
  Codec cm{a.qmap_m, a.table_m, 0, 0, 1, 0}, cv{a.qmap_v, a.table_v, 0, 0, 1, 0};
  if (a.mode == Q8 || a.mode == Q4 || a.mode == Q4_RANK1) {
    cm = Codec{a.qmap_m, a.table_m, a.meta_m[0], a.meta_m[1], a.meta_m[2], a.meta_m[3]};
    cv = Codec{a.qmap_v, a.table_v, a.meta_v[0], a.meta_v[1], a.meta_v[2], a.meta_v[3]};
  }
  Fast8 f8m, f8v;
  Fast4 f4m, f4v;
  const bool arith = !var.table_encode;
  if (a.mode == Q8 && arith) {
    build_fast8(a.qmap_m, f8m);
    build_fast8(a.qmap_v, f8v);
    if (var.all_unsure) {  // t +- 1/2 always straddles an integer
      f8m.delta = 0.5f;
      f8v.delta = 0.5f;
    }
  }
  if (a.mode == Q4 && arith) {
    build_fast4(a.qmap_m, f4m);
    build_fast4(a.qmap_v, f4v);
  }
  const Formats F{a.mode, bs, &cm, &cv, f8m.ok ? &f8m : nullptr, f8v.ok ? &f8v : nullptr,
                  a.mode == Q4 && arith ? &f4m : nullptr, a.mode == Q4 && arith ? &f4v : nullptr,
                  a.mode == FP8 && arith};
  std::vector<Hyper> hs(a.n_params);
  for (int64_t j = 0; j < a.n_params; ++j) {
    const float* r = a.hyper + 9 * j;
    hs[j] = Hyper{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], a.seeds[j],
                  (a.flags & LOWBIT_MAXIMIZE) != 0, (a.flags & LOWBIT_COUPLED) != 0,
                  (a.flags & LOWBIT_STOCHASTIC_ROUND) != 0};
  }
  if (a.mode == Q4_RANK1) {  // one parameter at a time, each on all threads
    for (int64_t j = 0; j < a.n_params; ++j) {
      if (a.cols[j] <= 0 || a.numels[j] % a.cols[j] != 0) return -3;
      if (a.param_bf16)
        rank1_param<uint16_t>((uint16_t*)a.params[j], (const uint16_t*)a.grads[j], (uint8_t*)a.m_data[j],
                              a.m_scale[j], (uint8_t*)a.v_data[j], a.v_row[j], a.v_col[j], a.numels[j], a.cols[j],
                              hs[j], F, std::max(1, a.num_threads));
      else
        rank1_param<float>((float*)a.params[j], (const float*)a.grads[j], (uint8_t*)a.m_data[j], a.m_scale[j],
                           (uint8_t*)a.v_data[j], a.v_row[j], a.v_col[j], a.numels[j], a.cols[j], hs[j], F,
                           std::max(1, a.num_threads));
    }
    return 0;
  }
  // tasks of whole blocks, about 16K elements each
  const int64_t per_task = std::max<int64_t>(1, 16384 / bs);
  struct Task { int64_t j, b0, b1; };
  std::vector<Task> tasks;
  for (int64_t j = 0; j < a.n_params; ++j) {
    const int64_t nb = (a.numels[j] + bs - 1) / bs;
    for (int64_t b = 0; b < nb; b += per_task) tasks.push_back({j, b, std::min(nb, b + per_task)});
  }
  const int64_t nt = (int64_t)tasks.size();
  const int threads = std::max(1, std::min<int>(a.num_threads, (int)nt));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < nt; ++t) {
    const Task& k = tasks[t];
    const int64_t j = k.j;
    float* ms = a.m_scale ? a.m_scale[j] : nullptr;
    float* vs = a.v_scale ? a.v_scale[j] : nullptr;
    if (a.param_bf16)
      run_task<uint16_t>(k.b0, k.b1, a.numels[j], a.params[j], a.grads[j], a.m_data[j], ms, a.v_data[j], vs, hs[j], F,
                         var.scalar_only);
    else
      run_task<float>(k.b0, k.b1, a.numels[j], a.params[j], a.grads[j], a.m_data[j], ms, a.v_data[j], vs, hs[j], F,
                      var.scalar_only);
  }
  return 0;
}

}  // namespace
}  // namespace lowbit
