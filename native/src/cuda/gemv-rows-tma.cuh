// weft::cuda::gemv_rows_tma: y [1, N] f32 = x [1, K] f32 @ w [N, K]^T for one token and bf16 weights, each block's
// rows streamed into shared memory by bulk asynchronous copies (gemv-rows-tma.cu); gemv_one_token's choice for bf16
// rows of up to 8 KiB (K <= 4096). pairs: w is [2N, K] (gate rows, then up rows) and y[f] = silu(gate f) * up f.
#pragma once

#include <cuda_runtime.h>

#include "cuda/device.h"

namespace weft::cuda {

// False (nothing launched) where it does not take the shape: K not a multiple of 8 or over 4096, misaligned
// pointers, a GPU before Hopper or with less shared memory a block. sms: the SM count (one block a SM). Capturable.
bool gemv_rows_tma(const Ctx& ctx, const float* x, const void* w, float* y, int N, int K, bool pairs, int sms);

}  // namespace weft::cuda
