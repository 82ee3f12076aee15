// weft::cuda::gemv_one_token_mma: y [1, N] f32 = x [1, K] f32 @ dequant(w) [N, K]^T for one token, int4 weights
// (gemv.cuh QuantMatrix's layout, or quant-tiles.h's) dequantized in registers and multiplied on the tensor cores
// (gemv-one-token-mma.cu). gemv_one_token's first choice for int4; it also takes the deferred addRmsNorm
// (gemv-rows-tma.cuh AddRmsNormInput) and SwiGLU pairs, as gemv_rows_tma does.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "cuda/gemv-rows-tma.cuh"  // AddRmsNormInput
#include "cuda/gemv.cuh"           // ExpertRows
#include "tensor.h"                // weft::DType

namespace weft::cuda {

// False (nothing launched) where it does not take the call: not int4, K not a multiple of a chunk (128 columns),
// a group that is not K or a power-of-two multiple of the chunk, x beyond shared memory
// (K > 16384) or beyond what a block may ask for on this GPU, a norm with K > 4096, misaligned pointers. sms: the
// SM count (one block a SM). pairs: w is [2N, K] (gate rows, then up rows) and y[f] = silu(gate f) * up f.
// Capturable (no allocation, no sync).
// Precision: x scaled by a power of two below 2^22 and rounded to an integer (three s8 digits), the weights' codes
// exact in s8 (int4: 16 times the weight), sums exact in s32, then fp32 and scaled per group.
// Whether an int4 or int8 matrix [rows, K] in groups of `group` is held in tiles (quant-tiles.h) on upload: where this
// kernel takes its shape (int4: chunks of 128 columns, a group K or a power-of-two multiple of the chunk; int8: one
// group a row; K <= 16384). Its other
// readers are the tensor-core GEMV of 1..64 tokens (gemv-quant-mma.cu) and the scalar fallback and dequantization
// (gemv-quant.cu); gemv.cu's vector kernel, the streaming and bulk-copy one-token kernels refuse tiles.
bool quant_tiles_pay(DType dtype, int64_t rows, int64_t K, int64_t group);

// tiles: w and scales are in quant-tiles.h's layout (refused where it does not take the shape, or pairs with N not a
// multiple of 8). gated: x is [1, 2K] ([gate | up]) and the product reads silu(gate) * up (not with pairs or a norm).
bool gemv_one_token_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                        int group, float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput* norm = nullptr,
                        bool tiles = false, bool gated = false);

// 2..8 tokens (int4, int8; no norm): the same kernel with x's tokens as B's columns, in f16 (a token scaled by a power
// of two only where one of its values passes f16's range), y [T, N] (pairs: [T, N] of silu(gate) * up); x [T, K]
// ([T, 2K] gated). False where it does not take the call, as above, or where T tokens of x and the partial sums
// (8 a row) pass what a block may ask for even with K in 4 runs (x staged a run at a time: at 8 tokens K 11008 in
// one run, 14336 in two).
bool gemv_tokens_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                     float* y, int T, int N, int K, bool pairs, int sms, bool tiles = false, bool gated = false);

// Experts (expertMatmul / siluMulExpertMatmul at any T, int4 or int8 stacked experts [n_local][N][K], row-major or
// in tiles of n_local N rows with N a multiple of 16): the same kernel, a block row of the grid an expert; an
// expert's B columns are the pairs routed to it (at one token x's hi and lo, as gemv_one_token_mma; from 2 tokens in
// f16, as gemv_tokens_mma), up to 8 of them a pass over its weights (an expert more pairs chose takes further passes
// in the same block), y [n_pairs, N] with the rows of pairs routed to experts w does not hold zero.
// gated: x rows [gate | up] (2K). False where it does not take the call (as above; ex.n_pairs must be T * ex.topk).
bool gemv_experts_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                      int group, float* y, int T, int N, int K, const ExpertRows& ex, int sms, bool gated = false,
                      bool tiles = false);

}  // namespace weft::cuda
