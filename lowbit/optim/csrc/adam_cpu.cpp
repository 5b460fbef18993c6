// Fused Adam / AdamW step with blockwise-quantized states, CPU (OpenMP + AVX2), behind a plain C ABI.
//
// One call updates every parameter of one (param dtype, state format) bucket of a param group, in exactly
// the operations of lowbit.optim._torch_step (fp32, no FMA contraction: built with -ffp-contract=off).
// The parts, each once:
//   abi.h         the argument struct, flag bits and modes shared with lowbit/optim/_cpu_kernel.py
//   common.h      constants, hyper-parameters, loading and storing fp32 / bf16 parameters
//   codecs.h      the state formats: decode and exact nearest-code encode (scalar and AVX2)
//   adam_scalar.h the scalar step (the reference form; partial blocks, CPUs without AVX2)
//   adam_avx2.h   the same on 8 lanes, whole blocks as a software pipeline
//   rank1.h       4-bit state with a rank-1 normalized second moment (two passes per parameter)
//   driver.h      argument checks, tasks of whole blocks on OpenMP threads
#include "driver.h"

extern "C" {

int lowbit_adam_step(const lowbit_step_args* args) { return lowbit::adam_step(*args, lowbit::Variant{}); }

int64_t lowbit_step_args_size() { return (int64_t)sizeof(lowbit_step_args); }

}  // extern "C"
