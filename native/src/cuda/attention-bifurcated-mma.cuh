// The bifurcated kernels' common ground (attention-bifurcated.cu holds the fp32 CUDA-core kernels and picks;
// attention-bifurcated-mma.cu the tensor-core ones): how a token's group and its shared positions are read, how a
// block finds a group's members, and the tensor-core launch.
#pragma once

#include "cuda/kv-block-table.cuh"

namespace weft::cuda::bifurcated {

__host__ __device__ inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// A token's group, -1 for none or an index outside the descriptors; and the positions its group shares.
__device__ __forceinline__ int group_of(const int32_t* token_group, int t, int G) {
  const int g = token_group[t];
  return g >= 0 && g < G ? g : -1;
}
__device__ __forceinline__ int shared_of(const int32_t* group_shared, int g, int64_t capacity) {
  if (g < 0) return 0;
  const int64_t shared = group_shared[g];
  return static_cast<int>(shared < 0 ? 0 : (shared > capacity ? capacity : shared));
}

// Warp 0 writes group g's tokens, in order, to members[] and their count to *n_members (a ballot per 32 tokens);
// the caller synchronises the block before reading them.
__device__ __forceinline__ void find_members(const int32_t* token_group, int T, int G, int g, int* members,
                                             int* n_members) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int n = 0;
  for (int base = 0; base < T; base += 32) {
    const bool in = base + lane < T && group_of(token_group, base + lane, G) == g;
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    if (in) members[n + __popc(ballot & ((1u << lane) - 1))] = base + lane;
    n += __popc(ballot);
  }
  if (lane == 0) *n_members = n;
}

// Whether the tensor-core kernels (attention-bifurcated-mma.cu) take the cache: bf16 at head dims 64 and 128.
inline bool mma_takes(DType kv_dtype, int64_t hd) { return kv_dtype == DType::BF16 && (hd == 64 || hd == 128); }

// Floats of scratch the tensor-core kernels need (their partials of every (token, head)).
int64_t mma_scratch_floats(int64_t T, int64_t G, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms);

// Bifurcated attention on tensor cores (mma_takes): the partial kernel (the prefix blocks alone when !with_private:
// a benchmark's view of them), then the merge into out (none when out is null). Arguments as
// launch_attention_bifurcated.
void launch_mma(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                const Tensor& kv_block_table, const Tensor& positions, const Tensor& token_group,
                const Tensor& group_shared, int64_t n_heads, float scale, const Tensor* out, float* scratch,
                int num_sms, bool with_private);

}  // namespace weft::cuda::bifurcated
