// Mixture-of-experts helpers. The router is one thread per token: E is small (8 for Mixtral) and the rule is
// moe-route.h's, shared with the CPU so that both backends choose the same experts.
#include "cuda/moe.cuh"
#include "moe-route.h"

namespace weft::cuda {
namespace {

__global__ void route_top_k(const float* __restrict__ logits, const int32_t* __restrict__ rows_in_use, int64_t T,
                            int64_t E, int64_t k, int32_t* __restrict__ experts, float* __restrict__ weights) {
  pdl_trigger();
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= T) return;
  if (rows_in_use && t >= *rows_in_use) route_padding(k, experts + t * k, weights + t * k);
  else route_token(logits + t * E, E, k, experts + t * k, weights + t * k);
}

// One thread per output element; the k products are added in j order, as the CPU does.
__global__ void combine_experts(const float* __restrict__ y, const float* __restrict__ weights, int64_t T, int64_t k,
                                int64_t N, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < T * N; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / N, n = i - t * N;
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += __fmul_rn(weights[t * k + j], y[(t * k + j) * N + n]);
    out[i] = sum;
  }
}

__global__ void scatter_rows(const float* __restrict__ src, const int32_t* __restrict__ rows, int64_t N,
                             float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t row = rows[i];
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) out[row * N + n] = src[i * N + n];
}

}  // namespace

void launch_route_top_k(const Ctx& ctx, const Tensor& logits, const int32_t* rows_in_use, const Tensor& experts,
                        const Tensor& weights) {
  const int64_t T = logits.dim(0);
  if (T == 0) return;
  route_top_k<<<blocks_for(T, 128), 128, 0, ctx.stream>>>(logits.data<float>(), rows_in_use, T, logits.dim(1),
                                                          experts.dim(1), experts.data<int32_t>(),
                                                          weights.data<float>());
  check_launch(ctx, "routeTopK", {{"logits", logits}});
}

void launch_combine_experts(const Ctx& ctx, const Tensor& y, const Tensor& weights, const Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  combine_experts<<<blocks_for(n, 256), 256, 0, ctx.stream>>>(y.data<float>(), weights.data<float>(),
                                                              weights.dim(0), weights.dim(1), y.dim(1),
                                                              out.data<float>());
  check_launch(ctx, "combineExperts", {{"y", y}, {"weights", weights}});
}

void launch_scatter_rows(const Ctx& ctx, const float* src, const int32_t* rows, int64_t R, int64_t N, float* out) {
  if (R == 0 || N == 0) return;
  scatter_rows<<<static_cast<unsigned>(R), 256, 0, ctx.stream>>>(src, rows, N, out);
  check_launch(ctx, "expertMatmul", {});
}

}  // namespace weft::cuda
