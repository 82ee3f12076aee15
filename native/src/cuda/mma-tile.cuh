// Tensor-core attention tiles (mma.sync m16n8k16, f16 operands, f32 accumulators), shared by the prefill kernel
// (attention-prefill.cu), the bifurcated kernel (attention-bifurcated-mma.cu) and others:
//  - a tile of BK key and value rows of the paged cache (row offsets found through the block table by the
//    caller) fetched by cp.async, 16-byte chunks, into a staging area of the cache's type, then converted by
//    each thread (the chunks it fetched itself: no barrier between) to f16 in two padded tiles (16 B row pad:
//    ldmatrix without bank conflicts). A bf16 value goes through its exact f32, so a bf16 cache gives the f32
//    cache's result bit for bit when the two hold the same values; a 1-byte code is dequantized (code * its row's
//    scale) as it is converted;
//  - S = Q K^T with Q in registers as A fragments, one step of the online softmax in f32 registers with exp2
//    (scores pre-multiplied by log2(e)), and O += P V with P (f16) reused in registers as the A operand and V
//    fragments by ldmatrix.trans.
// f16, not bf16, for the operands: q, k, v and p of Llama-class models are far inside f16's range (|x| < 65504;
// conversions saturate rather than overflow), and its 11-bit significand is 8x finer than bf16's, which is what
// bounds the logit error.
#pragma once

#include "cuda/kv-block-table.cuh"

