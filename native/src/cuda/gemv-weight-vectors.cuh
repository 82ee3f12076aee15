// The one-token GEMVs' 16-byte weight vectors (8 bf16, 16 int8 or 32 int4 weights) turned into fp32 products, shared
// by the register kernels (gemv-one-token.cu) and the bulk-copy rows (gemv-rows-tma.cu), so that a row's sum is the
// same bits on either. x is staged in shared memory as f32, sub-vector-major: float4 h of vector v at xs4[h KV + v]
// (KV vectors a row), so 32 lanes reading one sub-vector of consecutive vectors touch consecutive words.
#pragma once

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

// int4 word (columns c .. c + 7, code = value + 8, the even column in each byte's low nibble: gemv.cuh QuantMatrix)
// as eight floats, exact, without a conversion instruction: nibble j of a word masked under 0x4B000000 is the float
// 2^23 + 16^j code (exact while the nibble stays in the mantissa's 23 bits, so nibbles 5-7 come from the word shifted
// right by 12), and one fmaf by 16^-j less (2^23 16^-j + 8) gives code - 8 exactly. One mask and one fmaf a weight: on H200 the f16-pair
// conversion before it (two f16x2 ops and eight f16-to-f32 conversions a word, the conversions at a quarter of the
// FMA rate) held a Llama-2-7B layer's int4 GEMVs at ~70 us against a 23 us floor (gemv-layer-run.sh int4).
__device__ __forceinline__ void int4_weights(uint32_t word, float (&f)[8]) {
  const uint32_t shifted = word >> 12;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int n = j < 5 ? j : j - 3;  // the nibble's place in its source
    const float scale = 1.0f / static_cast<float>(1u << (4 * n));
    const float v = __uint_as_float(0x4B000000u | ((j < 5 ? word : shifted) & (0xFu << (4 * n))));
    f[j] = fmaf(v, scale, -(8388608.0f * scale + 8.0f));
  }
}

// t + the products of quantized vector v (u: int8 or int4 codes, unscaled) with x, fmaf after fmaf in column order
// (int8) or in int4_weights' order; the caller scales the sum (per vector or per row).
template <Format F>
__device__ __forceinline__ float dot_vector(const uint4& u, const float4* xs4, int KV, int v, float t) {
  static_assert(F != Format::BF16, "bf16 rows sum their own way (gemv-one-token.cu, gemv-rows-tma.cu)");
  if constexpr (F == Format::I4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i + 7
      const float4 xa = xs4[2 * i * KV + v], xb = xs4[(2 * i + 1) * KV + v];
      float f[8];
      int4_weights((&u.x)[i], f);
      t = fmaf(f[0], xa.x, t);
      t = fmaf(f[1], xa.y, t);
      t = fmaf(f[2], xa.z, t);
      t = fmaf(f[3], xa.w, t);
      t = fmaf(f[4], xb.x, t);
      t = fmaf(f[5], xb.y, t);
      t = fmaf(f[6], xb.z, t);
      t = fmaf(f[7], xb.w, t);
    }
  } else {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const float4 xv = xs4[h * KV + v];
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
