// weft::cuda quantized weights (backend.h upload_quantized): y [T, N] f32 = x [T, K] f32 @ dequant(w)^T for
// T <= 16 tokens (decode, small batches and speculative verification widths) with the dequantization inside the
// GEMV (gemv-quant.cu), and a dequantization into a bf16 matrix for the cuBLAS GEMM of longer steps.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "cuda/gemv.cuh"  // Gemv, ExpertRows, QuantMatrix
#include "tensor.h"  // weft::DType

namespace weft::cuda {

constexpr int kQuantGemvMaxTokens = 16;
// Decode steps of quantized experts up to this many tokens stay on the device (quant_expert_gemv; capturable).
constexpr int kQuantExpertGemvMaxTokens = 64;

// y [T, N] = x @ dequant(w)^T, 1 <= T <= 16; gated: x is [T, 2K] ([gate | up] rows) and the product reads
// silu(gate) * up as it stages x. The tensor-core kernel runs it where it takes the shape (quant_gemv_mma,
// gemv-quant-mma.cuh: groups of whole 16-byte vectors; x rounded to f16); otherwise gemv's vector kernel
// (Gemv::run_quant: a ring of asynchronous copies, K split over a cluster, the weights requested before the kernel
// before ends), 9..16 tokens in two passes; shapes it refuses take a scalar kernel. Capturable (no allocation, no
// sync). Throws weft::Error.
// path: Auto (weft's choice); for the benchmark: Legacy (what ran before the tensor-core kernel: gemv_one_token for
// one int8 token, else gemv.cu's kernel), Ring (gemv.cu's kernel where gemv_one_token would run), Mma (the
// tensor-core kernel, Legacy where it refuses).
enum class QuantGemvPath { Auto, Ring, Legacy, Mma };
void quant_gemv(const Ctx& ctx, Gemv& gemv, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                bool gated, QuantGemvPath path = QuantGemvPath::Auto);

// The expert GEMV of expertMatmul / siluMulExpertMatmul over quantized experts w [El, N, K] (QuantMatrix of the
// first expert; experts follow each other), 1 <= T <= kQuantExpertGemvMaxTokens: y [n_pairs, N], each chosen expert's
// weights read once for every 8 of its pairs (the one-token tensor-core kernel; the formats it refuses take gemv.cu's
// vector kernel in passes of 8 tokens), rows of pairs routed to experts not in w zero. Capturable.
void quant_expert_gemv(const Ctx& ctx, Gemv& gemv, const float* x, const QuantMatrix& w, float* y, int T, int N,
                       int K, const ExpertRows& ex, bool gated);

// out [N, K] bf16 = dequant(w) (q * scale in fp32, rounded to nearest even): the GEMM's weight for T > 16.
void dequantize_bf16(const Ctx& ctx, const QuantMatrix& w, void* out, int64_t N, int64_t K);

}  // namespace weft::cuda
