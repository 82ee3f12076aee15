#include "cpu/convert.h"

#include <vector>

namespace weft::cpu {

const float* f16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = f16_to_f32(static_cast<uint16_t>(h));
    return t;
  }();
  return table.data();
}

void to_f32(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
  if (n <= 0) return;  // dst may be null (an empty JS typed array)
  switch (dtype) {
    case DType::F32: {
      std::memcpy(dst, static_cast<const float*>(src) + offset, static_cast<size_t>(n) * sizeof(float));
      return;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      const float* table = f16_table();
      for (int64_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::I32: {
      const int32_t* s = static_cast<const int32_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::I8:
    case DType::I4:
    case DType::FP8:
      return;  // quantized weights are widened with their scales (quant.cc); download refuses them
  }
}

}  // namespace weft::cpu
