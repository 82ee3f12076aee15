// f32 -> bf16 rounding to nearest, ties to even (as torch's .to(torch.bfloat16)): the one rule by which both
// backends write a bf16 KV cache, so a CPU cache and a CUDA cache fed the same values hold the same bits.
// Reading back is exact (a bf16 is the upper half of an f32).
#pragma once

#include <cstdint>
#include <cstring>

#include "host-device.h"

namespace weft {

WEFT_HD uint32_t f32_bits_of(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the dropped half is over
// 0x8000, or equal to it with the kept half odd. Finite values past the largest bf16 round to infinity.
WEFT_HD uint16_t f32_to_bf16_rn(float f) {
  const uint32_t x = f32_bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays NaN (quiet)
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace weft