namespace weft::cuda {

// Shared memory of a K/V tile pair: the staging area (K then V, [2][BK][HD] of the cache's type) and the two f16
// tiles [BK][kLd].
template <int HD, int BK, typename KV>
struct KvTileLayout {
  static constexpr int kLd = HD + 8;                                        // f16 elements per tile row
  static constexpr int kChunk = 16 / sizeof(KV);                           // cache elements per 16-byte chunk
  static constexpr size_t kStage = size_t{2} * BK * HD * sizeof(KV);       // K then V, the cache's type
  static constexpr size_t kHalfTile = size_t{BK} * kLd * sizeof(__half);  // K or V (and Q at first) in f16
  static constexpr size_t kBytes = kStage + 2 * kHalfTile;
};

// 16 bytes global -> shared; src_bytes 0 fills zeros (rows past the keys in use: a poisoned cache row must not
// reach P V as NaN * 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits for this thread's cp.async groups but the newest one (when `but_newest`) or for all of them.
__device__ __forceinline__ void cp_async_wait(bool but_newest) {
  if (but_newest)
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else
    cp_async_wait_all();
}
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
// Defines NAME(c, a, b0, b1): c += a b by one mma.sync.aligned.SHAPE_TYPES (an m16n8 shape: A four registers,
// B two, the accumulators c four of ACC, asm constraint "+" CONSTRAINT).
#define WEFT_DEFINE_MMA_M16N8(NAME, SHAPE_TYPES, ACC, CONSTRAINT)                                              \
  __device__ __forceinline__ void NAME(ACC (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {      \
    asm volatile("mma.sync.aligned." SHAPE_TYPES " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "            \
                 "{%0, %1, %2, %3};\n"                                                                       \
                 : "+" CONSTRAINT(c[0]), "+" CONSTRAINT(c[1]), "+" CONSTRAINT(c[2]), "+" CONSTRAINT(c[3])     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                             \
  }
// c += a b, m16n8k16, f16 (bf16) inputs, f32 accumulators.
WEFT_DEFINE_MMA_M16N8(mma_f16, "m16n8k16.row.col.f32.f16.f16.f32", float, "f")
WEFT_DEFINE_MMA_M16N8(mma_bf16, "m16n8k16.row.col.f32.bf16.bf16.f32", float, "f")
// An 8x8 matrix of 16-bit pairs transposed across the warp: lane (g, t) gives row g's elements 2t, 2t + 1 and gets
// row 2t's and row 2t + 1's element g (the first in the low half).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}
// (x0, x1) as a pair of 16-bit operands hi and the pair of what rounding left, lo (element 0 in the low half).
template <bool BF16>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  if constexpr (BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  } else {
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  }
}
// (lo, hi) -> f16x2, round to nearest, saturating at +-65504 (NaN stays NaN).
__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// Over the 8 lanes that share t = lane & 3 (an m16n8 accumulator's rows g of one column pair): the max, the sum.
__device__ __forceinline__ float max_over_rows(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}
__device__ __forceinline__ float sum_over_rows(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}
// The B operand of O^T = V^T P^T (k: 16 rows, n: 8 columns, column c the hi (c even) or lo part of head c / 2's
// weights) from the weights where the scores S^T = K Q^T leave them: lane (g, t) holds head t's weights of rows g
// (w_g) and g + 8 (w_g8). Rows 2t, 2t + 1 (and + 8) of column g come from lanes (2t, g / 2) and (2t + 1, g / 2).
template <bool BF16>
__device__ __forceinline__ void weights_as_b(float w_g, float w_g8, uint32_t& b0, uint32_t& b1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, src = 8 * (lane & 3) + (g >> 1);
  const float w0 = __shfl_sync(0xffffffffu, w_g, src), w1 = __shfl_sync(0xffffffffu, w_g, src + 4);
  const float w8 = __shfl_sync(0xffffffffu, w_g8, src), w9 = __shfl_sync(0xffffffffu, w_g8, src + 4);
  uint32_t hi0, lo0, hi1, lo1;
  split_pair<BF16>(w0, w1, hi0, lo0);
  split_pair<BF16>(w8, w9, hi1, lo1);
  b0 = (g & 1) ? lo0 : hi0;
  b1 = (g & 1) ? lo1 : hi1;
}
// One staged 16-byte chunk of cache elements -> f16 at dst (8-byte aligned for f32's 4, 16 for bf16's 8).
__device__ __forceinline__ void chunk_to_f16(const float* src, __half* dst) {
  const float4 x = *reinterpret_cast<const float4*>(src);
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_f16(x.x, x.y), pack_f16(x.z, x.w));
}
__device__ __forceinline__ void chunk_to_f16(const __nv_bfloat16* src, __half* dst) {
  const uint4 x = *reinterpret_cast<const uint4*>(src);
  auto lo = [](uint32_t u) { return __uint_as_float(u << 16); };
  auto hi = [](uint32_t u) { return __uint_as_float(u & 0xffff0000u); };
  *reinterpret_cast<uint4*>(dst) = make_uint4(pack_f16(lo(x.x), hi(x.x)), pack_f16(lo(x.y), hi(x.y)),
                                              pack_f16(lo(x.z), hi(x.z)), pack_f16(lo(x.w), hi(x.w)));
}
// Two bf16 (element 0 in the low half) -> the f16 pair of the same values (exact in f16's normal range; a
// fragment of a bf16 cache loaded by ldmatrix, converted in registers: attention-bifurcated-mma.cu).
__device__ __forceinline__ uint32_t bf16x2_to_f16x2(uint32_t x) {
  return pack_f16(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
}
// 16 staged 1-byte codes of one row -> their values (code * the row's scale, f32) -> f16 at dst (32-byte
// aligned): the f32 cache's conversion of the same values, so the two give the same tiles.
template <typename KV>
__device__ __forceinline__ void chunk_to_f16(const KV* src, __half* dst, float row_scale) {
  const uint4 x = *reinterpret_cast<const uint4*>(src);
  const uint32_t words[4] = {x.x, x.y, x.z, x.w};
  uint32_t packed[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[4];
    codes_as_f32(words[w], src, f);
    packed[2 * w] = pack_f16(__fmul_rn(f[0], row_scale), __fmul_rn(f[1], row_scale));
    packed[2 * w + 1] = pack_f16(__fmul_rn(f[2], row_scale), __fmul_rn(f[3], row_scale));
  }
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 4 elements of a query row (q4, f32; nullptr: a row past the tile, zeros) times qscale -> f16 at dst.
__device__ __forceinline__ void q4_to_f16(const float* q4, float qscale, __half* dst) {
  float4 x = make_float4(0, 0, 0, 0);
  if (q4) x = *reinterpret_cast<const float4*>(q4);
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_f16(x.x * qscale, x.y * qscale), pack_f16(x.z * qscale, x.w * qscale));
}

// Thread tid of THREADS: its chunks of the K and V rows of a tile (cache offsets rows[BK], elements; the first
// n_in in use, the others zero-filled) -> stage, by cp.async, one commit group.
template <int HD, int BK, int THREADS, typename KV>
__device__ __forceinline__ void fetch_kv_tile(KV* stage, const KV* __restrict__ k_cache,
                                              const KV* __restrict__ v_cache, const int64_t* rows, int n_in,
                                              int tid) {
  constexpr int EC = KvTileLayout<HD, BK, KV>::kChunk, CPR = HD / EC, CH = BK * CPR / THREADS;
  static_assert(HD % 16 == 0 && (BK * CPR) % THREADS == 0, "tile shape");
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    int c = i * THREADS + tid, row = c / CPR;
    bool in = row < n_in;
    int64_t off = in ? rows[row] + (c % CPR) * EC : 0;
    cp_async16(smem_u32(stage + c * EC), k_cache + off, in ? 16 : 0);
    cp_async16(smem_u32(stage + BK * HD + c * EC), v_cache + off, in ? 16 : 0);
  }
  cp_async_commit();
}

// The chunks thread tid fetched with fetch_kv_tile (same rows, n_in) -> f16 tiles kh, vh [BK][kLd], once they
// have landed (newer_in_flight: the thread fetched one more tile since, which may stay in flight); row_scales
// [BK]: the 1-byte caches' (K, V) scales of the tile's rows, read with the rows (unused otherwise).
template <int HD, int BK, int THREADS, typename KV>
__device__ __forceinline__ void convert_kv_tile(const KV* stage, __half* kh, __half* vh, int n_in,
                                                const float2* row_scales, int tid, bool newer_in_flight = false) {
  using L = KvTileLayout<HD, BK, KV>;
  constexpr int EC = L::kChunk, CPR = HD / EC, CH = BK * CPR / THREADS, LD = L::kLd;
  cp_async_wait(newer_in_flight);
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    int c = i * THREADS + tid, row = c / CPR, col = (c % CPR) * EC;
    if constexpr (kKvQuantized<KV>) {  // a row past n_in was zero-filled: its scale 0 keeps it 0
      const bool in = row < n_in;
      chunk_to_f16(stage + c * EC, kh + row * LD + col, in ? row_scales[row].x : 0.0f);
      chunk_to_f16(stage + BK * HD + c * EC, vh + row * LD + col, in ? row_scales[row].y : 0.0f);
    } else {
      chunk_to_f16(stage + c * EC, kh + row * LD + col);
      chunk_to_f16(stage + BK * HD + c * EC, vh + row * LD + col);
    }
  }
}

// ldmatrix lane addresses of a warp: its A fragments of 16 rows (at `tile`, f16, row stride LD), the B
// fragments of K (non-transposed, Q K^T) and of V (transposed, P V) from the first key row of `tile`.
template <int LD>
__device__ __forceinline__ uint32_t a_frag_addr(const __half* tile, int lane) {
  return smem_u32(tile + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * (lane >> 4));
}
template <int LD>
__device__ __forceinline__ uint32_t k_frag_addr(const __half* tile, int lane) {
  return smem_u32(tile + ((lane & 7) + 8 * (lane >> 4)) * LD + 8 * ((lane >> 3) & 1));
}
template <int LD>
__device__ __forceinline__ uint32_t v_frag_addr(const __half* tile, int lane) {
  return a_frag_addr<LD>(tile, lane);
}

// c[m][2 n], c[m][2 n + 1] += a_m B for a warp's MT m16 tiles m, the KT k steps kk and the NP pairs n of n8 tiles:
// B the fragments one ldmatrix_x4 (.trans when TRANS) loads at the shared address b_addr(kk, n), each serving all MT
// tiles (in the same order for each tile as for one); a_frag(m, kk, a) puts tile m's A fragment of step kk in a (held
// registers: held_frags, or a shared-memory read). MMA: an m16n8 mma.sync.
template <int KT, int NP, bool TRANS, auto MMA, int MT, typename Acc, typename AFrag, typename BAddr>
__device__ __forceinline__ void mma_tile_pairs(Acc (&c)[MT][2 * NP][4], AFrag&& a_frag, BAddr b_addr) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) a_frag(m, kk, a[m]);
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      uint32_t b[4];
      if constexpr (TRANS)
        ldmatrix_x4_trans(b, b_addr(kk, n));
      else
        ldmatrix_x4(b, b_addr(kk, n));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        MMA(c[m][2 * n], a[m], b[0], b[1]);
        MMA(c[m][2 * n + 1], a[m], b[2], b[3]);
      }
    }
  }
}
// mma_tile_pairs' a_frag for A fragments held in registers, frags[m][kk].
template <int MT, int KT>
__device__ __forceinline__ auto held_frags(const uint32_t (&frags)[MT][KT][4]) {
  return [&frags](int m, int kk, uint32_t (&a)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = frags[m][kk][r];
  };
}

