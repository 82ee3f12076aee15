// Device helpers of the prefill attention kernels (attention-prefill.cu, attention-sage.cu) beside mma-tile.cuh's
// tensor-core tiles: the query tiles' token bookkeeping (one sequence per pass: its rows in the mma fragments,
// its end) and a block-wide max; and their launchers' shared-memory opt-in.
// Header-only, included by .cu files only.
#pragma once

#include "cuda/kv-block-table.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda {

// Lets `kernel` take smem bytes of dynamic shared memory (more than 48 KiB needs the opt-in); op names the call
// in the error.
template <typename Kernel>
void allow_dynamic_smem(const Ctx& ctx, Kernel kernel, size_t smem, const char* op) {
  if (smem > 48 * 1024)
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), op,
               " (cudaFuncSetAttribute)");
}

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

// The rows of a pass held by the mma fragments of warp `warp`, lane row gr: r0 = 16 warp + gr and r1 = r0 + 8 of
// the tile, their positions (-1: done, or not of sequence seq) and the least and largest of those over the warp.
struct PassRows {
  int r0, r1, pos0, pos1, wmin, wmax;
};
__device__ __forceinline__ PassRows pass_rows(int warp, int gr, int seq, const int* tok_seq, const int* tok_pos,
                                              const int* tok_done) {
  const int r0 = warp * 16 + gr, r1 = r0 + 8;
  const int pos0 = !tok_done[r0] && tok_seq[r0] == seq ? tok_pos[r0] : -1;
  const int pos1 = !tok_done[r1] && tok_seq[r1] == seq ? tok_pos[r1] : -1;
  int wmin = min(pos0, pos1), wmax = max(pos0, pos1);
#pragma unroll
  for (int o = 16; o >= 4; o >>= 1) {
    wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
    wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
  }
  return {r0, r1, pos0, pos1, wmin, wmax};
}

// Whether the prefill kernels (exact and Sage) give each warp two m16 tiles of query rows, in blocks of 128 rows:
// where a grid of such blocks fills two rounds of the block slots (2 an SM). Smaller grids keep one m-tile and
// twice the blocks (measured for both kernels on H200: bench/RESULTS.md, sessions 24 and 25).
inline bool two_m_tiles(int64_t T, int64_t n_heads, int num_sms) {
  const int64_t slots = 2 * int64_t{num_sms}, blocks = n_heads * ((T + 127) / 128);
  return blocks >= 2 * slots;
}

// A warp's MT m-tiles of a pass (m-tile warp MT + m of the block) and the key window over all of them.
template <int MT>
__device__ __forceinline__ void warp_pass_rows(PassRows (&rows)[MT], int& wmin, int& wmax, int warp, int gr, int seq,
                                               const int* tok_seq, const int* tok_pos, const int* tok_done) {
  wmin = INT_MAX, wmax = -1;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    rows[m] = pass_rows(warp * MT + m, gr, seq, tok_seq, tok_pos, tok_done);
    wmin = min(wmin, rows[m].wmin);
    wmax = max(wmax, rows[m].wmax);
  }
}

// The row sums of a pass: each thread of a quad holds a part of rows gr and gr + 8; after this every thread has
// the whole.
__device__ __forceinline__ void sum_quad_rows(float& l0, float& l1) {
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
}

// After a pass's rows are written (every thread): the tokens of sequence seq are done.
__device__ __forceinline__ void end_pass(int BQ, int seq, const int* tok_seq, int* tok_done) {
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < BQ && !tok_done[tid] && tok_seq[tid] == seq) tok_done[tid] = 1;
}

// The end of a pass over a tile of BQ query tokens from t0, head h of nH: the rows of O in the fragments (o_acc,
// PassRows rows, quad thread tq) times unit / (their sums: the quad's partial sums l0, l1 added) -> out, for
// the rows the pass served; then the tokens of sequence seq are done.
template <int HD, int NO>
__device__ __forceinline__ void finish_pass(const float (&o_acc)[NO][4], float l0, float l1, float unit,
                                            const PassRows& rows, int tq, int BQ, int t0, int nH, int h, int seq,
                                            const int* tok_seq, int* tok_done, float* out) {
  sum_quad_rows(l0, l1);
  if (rows.pos0 >= 0) {
    const float inv = unit / l0;
    float* o = out + (size_t(t0 + rows.r0) * nH + h) * HD + 2 * tq;
#pragma unroll
    for (int n = 0; n < NO; ++n) *reinterpret_cast<float2*>(o + n * 8) = make_float2(o_acc[n][0] * inv, o_acc[n][1] * inv);
  }
  if (rows.pos1 >= 0) {
    const float inv = unit / l1;
    float* o = out + (size_t(t0 + rows.r1) * nH + h) * HD + 2 * tq;
#pragma unroll
    for (int n = 0; n < NO; ++n) *reinterpret_cast<float2*>(o + n * 8) = make_float2(o_acc[n][2] * inv, o_acc[n][3] * inv);
  }
  end_pass(BQ, seq, tok_seq, tok_done);
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
