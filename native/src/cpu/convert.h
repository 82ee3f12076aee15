// f16 / bf16 -> f32 on the host. All CPU arithmetic is fp32; narrow weights are widened as they are read.
#pragma once

#include <cstdint>
#include <cstring>

#include "tensor.h"

namespace weft::cpu {

inline float bits_to_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bf16 is the upper 16 bits of an IEEE f32.
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Exact for every input, including
// subnormals (exponent 0), infinities and NaNs (exponent 31; the NaN payload is kept).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_f32(sign);  // +-0
    // Subnormal: mantissa * 2^-24. Shift until the implicit bit (bit 10) is set; each shift halves the scale.
    uint32_t e = 127 - 15 + 1;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --e;
    }
    return bits_to_f32(sign | (e << 23) | ((mantissa & 0x3ffu) << 13));
  }
  if (exponent == 31) return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_to_f32(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

inline uint32_t f32_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// f32 -> bf16 / f16 rounding toward zero (randomUniform: keeps values inside [-scale, scale)).
inline uint16_t f32_to_bf16_rz(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays NaN
  return static_cast<uint16_t>(x >> 16);
}
inline uint16_t f32_to_f16_rz(float f) {
  uint32_t x = f32_bits(f);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;        // NaN
  if (a == 0x7f800000u) return sign | 0x7c00u;       // inf
  if (a >= 0x47800000u) return sign | 0x7bffu;       // >= 65536: the largest finite half, toward zero
  int e = static_cast<int>(a >> 23) - 127;
  if (e >= -14) return static_cast<uint16_t>(sign | ((e + 15) << 10) | ((a >> 13) & 0x3ffu));
  if (e < -25) return sign;
  uint32_t m = (a & 0x7fffffu) | 0x800000u;          // subnormal half: drop the bits below 2^-24
  return static_cast<uint16_t>(sign | (m >> (-14 - e + 13)));
}

// The 65536 f16 values as f32 (256 KiB, built once): a table lookup is faster than the branches above.
const float* f16_table();

// dst[i] = float(src[offset + i]) for i < n, src holding elements of `dtype` (any dtype but i32).
void to_f32(const void* src, DType dtype, int64_t offset, int64_t n, float* dst);

}  // namespace weft::cpu