// s[m] = Q_m K^T for MT m-tiles of 16 query rows (a_frag: mma_tile_pairs', over KT k16 steps of the head dim) and
// 8 * NS keys from k_addr.
template <int KT, int NS, int LD, int MT, typename AFrag>
__device__ __forceinline__ void mma_qk(float (&s)[MT][NS][4], AFrag&& a_frag, uint32_t k_addr) {
  static_assert(NS % 2 == 0, "keys in steps of 16");
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NS; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0;
  mma_tile_pairs<KT, NS / 2, false, mma_f16, MT>(
      s, a_frag, [&](int kk, int np) { return k_addr + (np * 16 * LD + kk * 16) * sizeof(__half); });
}

// The online softmax of a thread's rows gr (elements 0, 1) and gr + 8 (2, 3) after a step: running maxes m0, m1
// (quad-uniform), the thread's partial sums l0, l1, and alpha0, alpha1, the factors the step rescaled the sums by
// (the rows of O are to be rescaled by the same).
struct SoftmaxRows {
  float m0, m1, l0, l1, alpha0, alpha1;
};
// One online-softmax step over scores s (log2 units; -inf masked), in place: s becomes the weights 2^(s - max)
// (weights(n) is called once s[n] holds them); m0, m1, l0, l1: the rows' state before the step. The state is
// passed by value so that the callers' copies are never address-taken (the kernels' code stays as it was).
template <int NS, typename Weights>
__device__ __forceinline__ SoftmaxRows softmax_weights(float (&s)[NS][4], float m0, float m1, float l0, float l1,
                                                       Weights&& weights) {
  float mx0 = m0, mx1 = m1;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
    mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
  }
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
  }
  // A row with no key yet keeps max -inf: subtract 0 instead, so that exp2(-inf - base) = 0, not NaN.
  const float base0 = mx0 == -INFINITY ? 0.0f : mx0, base1 = mx1 == -INFINITY ? 0.0f : mx1;
  const float alpha0 = fast_exp2(m0 - base0), alpha1 = fast_exp2(m1 - base1);
  float rs0 = 0, rs1 = 0;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    s[n][0] = fast_exp2(s[n][0] - base0);
    s[n][1] = fast_exp2(s[n][1] - base0);
    s[n][2] = fast_exp2(s[n][2] - base1);
    s[n][3] = fast_exp2(s[n][3] - base1);
    rs0 += s[n][0] + s[n][1];
    rs1 += s[n][2] + s[n][3];
    weights(n);
  }
  l0 = l0 * alpha0 + rs0;
  l1 = l1 * alpha1 + rs1;
  return {mx0, mx1, l0, l1, alpha0, alpha1};
}

