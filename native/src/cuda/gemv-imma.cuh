// weft::cuda::gemv_one_token_imma: y [1, N] f32 = x [1, K] f32 @ w [N, K]^T for one token with int4 weights (bf16
// scales in groups along K, gemv.cuh QuantMatrix), on the integer tensor cores (gemv-imma.cu). pairs: w is [2N, K] (gate
// rows, then up rows) and y [1, N] = silu(gate) * up, as gemv_one_token_silu_pairs.
#pragma once

#include <cstdint>

#include "cuda/device.h"
#include "cuda/gemv-rows-tma.cuh"  // AddRmsNormInput
#include "tensor.h"  // weft::DType

namespace weft::cuda {

// False (nothing launched) unless w is int4 in groups of a power of two from 128 (K a multiple of the group, from
// 1024), K <= 16384, x and w 16-byte aligned.
// norm: x is the residual row and the GEMV reads addRmsNorm's normed row (gemv-rows-tma.cuh; K <= 4096). Capturable.
bool gemv_one_token_imma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                         int group, float* y, int N, int K, bool pairs, const AddRmsNormInput* norm = nullptr);

}  // namespace weft::cuda
