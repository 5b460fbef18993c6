// The C ABI of the fused CPU step: one struct of arguments, named flag bits and state modes.
//
// lowbit/optim/_cpu_kernel.py reads the enum values below from this file and mirrors the struct as a
// ctypes.Structure (checked against lowbit_step_args_size() when the library loads): edit both together.
#pragma once
#include <cstdint>

// How the moments are stored (lowbit.optim.formats.StateFormat.mode).
enum lowbit_mode {
  LOWBIT_MODE_FP32 = 0,  // fp32 tensors with the parameter's shape (small parameters)
  LOWBIT_MODE_Q8 = 1,    // 8-bit dynamic-tree codes + fp32 block scales
  LOWBIT_MODE_Q4 = 2,    // 4-bit codes, two per byte + fp32 block scales
  LOWBIT_MODE_FP8 = 3,   // e4m3 codes of m and sqrt(v) + fp32 block scales
  LOWBIT_MODE_Q4_RANK1 = 4,  // 2-D parameters: m as Q4; v's 4-bit codes scaled by min(row max, column max)
};

// Bits of lowbit_step_args.flags.
enum lowbit_step_flag {
  LOWBIT_MAXIMIZE = 1,          // step along +gradient
  LOWBIT_COUPLED = 2,           // Adam's weight decay (added to the gradient); else AdamW's (decay)
  LOWBIT_STOCHASTIC_ROUND = 4,  // bf16 parameters: round the fp32 update stochastically
};

// One call updates n_params parameters of one dtype and one state mode. Per-parameter arrays have
// n_params entries; scale arrays and codec tables are unused (may be null) for LOWBIT_MODE_FP32.
struct lowbit_step_args {
  int64_t n_params;
  int32_t mode;         // lowbit_mode
  int32_t param_bf16;   // 1: parameters and gradients are bf16, 0: fp32
  int64_t block_size;   // elements per quantization block (a multiple of 8, at most 8192)
  void** params;        // parameter data, updated in place
  void** grads;         // gradient data (same dtype as the parameters)
  void** m_data;        // first moment: codes, or fp32 values
  float** m_scale;      // first moment: fp32 block scales
  void** v_data;        // second moment (fp8: sqrt(v)): codes, or fp32 values
  float** v_scale;
  const int64_t* numels;
  const float* hyper;     // [n_params, 9] fp32: b1, 1-b1, b2, 1-b2, eps, step_size, 1/sqrt(bc2), decay, wd
  const uint32_t* seeds;  // stochastic rounding seed per parameter
  const float* qmap_m;    // codebooks (256 or 16 fp32 values) ...
  const float* qmap_v;
  const int32_t* table_m;  // ... and their encode cell tables (lowbit.quant.blockwise.encode_cell_table) ...
  const int32_t* table_v;
  const int32_t* meta_m;  // ... with a_lo, a_hi, shift, ncells
  const int32_t* meta_v;
  float** v_row;  // LOWBIT_MODE_Q4_RANK1: v's row and column scales ([rows], [cols] fp32; v_scale unused)
  float** v_col;
  const int64_t* cols;  // LOWBIT_MODE_Q4_RANK1: columns per parameter (rows = numel / cols)
  int32_t flags;  // lowbit_step_flag bits
  int32_t num_threads;
};

extern "C" {
// 0 on success, a negative number for bad arguments.
int lowbit_adam_step(const lowbit_step_args* args);
int64_t lowbit_step_args_size();
}
