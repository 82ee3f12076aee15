// The prefix kernels' common ground (attention-bifurcated.cu holds the plan, the private and merge kernels and
// the fp32 prefix kernel; attention-bifurcated-prefix.cu the tensor-core one): how a token's group and its
// shared positions are read, how a block finds a group's members, and the tensor-core prefix launch.
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

// Whether the tensor-core prefix kernel takes a cache of this head dim (and f32 or bf16 elements).
inline bool prefix_mma_takes(int64_t hd) { return hd == 64 || hd == 128; }

// Dynamic shared memory of the tensor-core prefix kernel for chunks of P positions and a batch of T tokens.
size_t prefix_mma_smem(int64_t hd, DType kv_dtype, int P, int64_t T);

// The tensor-core prefix kernel over groups 0..G-1 (prefix_mma_takes(hd)): every group's shared positions in
// chunks of P, chunk c's partial of each of its rows to slot c of part_out [T * nH, n_slots, hd] and part_ml
// [T * nH, n_slots, 2] (max, sum: the fp32 prefix kernel's partials). Arguments as launch_attention_bifurcated.
void launch_prefix_mma(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& token_group,
                       const Tensor& group_shared, int64_t n_heads, float scale, int P, int slots_a, int n_slots,
                       float* part_out, float* part_ml);

}  // namespace weft::cuda::bifurcated
