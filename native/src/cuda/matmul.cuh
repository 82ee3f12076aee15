// weft::cuda::Matmul: y [T, N] f32 = x [T, K] f32 @ w [N, K]^T (w in f32, f16 or bf16), the backend's matrix
// product: the GEMV kernels for decode (T <= 8, gemv.cuh; bf16 from 3 tokens cuBLAS on split x) and cuBLAS for
// prefill (gemm.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "cuda/gemm.cuh"
#include "cuda/gemv.cuh"
#include "tensor.h"  // weft::DType

namespace weft::cuda {

class Matmul {  // one per engine
 public:
  static constexpr int kGemvMaxTokens = Gemv::kMaxTokens;  // up to this many tokens the GEMV kernels run
  // bf16 weights from 3 tokens take cuBLAS on split x instead (Gemm::run_split) where it pays: measured on H200
  // (bench/kernels/quant-run.sh --split), a Llama-2-7B layer's four products took 0.172-0.174 ms split at every T
  // against the GEMV's 0.131 / 0.149 / 0.183 / 0.187 / 0.230 ms at T = 1 / 2 / 3 / 4 / 8; per shape, the 4096 x 4096
  // projection only from 5 tokens (0.022 against 0.026 ms split at T = 3), the larger ones from 3.
  static constexpr int kSplitGemmFromTokens = 3;
  static bool split_pays(int64_t T, int64_t N, int64_t K) {
    return T >= kSplitGemmFromTokens && T <= kGemvMaxTokens && (T >= 5 || N * K >= (int64_t{1} << 25));
  }

  explicit Matmul(const Ctx& ctx) : gemv_(ctx.st, ctx.stream), gemm_(ctx.st, ctx.stream), stream_(ctx.stream), st_(ctx.st) {}
  // y [T, N] f32 = x [T, K] f32 @ w [N, K]^T. Capturable in a CUDA graph for T <= 8 (no allocation, no sync on
  // that path). Throws weft::Error on failure. gated: x is [T, 2K] ([gate | up] rows) and the product reads
  // silu(gate) * up as it loads x (siluMulMatmul); only where fuses_silu_mul() says so. x_half: x [T, K] already
  // in w's dtype (f16/bf16), which the GEMM (T > 8) reads instead of casting x (x may then be null).
  void run(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K, bool gated = false,
           const void* x_half = nullptr);
  static bool fuses_silu_mul(int64_t T, int64_t K, DType w_dtype) { return Gemv::fuses_silu_mul(T, K, w_dtype); }
  Gemm& gemm() { return gemm_; }  // the kernel benchmark compares run_split with the GEMV
  Gemv& gemv() { return gemv_; }  // the quantized GEMV (gemv-quant.cuh) runs on the same kernel and limits
  // The expert GEMV (Gemv::run_experts), T <= 8 tokens. Capturable.
  void run_experts(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K,
                   const ExpertRows& ex, bool gated = false) {
    gemv_.run_experts(x, w, w_dtype, y, T, N, K, ex, gated);
  }

 private:
  Gemv gemv_;
  Gemm gemm_;
  cudaStream_t stream_;
  DeviceState* st_;
};

}  // namespace weft::cuda
