// Per row: max (fp32), sum of expf(x - max) in double, log in double, as the CPU's log_sum_exp.
#include "cuda/softmax.cuh"

namespace weft::cuda {
namespace {

constexpr int kRowThreads = 512;

// Block-wide max and log(sum(exp(x - max))) of one row; every thread gets both.
__device__ void row_log_sum_exp(const float* __restrict__ row, int64_t V, float* max_out, float* log_sum_out) {
  __shared__ float smax[kRowThreads / 32];
  __shared__ double ssum[kRowThreads / 32];
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
  m = warp_max(m);
  if (lane == 0) smax[warp] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, smax[w]);
  double sum = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - m);
  sum = warp_sum(sum);
  if (lane == 0) ssum[warp] = sum;
  __syncthreads();
  sum = 0;
  for (int w = 0; w < warps; ++w) sum += ssum[w];
  *max_out = m;
  *log_sum_out = static_cast<float>(log(sum));
}

__global__ void log_softmax(const float* __restrict__ logits, float* __restrict__ out, int64_t V) {
  const float* row = logits + blockIdx.x * V;
  float m, log_sum;
  row_log_sum_exp(row, V, &m, &log_sum);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[blockIdx.x * V + v] = (row[v] - m) - log_sum;
}

__global__ void logprobs(const float* __restrict__ logits, const int32_t* __restrict__ ids, float* __restrict__ out,
                         int64_t V) {
  const float* row = logits + blockIdx.x * V;
  float m, log_sum;
  row_log_sum_exp(row, V, &m, &log_sum);
  if (threadIdx.x == 0) out[blockIdx.x] = (row[ids[blockIdx.x]] - m) - log_sum;
}

}  // namespace

void launch_log_softmax(const Ctx& ctx, const Tensor& logits, const Tensor& out) {
  if (logits.dim(0) == 0 || logits.dim(1) == 0) return;
  log_softmax<<<static_cast<unsigned>(logits.dim(0)), kRowThreads, 0, ctx.stream>>>(logits.data<float>(),
                                                                                   out.data<float>(), logits.dim(1));
  check_launch(ctx, "logSoftmax", {{"logits", logits}});
}

void launch_logprobs(const Ctx& ctx, const Tensor& logits, const Tensor& ids, const Tensor& out) {
  if (logits.dim(0) == 0) return;
  logprobs<<<static_cast<unsigned>(logits.dim(0)), kRowThreads, 0, ctx.stream>>>(
      logits.data<float>(), ids.data<int32_t>(), out.data<float>(), logits.dim(1));
  check_launch(ctx, "logprobs", {{"logits", logits}});
}

}  // namespace weft::cuda
