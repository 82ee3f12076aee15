// weft::cuda::Matmul: y [T, N] f32 = x [T, K] f32 @ w [N, K]^T (w in f32, f16 or bf16).
//
// Small T (decode, T <= 8): hand-written GEMV kernels that read each weight byte once for all T tokens
// (matmul.cu). Larger T (prefill): cuBLAS, loaded at run time (cublas-loader.h). See matmul.cu for the design.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../tensor.h"   // weft::DType
#include "cuda/device.h"  // DeviceStatus
namespace weft::cuda {
// The routing of an expert GEMV (expertMatmul at decode): pair q = t * topk + j reads x row q / topk (or q with
// per_pair_x), weights of expert experts[q] - expert_start among n_local, and writes y row q.
struct ExpertRows {
  const int32_t* experts;  // device [n_pairs]
  int n_pairs, topk, per_pair_x, expert_start, n_local;
  DeviceStatus* status;    // where a repeated expert is reported
};
class Matmul {  // one per engine; owns the cuBLAS handle and scratch
 public:
  static constexpr int kGemvMaxTokens = 8;  // up to this many tokens the GEMV kernels run (run_experts: at most)
  explicit Matmul(cudaStream_t stream);
  ~Matmul();
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;
  // y [T, N] f32 = x [T, K] f32 @ w [N, K]^T, w in f32/f16/bf16. Small T: hand-written GEMV kernels; large T: cuBLAS.
  // Capturable in a CUDA graph for T <= 8 (no allocation, no sync on that path). Throws weft::Error on failure.
  // gated: x is [T, 2K] ([gate | up] rows) and the product reads silu(gate) * up as it loads x (siluMulMatmul);
  // only where fuses_silu_mul() says so.
  void run(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K, bool gated = false);
  static bool fuses_silu_mul(int64_t T, int64_t K, DType w_dtype);
  // y [T * topk, N] f32 = per pair, x row @ (expert's w [N, K])^T, for T <= 8 tokens: each chosen expert's
  // weights are read once for all of its pairs; experts nobody chose are not read. Capturable.
  void run_experts(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K,
                   const ExpertRows& ex, bool gated = false);

 private:
  struct Impl;
  Impl* impl_;
};
// Read-only streaming bandwidth of the device in GB/s over a buffer of `bytes`, best of `iterations`.
double measure_read_bandwidth(size_t bytes, int iterations, cudaStream_t stream);
}
