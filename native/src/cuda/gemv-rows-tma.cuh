// weft::cuda::gemv_rows_tma: y [1, N] f32 = x [1, K] f32 @ dequant(w) [N, K]^T for one token, each block's rows
// streamed into shared memory by bulk asynchronous copies (gemv-rows-tma.cu); gemv_one_token's first choice. w bf16
// (rows of up to 8 KiB: K <= 4096) or int4 with bf16 scales [rows, K / group] (gemv.cuh QuantMatrix; int8 is the
// streaming register kernel's, gemv-rows-tma.cu says why).
// pairs: w is [2N, K] (gate rows, then up rows) and y[f] = silu(gate f) * up f.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "tensor.h"  // weft::DType

namespace weft::cuda {

// The GEMV's input as addRmsNorm makes it from the residual row x and the branch output y [K] (rms-norm.cuh):
// normed = rmsNorm(x + y) * weight. Every block computes it for itself while the weights stream in, and the blocks
// between them also write sum = x + y and normed, so the separate addRmsNorm kernel (and the wait for it) goes.
struct AddRmsNormInput {
  const float* y;      // [K]
  const void* weight;  // [K], bf16 (weight_bf16) or f32
  bool weight_bf16;
  float eps;
  float* sum;     // [K], x + y
  float* normed;  // [K], the GEMV's input
};

// False (nothing launched) where it does not take the call: another dtype, K not a multiple of the 16-byte vector,
// bf16 rows over 8 KiB, int4 rows too long for two stages with x (K > ~19K), a group that is neither K nor a power of two
// of vectors, scales whose 8-row runs (4 for pairs) or N rows are not whole 16-byte units, a norm with K > 4096, misaligned pointers, a GPU before Hopper or with
// less shared memory a block. scales/group: quantized w only (null/0 for bf16). sms: the SM count (one block a SM).
// norm: x is the residual row and the GEMV reads addRmsNorm's normed row (null: x as it is). Capturable.
bool gemv_rows_tma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                   float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput* norm = nullptr);

}  // namespace weft::cuda