// The rows gr (elements 0, 1) and gr + 8 (2, 3) of O times alpha0, alpha1.
template <int NO>
__device__ __forceinline__ void scale_o_rows(float (&o_acc)[NO][4], float alpha0, float alpha1) {
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    o_acc[n][0] *= alpha0;
    o_acc[n][1] *= alpha0;
    o_acc[n][2] *= alpha1;
    o_acc[n][3] *= alpha1;
  }
}

// softmax_weights with the state updated in place, O rescaled and the weights as f16 A fragments pf for O += P V.
template <int NS, int NO>
__device__ __forceinline__ void softmax_step(float (&s)[NS][4], float& m0, float& m1, float& l0, float& l1,
                                             float (&o_acc)[NO][4], uint32_t (&pf)[NS / 2][4]) {
  const SoftmaxRows rows = softmax_weights(s, m0, m1, l0, l1, [&](int n) {
    pf[n / 2][(n & 1) * 2] = pack_f16(s[n][0], s[n][1]);
    pf[n / 2][(n & 1) * 2 + 1] = pack_f16(s[n][2], s[n][3]);
  });
  m0 = rows.m0;
  m1 = rows.m1;
  l0 = rows.l0;
  l1 = rows.l1;
  scale_o_rows(o_acc, rows.alpha0, rows.alpha1);
}

// o_acc[m] += P_m V for MT m-tiles: pf[m] the weights of 8 * NS keys (A fragments), V's from v_addr, NO n8 tiles
// of the head dim.
template <int NS, int NO, int LD, int MT>
__device__ __forceinline__ void mma_pv(float (&o_acc)[MT][NO][4], const uint32_t (&pf)[MT][NS / 2][4], uint32_t v_addr) {
  mma_tile_pairs<NS / 2, NO / 2, true, mma_f16, MT>(
      o_acc, held_frags(pf), [&](int kk, int dn) { return v_addr + (kk * 16 * LD + dn * 16) * sizeof(__half); });
}

}  // namespace weft::cuda
