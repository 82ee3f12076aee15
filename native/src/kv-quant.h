// The 1-byte KV caches, fp8 (e4m3) and int8: the one rule by which both backends quantize a cache row and read
// it back, so that a CPU cache and a CUDA cache fed the same values hold the same bytes.
//
// A cache of dtype FP8 or I8 is [nBlocks, nKv, B, hd] of codes and carries its scales (Tensor::scales, as a
// quantized weight does): [nBlocks, nKv, B] f32, one per (position, kv head) row, written with the row. A row
// x[hd] (f32) is stored as
//   amax = max |x_d| (NaN ignored), scale = amax / QMAX, inv = QMAX / amax (both 0 when amax is 0),
//   code_d = fp8: e4m3(x_d * inv), round to nearest even, saturating at +-448 (QMAX = 448);
//            int8: clamp(round_half_even(x_d * inv), -127, 127), NaN -> 0 (QMAX = 127);
// and read as value_d = f32(code_d) * scale, every product and quotient one IEEE f32 rounding. The CUDA kernels
// encode fp8 with cvt.rn.satfinite.e4m3x2.f32 (cuda_fp8.h), which f32_to_e4m3 below equals bit for bit; the
// attention kernels may fold the scale into the score or the softmax weight instead of into each element (the
// CPU reference multiplies each element: the meaning).
//
// Header-only and usable from host and device code (the bifurcated and SparQ attention kernels can read a
// quantized cache through e4m3_to_f32 / kv_dequantize later).
#pragma once

#include <cstdint>
#include <cstring>

#include "host-device.h"

namespace weft {

constexpr float kFp8Max = 448.0f;  // the largest finite e4m3
constexpr float kInt8Max = 127.0f;

// e4m3 (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; 0x7f / 0xff NaN, no infinity) -> f32, exact.
WEFT_HD float e4m3_to_f32(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t exponent = (code >> 3) & 0xfu, mantissa = code & 0x7u;
  uint32_t bits;
  if ((code & 0x7fu) == 0x7fu) {
    bits = sign | 0x7fc00000u;  // NaN
  } else if (exponent == 0) {  // subnormal: mantissa * 2^-9, exact in f32
    const float v = static_cast<float>(mantissa) * (1.0f / 512.0f);
    std::memcpy(&bits, &v, sizeof bits);
    bits |= sign;
  } else {
    bits = sign | ((exponent + 127 - 7) << 23) | (mantissa << 20);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// f32 -> e4m3, round to nearest even, finite values past 448 (and infinities) saturate to +-448, NaN -> 0x7f.
WEFT_HD uint8_t f32_to_e4m3(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return 0x7f;
  float a;
  std::memcpy(&a, &abs_bits, sizeof a);
  if (a > kFp8Max) return sign | 0x7e;
  if (a < 1.0f / 64.0f) {  // below the smallest normal 2^-6: multiples of 2^-9; the scaling is exact
    const float m = a * 512.0f;
    uint32_t q = static_cast<uint32_t>(m);  // truncated, then to nearest even
    const float rest = m - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return sign | static_cast<uint8_t>(q);  // q == 8 is the smallest normal, 0x08
  }
  // normal: keep 3 of the 23 mantissa bits, to nearest even (a carry into the exponent is the right result)
  const uint32_t exponent = (abs_bits >> 23) - 127 + 7, rest = abs_bits & 0xfffffu;
  uint32_t code = (exponent << 3) | ((abs_bits >> 20) & 0x7u);
  if (rest > 0x80000u || (rest == 0x80000u && (code & 1u))) ++code;
  return sign | static_cast<uint8_t>(code);  // |x| <= 448 rounds to at most 0x7e
}

// The scale stored with a row and the factor its elements are multiplied by before encoding.
struct KvRowScale {
  float scale;
  float inv;
};
WEFT_HD KvRowScale kv_row_scale(float amax, float qmax) {
#ifdef __CUDA_ARCH__
  return amax > 0 ? KvRowScale{__fdiv_rn(amax, qmax), __fdiv_rn(qmax, amax)} : KvRowScale{0.0f, 0.0f};
#else
  return amax > 0 ? KvRowScale{amax / qmax, qmax / amax} : KvRowScale{0.0f, 0.0f};
#endif
}

WEFT_HD int8_t f32_to_int8_code(float x_times_inv) {
  if (!(x_times_inv == x_times_inv)) return 0;  // NaN
  const float c = x_times_inv > kInt8Max ? kInt8Max : x_times_inv < -kInt8Max ? -kInt8Max : x_times_inv;
#ifdef __CUDA_ARCH__
  return static_cast<int8_t>(__float2int_rn(c));
#else
  // to nearest even without the floating-point environment: truncate, then look at what was dropped
  int q = static_cast<int>(c);
  const float rest = c - static_cast<float>(q);
  if (rest > 0.5f || (rest == 0.5f && (q & 1))) ++q;
  else if (rest < -0.5f || (rest == -0.5f && (q & 1))) --q;
  return static_cast<int8_t>(q);
#endif
}

// The two code types: uint8_t holds an e4m3, int8_t an int8. QMAX and the encoder of each.
template <typename Code>
struct KvCode;
template <>
struct KvCode<uint8_t> {
  static constexpr float kMax = kFp8Max;
  WEFT_HD static uint8_t encode(float x_times_inv) { return f32_to_e4m3(x_times_inv); }
};
template <>
struct KvCode<int8_t> {
  static constexpr float kMax = kInt8Max;
  WEFT_HD static int8_t encode(float x_times_inv) { return f32_to_int8_code(x_times_inv); }
};

// A stored element's value: its code widened, times the row's scale.
WEFT_HD float kv_dequantize(uint8_t fp8_code, float scale) { return e4m3_to_f32(fp8_code) * scale; }
WEFT_HD float kv_dequantize(int8_t int8_code, float scale) { return static_cast<float>(int8_code) * scale; }

// Host: quantize row x[n] into codes and return its scale.
template <typename Code>
float kv_quantize_row(const float* x, int64_t n, Code* codes) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = x[i] < 0 ? -x[i] : x[i];
    if (a > amax) amax = a;  // false for NaN
  }
  const KvRowScale s = kv_row_scale(amax, KvCode<Code>::kMax);
  for (int64_t i = 0; i < n; ++i) codes[i] = KvCode<Code>::encode(x[i] * s.inv);
  return s.scale;
}

}  // namespace weft
