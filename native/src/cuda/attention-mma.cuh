// Device helpers the tensor-core prefill attention kernels share (attention-prefill.cu, attention-sage.cu): the
// query tiles' token bookkeeping (one sequence per pass), cp.async, ldmatrix, the f16 mma and f16/exp2
// conversions. Header-only (__forceinline__), included by .cu files only.
#pragma once

#include "cuda/kv-block-table.cuh"

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

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; src_bytes 0 fills zeros (rows past the keys in use: a poisoned cache row must not
// reach P V as NaN * 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// c += a b, m16n8k16, f16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// (lo, hi) -> f16x2, round to nearest, saturating at +-65504 (NaN stays NaN).
__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
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
