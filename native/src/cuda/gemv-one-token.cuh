// weft::cuda::gemv_one_token: y [1, N] f32 = x [1, K] f32 @ w [N, K]^T for one token (decode at batch 1), w bf16,
// int8 or int4 with bf16 scales per group (gemv.cuh QuantMatrix), the weights loaded straight into registers
// (gemv-one-token.cu). Gemv::run (bf16) and quant_gemv (int8, int4) call it first for one token.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "cuda/gemv-rows-tma.cuh"  // AddRmsNormInput
#include "cuda/gemv.cuh"           // ExpertRows, QuantMatrix
#include "tensor.h"  // weft::DType

namespace weft::cuda {

// Which kernel runs (gemv-one-token.cu). Weft: weft's choice (int4 in groups of 128 multiples on tensor cores,
// gemv-one-token-mma.cu; bf16 rows of up to 8 KiB and other int4 rows gemv-rows-tma.cu's where it takes them, other
// bf16 batched, int8 and other int4 streaming); Rows: the bulk-copy rows where they take the shape, then as Weft
// without tensor cores; Mma: the tensor-core kernel alone (false where it refuses). The others only for
// the benchmarks (bench/kernels/quant-bench.cu, gemv-layer-bench.cu), to compare.
enum class OneTokenKernel { Weft, Batched, Streaming, Rows, Mma };
struct OneTokenTuning {
  OneTokenKernel kernel = OneTokenKernel::Weft;
  int rows = 0;  // streaming: rows a task, 1, 2 or 4 (ring depth 16, 8, 4); 0: 2
};

// w: bf16 [N, K] (scales null), int8 [N, K] or int4 [N, K / 2] (QuantMatrix's codes) with scales [N, K / group].
// gated: x is [1, 2K] ([gate | up]) and the product reads silu(gate) * up. False (nothing launched) when the kernel
// does not take the call: another dtype, K not a multiple of the 16-byte vector or of the group, an int4 group
// other than K or a power of two of whole vectors (int8 in such groups: the batched kernel), x beyond its buffer
// (K > 16384), misaligned pointers.
// tiles: int4 in tiles (quant-tiles.h), which only the tensor-core kernel reads (false where it refuses the call).
// Capturable (no allocation, no sync).
bool gemv_one_token(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                    float* y, int N, int K, bool gated, const OneTokenTuning& tuning = OneTokenTuning{},
                    bool tiles = false);

// y [1, F] = silu(x @ w[:F]^T) * (x @ w[F:]^T) for w [2F, K] (gate rows, then up rows; dtypes and scales as above):
// one warp sums gate row f and up row F + f side by side and stores their SwiGLU product (matmulSiluMul), so the
// down projection reads a finished x instead of every block recomputing silu(gate) * up over 2F inputs (on H200,
// Llama-2-7B's w2 GEMV took 30.0 us gated and 25.1 us plain). Each sum equals gemv_one_token's for that row.
// False where gemv_one_token would be.
bool gemv_one_token_silu_pairs(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                               int group, float* y, int F, int K, const OneTokenTuning& tuning = OneTokenTuning{},
                               bool tiles = false);

// gemv_one_token (pairs: gemv_one_token_silu_pairs) of the deferred addRmsNorm's normed row (gemv-rows-tma.cuh
// AddRmsNormInput; x is its residual row), on the kernel gemv_one_token picks, which makes the norm itself: int4
// and tiles on tensor cores (gemv-one-token-mma.cuh), else rows by bulk copies. False (nothing launched) where
// neither takes it.
bool gemv_one_token_normed(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                           int group, float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput& norm,
                           bool tiles = false);

// 2..8 tokens of int4 or int8 on the one-token tensor-core kernel (gemv-one-token-mma.cuh gemv_tokens_mma): y [T, N]
// (pairs: w [2F, K], y [T, F] of silu(gate) * up). False where it does not take the call.
bool gemv_tokens(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                 float* y, int T, int N, int K, bool gated, bool pairs, bool tiles);

// int4 or int8 stacked experts [n_local][N][K] (row-major, or tiles of El N rows) on the same kernel, up to 8 of an
// expert's pairs a pass (gemv-one-token-mma.cuh gemv_experts_mma): y [T topk, N], a row a (token, expert) pair. False where it does not
// take the call.
bool gemv_experts(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                  const ExpertRows& ex, bool gated);

}  // namespace weft::cuda
