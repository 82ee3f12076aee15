// Device helpers of the prefill attention kernels (attention-prefill.cu, attention-sage.cu) beside mma-tile.cuh's
// tensor-core tiles: the query tiles' token bookkeeping (one sequence per pass) and a block-wide max.
// Header-only (__forceinline__), included by .cu files only.
#pragma once

#include "cuda/kv-block-table.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda {

// ---- query tokens

// Prefill tiles: thread i < BQ reads the sequence row and position of query t0 + i into shared memory. Tokens
// past T or out of range are done from the start; an out-of-range token's output row is zero.
__device__ __forceinline__ void load_tile_tokens(int BQ, int t0, int T, const KvBlockTable& kv,
                                                 const int32_t* token_seq, const int32_t* positions, int nH, int h,
                                                 int hd, float* out, DeviceStatus* status, int* tok_seq, int* tok_pos,
                                                 int* tok_done) {
  const int i = threadIdx.x;
  if (i >= BQ) return;
  int t = t0 + i, seq = -1, pos = -1;
  if (t < T) {
    seq = token_seq[t];
    pos = positions[t];
    if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, h == 0)) {
      for (int d = 0; d < hd; ++d) out[(size_t(t) * nH + h) * hd + d] = 0;
      seq = -1;
    }
  }
  tok_seq[i] = seq;
  tok_pos[i] = pos;
  tok_done[i] = seq < 0;
}

// Prefill tiles: thread 0 picks the sequence the next pass serves (that of the first token not done, or -1),
// the keys it needs (up to the largest position of its tokens in the tile) and a token of it (for reports).
__device__ __forceinline__ void next_pass(int BQ, int t0, const int* tok_seq, const int* tok_pos, const int* tok_done,
                                          int* cur_seq, int* cur_tok, int* kv_end) {
  if (threadIdx.x != 0) return;
  int seq = -1, end = 0, tok = 0;
  for (int i = 0; i < BQ; ++i)
    if (!tok_done[i] && (seq < 0 || tok_seq[i] == seq)) {
      if (seq < 0) tok = t0 + i;
      seq = tok_seq[i];
      end = max(end, tok_pos[i] + 1);
    }
  *cur_seq = seq;
  *cur_tok = tok;
  *kv_end = end;
}

// The largest x over the block (every thread calls it; red: one float per warp in shared memory).
__device__ __forceinline__ float block_max(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();  // red may still be read by an earlier call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) x = fmaxf(x, red[w]);
  return x;
}

}  // namespace weft::cuda
