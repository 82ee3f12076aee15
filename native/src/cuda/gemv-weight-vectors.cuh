// The one-token GEMVs' 16-byte weight vectors (8 bf16, 16 int8 or 32 int4 weights) turned into fp32 products, shared
// by the register kernels (gemv-one-token.cu) and the bulk-copy rows (gemv-rows-tma.cu), so that a row's sum is the
// same bits on either. x is staged in shared memory as f32, sub-vector-major: float4 h of vector v at xs4[h KV + v]
// (KV vectors a row), so 32 lanes reading one sub-vector of consecutive vectors touch consecutive words.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace weft::cuda {

enum class Format { BF16, I8, I4 };
template <Format F> constexpr int kVectorWeights = F == Format::BF16 ? 8 : F == Format::I8 ? 16 : 32;

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Weights 4h .. 4h + 3 of a 16-byte vector as floats, exact. bf16: the f32 of the same high bits. int8: byte b as
// the float 2^23 + (b + 128) (a byte permute into 0x4B0000uu, the sign bit flipped), minus 2^23 + 128: cheaper than
// an int-to-float conversion.
template <Format F>
__device__ __forceinline__ void weights4(const uint4& u, int h, float (&f)[4]) {
  if constexpr (F == Format::BF16) {
    const uint32_t a = (&u.x)[2 * h], b = (&u.x)[2 * h + 1];
    f[0] = __uint_as_float(a << 16);
    f[1] = __uint_as_float(a & 0xffff0000u);
    f[2] = __uint_as_float(b << 16);
    f[3] = __uint_as_float(b & 0xffff0000u);
  } else {
    const uint32_t word = (&u.x)[h] ^ 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u | i)) - 8388736.0f;
  }
}

// int4 word (columns c .. c + 7, code = value + 8, the even column in each byte's low nibble: gemv.cuh
// QuantMatrix) as four f16 pairs, exact: (c, c + 4), (c + 1, c + 5), (c + 2, c + 6), (c + 3, c + 7). A low nibble
// masked under 0x6400 is 1024 + code, minus 1032; a high one 1024 + 16 code, times 1/16 minus 72 (as
// gemv-quant-mma-fragments.cuh); each mask and its 0x6400 is one lop3 (ptxas made two of it). The f16x2 arithmetic and
// the f16-to-f32 conversions leave the integer pipe, the busiest (ncu), to the masks: on H200 a Llama-2-7B layer's
// int4 GEMVs took 66.8 us this way against 71.7 with each nibble masked under 2^23 as a float and one fmaf a weight
// (gemv-layer-run.sh int4).
template <uint32_t kMask>
__device__ __forceinline__ uint32_t mask_under_0x6400(uint32_t word) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(word), "n"(kMask), "n"(0x64006400u));  // (a & b) | c
  return out;
}
__device__ __forceinline__ void int4_half2_pairs(uint32_t word, __half2 (&p)[4]) {
  const uint32_t shifted = word >> 8;
  const uint32_t b[4] = {mask_under_0x6400<0x000f000fu>(word), mask_under_0x6400<0x00f000f0u>(word),
                         mask_under_0x6400<0x000f000fu>(shifted), mask_under_0x6400<0x00f000f0u>(shifted)};
  const __half2 h1032 = __float2half2_rn(1032.f), h16th = __float2half2_rn(0.0625f), hm72 = __float2half2_rn(-72.f);
  p[0] = __hsub2(*reinterpret_cast<const __half2*>(&b[0]), h1032);
  p[1] = __hfma2(*reinterpret_cast<const __half2*>(&b[1]), h16th, hm72);
  p[2] = __hsub2(*reinterpret_cast<const __half2*>(&b[2]), h1032);
  p[3] = __hfma2(*reinterpret_cast<const __half2*>(&b[3]), h16th, hm72);
}
// The same pairs as f32 (the one-token kernels' fp32 sums).
__device__ __forceinline__ void int4_pairs(uint32_t word, float2 (&p)[4]) {
  __half2 h[4];
  int4_half2_pairs(word, h);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __half22float2(h[i]);
}

// log2 of a power of two, else -1 (a group's vectors as a shift).
inline int log2_exact(int v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

// x's four float4s for weight vector v (16 int8 or 32 int4 weights: H = 4 or 8), loaded once for all the rows a warp
// sums against them.
template <Format F>
struct XVector {
  static constexpr int H = kVectorWeights<F> / 4;
  float4 h[H];
  __device__ __forceinline__ XVector(const float4* xs4, int KV, int v) {
#pragma unroll
    for (int i = 0; i < H; ++i) h[i] = xs4[i * KV + v];
  }
};

// t + the products of quantized vector u (int8 or int4 codes, unscaled) with x, fmaf after fmaf in column order
// (int8) or in int4_pairs' order; the caller scales the sum (per vector or per row).
template <Format F>
__device__ __forceinline__ float dot_vector(const uint4& u, const XVector<F>& x, float t) {
  static_assert(F != Format::BF16, "bf16 rows sum their own way (gemv-one-token.cu, gemv-rows-tma.cu)");
  if constexpr (F == Format::I4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i + 7
      const float4 xa = x.h[2 * i], xb = x.h[2 * i + 1];
      float2 p[4];
      int4_pairs((&u.x)[i], p);
      t = fmaf(p[0].x, xa.x, t);
      t = fmaf(p[1].x, xa.y, t);
      t = fmaf(p[2].x, xa.z, t);
      t = fmaf(p[3].x, xa.w, t);
      t = fmaf(p[0].y, xb.x, t);
      t = fmaf(p[1].y, xb.y, t);
      t = fmaf(p[2].y, xb.z, t);
      t = fmaf(p[3].y, xb.w, t);
    }
  } else {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const float4 xv = x.h[h];
      float f[4];
      weights4<F>(u, h, f);
      t = fmaf(f[0], xv.x, t);
      t = fmaf(f[1], xv.y, t);
      t = fmaf(f[2], xv.z, t);
      t = fmaf(f[3], xv.w, t);
    }
  }
  return t;
}

}  // namespace weft::cuda
