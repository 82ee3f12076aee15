// The counter-based uniform generator behind randomUniform, shared by the CPU and CUDA backends so both make
// the same f32 values: element i of seed s hashes splitmix64(splitmix64(s) ^ i), its top 24 bits a
// uniform u in [0, 1), and the value (2u - 1) * scale in [-scale, scale). Narrow dtypes round toward zero,
// which keeps the value inside the interval.
#pragma once

#include <cstdint>

#include "host-device.h"

namespace weft {

WEFT_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Value of element `index` for `seed` (the seed is hashed first, so nearby seeds give unrelated streams).
WEFT_HD float uniform_value(uint64_t seed, uint64_t index, float scale) {
  uint64_t h = splitmix64(splitmix64(seed) ^ index);
  float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in f32
  return (2.0f * u - 1.0f) * scale;
}

}  // namespace weft
