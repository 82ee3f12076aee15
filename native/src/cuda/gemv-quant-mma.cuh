// weft::cuda quantized GEMV on tensor cores (gemv-quant-mma.cu): y [T, N] f32 = x [T, K] f32 @ dequant(w)^T for
// 1..64 tokens a pass, the weights dequantized in registers into f16 (exact: int8 and int4 values are small integers) and
// multiplied with mma.sync m16n8k16 against x rounded to f16, fp32 accumulation, the (row, group) scales applied
// to fp32 sums (or, for groups smaller than a chunk, to the f16 weights). quant_gemv (gemv-quant.cuh) calls it first; it reads the checkpoint's layout as it is (no repack).
#pragma once

#include <cuda_runtime.h>

#include "cuda/device.h"
#include "cuda/gemv.cuh"  // QuantMatrix

namespace weft::cuda {

constexpr int kQuantMmaMaxTokens = 64;

// How the kernel is launched; the defaults are weft's. Only the benchmark (bench/kernels/quant-bench.cu) passes
// others, to compare.
struct QuantMmaTuning {
  int cluster = 0;  // K splits per thread-block cluster: 1, 2, 4 or 8; 0: chosen from the shape
  int depth = 0;    // 64-byte row chunks each warp keeps in flight: 4 or 8; 0: 8 (4 for 9..16 tokens; small groups 8).
                    // 17..32 tokens always 4 items of two 16-row tiles, 33..64 always 6 (their accumulators leave
                    // no registers for more)
  bool pdl = true;  // launch as a programmatic dependent of the kernel before (common.cuh)
};

// Whether the kernel takes the shape: int8 or int4, the group a multiple of a lane's 16-byte vector (16 int8 or
// 32 int4 columns) and K a multiple of the group, 1..64 tokens, 16-byte aligned w, and x's K slice within shared
// memory (quant_gemv_mma also needs x 16-byte aligned). Shapes it refuses take gemv.cu's kernels (quant_gemv).
// Groups of a whole chunk or more (int8 per channel, % 64; int4 % 128) scale fp32 sums up to 16 tokens; smaller ones,
// and every group from 17 tokens, scale the f16 weights before the mma (each weight rounded to f16 once more: relative 2^-11; dequantized weights below 2^-14
// in magnitude, i.e. scales below ~6e-5, are f16 subnormals: absolute error <= 2^-25).
bool quant_gemv_mma_takes(const QuantMatrix& w, int T, int N, int K, const QuantMmaTuning& tuning = QuantMmaTuning{});

// y [T, N] = x @ dequant(w)^T (gated: x is [T, 2K] [gate | up] rows and the product reads silu(gate) * up), or
// false (nothing launched) where quant_gemv_mma_takes says no. Capturable (no allocation, no sync).
// Precision: x is rounded to f16 (relative 2^-11, like the dense GEMM's tensor-core inputs; products are exact in
// the fp32 accumulator). A block whose x slice holds a value beyond f16's range (|x| > 65504) scales each token's
// x by a power of two into range and the result back (exact); values below 2^-14 lose relative precision as f16
// subnormals (absolute error <= 2^-25, negligible against the row's other terms).
bool quant_gemv_mma(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated,
                    const QuantMmaTuning& tuning = QuantMmaTuning{});

// The same for any T, in passes (each reading w again) of the most tokens whose x slice fits (64, 32 or 16), the
// tokens shared evenly between them; false (nothing launched) where none fits.
bool quant_gemv_mma_passes(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                           bool gated);

}  // namespace weft::cuda
