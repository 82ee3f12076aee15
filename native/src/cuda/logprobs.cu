// topLogprobs, one block per asked-for row: the row's max and log-sum-exp (as logSoftmax: max in fp32, the sum
// of expf(x - max) in double), then k passes that each find the next candidate in the order (logit descending,
// id ascending) below the previous one. k + 2 reads of the row: the op runs only for rows that ask for log-probs,
// and k is at most 20, so a pass per alternative costs less than a sort of the vocabulary.
#include "cuda/logprobs.cuh"

namespace weft::cuda {
namespace {

constexpr int kThreads = 256;

// A candidate: its logit and id (-1: none). `a` comes before `b` in the order.
struct Candidate {
  float value;
  int32_t id;
};
__device__ __forceinline__ bool before(Candidate a, Candidate b) {
  if (a.id < 0) return false;
  if (b.id < 0) return true;
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

__device__ __forceinline__ Candidate warp_first(Candidate c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Candidate other{__shfl_xor_sync(0xffffffffu, c.value, o), __shfl_xor_sync(0xffffffffu, c.id, o)};
    if (before(other, c)) c = other;
  }
  return c;
}

// The first candidate of the block (blockDim.x a multiple of 32); every thread gets it.
__device__ Candidate block_first(Candidate c) {
  __shared__ Candidate partial[kThreads / 32];
  __shared__ Candidate first;
  c = warp_first(c);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x < 32) {
    Candidate w = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : Candidate{0.0f, -1};
    w = warp_first(w);
    if (threadIdx.x == 0) first = w;
  }
  __syncthreads();
  Candidate result = first;
  __syncthreads();  // `first` and `partial` are reused by the next call
  return result;
}

__device__ float block_max(float v) {
  __shared__ float partial[kThreads / 32];
  __shared__ float total;
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : -INFINITY;
    w = warp_max(w);
    if (threadIdx.x == 0) total = w;
  }
  __syncthreads();
  return total;
}

__global__ void top_logprobs(const float* __restrict__ logits, const int32_t* __restrict__ rows,
                             const int32_t* __restrict__ ids, float* __restrict__ out, int64_t R, int64_t V, int k) {
  float* o = out + blockIdx.x * static_cast<int64_t>(1 + 2 * k);
  const int32_t r = rows[blockIdx.x];
  if (r < 0 || r >= R) {
    for (int j = threadIdx.x; j < 1 + 2 * k; j += blockDim.x) o[j] = NAN;
    return;
  }
  const float* row = logits + r * V;
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
  m = block_max(m);
  double sum = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - m);
  const float log_sum = static_cast<float>(log(block_sum(sum)));
  if (threadIdx.x == 0) {
    const int32_t id = ids[r];
    o[0] = id >= 0 && id < V ? (row[id] - m) - log_sum : NAN;
  }
  Candidate previous{0.0f, -1};  // none yet: every candidate comes after it
  for (int j = 0; j < k; ++j) {
    Candidate best{0.0f, -1};
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const Candidate c{row[v], static_cast<int32_t>(v)};
      if (isnan(c.value) || (previous.id >= 0 && !before(previous, c))) continue;
      if (before(c, best)) best = c;
    }
    best = block_first(best);
    if (threadIdx.x == 0) {
      o[1 + j] = static_cast<float>(best.id);
      o[1 + k + j] = best.id >= 0 ? (best.value - m) - log_sum : -INFINITY;
    }
    previous = best;
    if (best.id < 0) previous = Candidate{-INFINITY, static_cast<int32_t>(V)};  // none left: none after it either
  }
}

}  // namespace

void launch_top_logprobs(const Ctx& ctx, const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k,
                         const Tensor& out) {
  if (rows.dim(0) == 0) return;
  top_logprobs<<<static_cast<unsigned>(rows.dim(0)), kThreads, 0, ctx.stream>>>(
      logits.data<float>(), rows.data<int32_t>(), ids.data<int32_t>(), out.data<float>(), logits.dim(0),
      logits.dim(1), static_cast<int>(k));
  check_launch(ctx, "topLogprobs", {{"logits", logits}, {"rows", rows}});
}

}  // namespace weft::cuda
