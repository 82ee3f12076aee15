// The register-level pieces of the quantized tensor-core GEMVs (gemv-quant-mma.cu, gemv-one-token-mma.cu): the
// streaming weight load, f16x2 arithmetic, mma.sync m16n8k16 and m16n8k32 (s8), the magic-number unpacking of int8 /
// int4 words into f16 pairs (and of int4 nibbles into s8 bytes), x's columns read (x_columns8) and packed into the
// lane order those pairs take. Device code only.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"  // silu_times

namespace weft::cuda::quant_mma {

__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"  // issued where written
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t sub_f16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t mul_f16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t fma_f16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// d += A (16 x 16 f16, row) * B (16 x 8 f16, col), fp32 accumulation.
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += A (16 x 32 s8, row) * B (32 x 8 s8, col), s32 accumulation (wrapping; the callers' sums stay in range).
__device__ __forceinline__ void mma_16832_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// int8 word (columns c .. c + 3) as the f16 pairs (c, c + 1) and (c + 2, c + 3).
__device__ __forceinline__ void unpack_int8(uint32_t word, uint32_t& p01, uint32_t& p23) {
  const uint32_t u = word ^ 0x80808080u;                                // b + 128, unsigned
  p01 = sub_f16x2(__byte_perm(u, 0x64646464u, 0x4140), 0x64806480u);  // 1024 + b + 128 - 1152
  p23 = sub_f16x2(__byte_perm(u, 0x64646464u, 0x4342), 0x64806480u);
}

// (word & kMask) | 0x64006400 as one lop3 (written in C, ptxas made two logic ops of it).
template <uint32_t kMask>
__device__ __forceinline__ uint32_t masked_under_1024(uint32_t word) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(word), "n"(kMask), "n"(0x64006400u));  // (a & b) | c
  return out;
}

// int4 word (columns c .. c + 7, the even column in each byte's low nibble) as the f16 pairs (c, c + 4),
// (c + 1, c + 5), (c + 2, c + 6), (c + 3, c + 7): the code minus 8.
__device__ __forceinline__ void unpack_int4(uint32_t word, uint32_t (&p)[4]) {
  const uint32_t shifted = word >> 8;
  p[0] = sub_f16x2(masked_under_1024<0x000f000fu>(word), 0x64086408u);                   // 1024 + c - 1032
  p[1] = fma_f16x2(masked_under_1024<0x00f000f0u>(word), 0x2c002c00u, 0xd480d480u);      // (1024 + 16c) / 16 - 72
  p[2] = sub_f16x2(masked_under_1024<0x000f000fu>(shifted), 0x64086408u);
  p[3] = fma_f16x2(masked_under_1024<0x00f000f0u>(shifted), 0x2c002c00u, 0xd480d480u);
}

// The high nibble of each byte of an int4 word (code = weight + 8) as the s8 byte 16 x weight, one lop3: flipping a
// code's top bit makes it the weight in two's complement, and the low nibble cleared makes that 16 times it.
__device__ __forceinline__ uint32_t int4_as_s8_times16(uint32_t word) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0x28;" : "=r"(out) : "r"(word), "n"(0x88888888u), "n"(0xf0f0f0f0u));  // (a ^ b) & c
  return out;
}

// Eight f32 columns of x at xr into v (gated: silu(gate) * up, the up columns K further on). Both tensor-core GEMVs
// stage x through it.
__device__ __forceinline__ void x_columns8(const float* xr, int K, bool gated, float (&v)[8]) {
  *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(xr);
  *reinterpret_cast<float4*>(v + 4) = *reinterpret_cast<const float4*>(xr + 4);
  if (gated) {
    float up[8];
    *reinterpret_cast<float4*>(up) = *reinterpret_cast<const float4*>(xr + K);
    *reinterpret_cast<float4*>(up + 4) = *reinterpret_cast<const float4*>(xr + K + 4);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = silu_times(v[e], up[e]);
  }
}

// Eight f32 columns (c .. c + 7) as the halves a lane's 16-byte B load holds: int8 in order, int4 as the pairs
// unpack_int4 yields, (c, c + 4), (c + 1, c + 5), (c + 2, c + 6), (c + 3, c + 7).
template <bool kInt4>
__device__ __forceinline__ uint4 pack_x(const float (&v)[8]) {
  const auto pair = [](float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  };
  if constexpr (kInt4) return make_uint4(pair(v[0], v[4]), pair(v[1], v[5]), pair(v[2], v[6]), pair(v[3], v[7]));
  else return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
}

// Items 0 .. n - 1 through a ring of D register slots: use(j) takes the item in slot j, then refill(j) loads the
// item D ahead into it. j is a compile-time index after unrolling, so the slots stay in registers.
template <int D, typename Use, typename Refill>
__device__ __forceinline__ void run_ring(int n, Use&& use, Refill&& refill) {
  for (int base = 0; base < n; base += D) {
#pragma unroll
    for (int j = 0; j < D; ++j) {
      if (base + j < n) {
        use(j);
        refill(j);
      }
    }
  }
}

}  // namespace weft::cuda::quant_mma
