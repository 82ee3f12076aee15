// weft::cuda::gemv_rows_tma: y [1, N] f32 = x [1, K] f32 @ w [N, K]^T for one token and bf16 weights, each block's
// rows streamed into shared memory by bulk asynchronous copies (gemv-rows-tma.cu); gemv_one_token's choice for bf16
// rows of up to 8 KiB (K <= 4096). pairs: w is [2N, K] (gate rows, then up rows) and y[f] = silu(gate f) * up f.
#pragma once

#include <cuda_runtime.h>

#include "cuda/device.h"

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

// False (nothing launched) where it does not take the shape: K not a multiple of 8 or over 4096, misaligned
// pointers, a GPU before Hopper or with less shared memory a block. sms: the SM count (one block a SM). norm:
// x is the residual row and the GEMV reads addRmsNorm's normed row (null: x as it is). Capturable.
bool gemv_rows_tma(const Ctx& ctx, const float* x, const void* w, float* y, int N, int K, bool pairs, int sms,
                   const AddRmsNormInput* norm = nullptr);

}  // namespace weft::cuda
