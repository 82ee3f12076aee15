// Gemv::run_experts (gemv.cuh): the expert GEMV of expertMatmul / siluMulExpertMatmul at decode. The vector
// kernel of gemv.cu serves it (a grid row of blocks per held expert); this file holds its argument checks and
// the scalar fallback for shapes the vector kernel cannot take.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/gemv.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

// Expert-mode fallback: one warp per (row, pair), grid (ceil(N / 8), n_pairs); reads the weights once per pair.
template <typename WT>
__global__ void expert_gemv_scalar_kernel(const float* __restrict__ x, const WT* __restrict__ w, float* __restrict__ y,
                                          const int32_t* __restrict__ experts, int topk, int per_pair_x,
                                          int expert_start, int n_local, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int q = blockIdx.y;
  if (row >= N) return;
  const int local = experts[q] - expert_start;
  float s = 0.f;
  if (local >= 0 && local < n_local) {
    const WT* wr = w + (static_cast<size_t>(local) * N + row) * K;
    const float* xr = x + static_cast<size_t>(per_pair_x ? q : q / topk) * K;
    for (int k = lane; k < K; k += 32) s = fmaf(to_f32(wr[k]), xr[k], s);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  if (lane == 0) y[static_cast<size_t>(q) * N + row] = s;
}

}  // namespace

void Gemv::run_experts(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K,
                       const ExpertRows& ex, bool gated) {
  WEFT_CHECK(T >= 1 && T <= kMaxTokens, "expertMatmul", "the expert GEMV takes 1..", kMaxTokens, " tokens, not ", T);
  WEFT_CHECK(N <= INT32_MAX && K <= INT32_MAX && ex.n_local <= 65535, "expertMatmul", "shape w [", ex.n_local, ", ",
             N, ", ", K, "] is out of range");
  if (N == 0 || ex.n_pairs == 0) return;
  if (K == 0 || ex.n_local == 0) {
    check_cuda(st_, cudaMemsetAsync(y, 0, static_cast<size_t>(ex.n_pairs) * N * sizeof(float), stream_), "matmul");
    return;
  }
  const int n = static_cast<int>(N), k = static_cast<int>(K);
  if (launch_vector(x, w, w_dtype, y, static_cast<int>(T), n, k, &ex, gated, GemvTuning{})) return;
  if (gated)
    WEFT_FAIL("matmul", "the fused siluMul GEMV cannot take K = ", K, " (needs K % ", w_dtype == DType::F32 ? 4 : 8,
              " == 0 and x within shared memory)");
  const dim3 grid((n + 7) / 8, ex.n_pairs);
  WEFT_DISPATCH_FLOAT(w_dtype, W,
                      expert_gemv_scalar_kernel<W><<<grid, 256, 0, stream_>>>(
                          x, static_cast<const W*>(w), y, ex.experts, ex.topk, ex.per_pair_x, ex.expert_start,
                          ex.n_local, n, k));
  check_cuda(st_, cudaGetLastError(), "matmul");
}

}  // namespace weft::cuda
