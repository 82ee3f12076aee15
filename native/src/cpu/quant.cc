// WeightRows (quant.h): the row widening every CPU matmul does, dense or quantized.
#include "cpu/quant.h"

#include "cpu/convert.h"

namespace weft::cpu {

WeightRows WeightRows::of(const Tensor& w, int64_t expert) {
  const int64_t N = w.dim(w.rank() - 2), K = w.shape.back();
  const uint8_t* base = static_cast<const uint8_t*>(w.buffer->data());
  if (!is_quantized(w.dtype))
    return {base + expert * N * K * static_cast<int64_t>(dtype_size(w.dtype)), w.dtype, nullptr, 0};
  const int64_t row_bytes = w.dtype == DType::I4 ? K / 2 : K;
  const int64_t S = w.scales->shape.back();
  return {base + expert * N * row_bytes, w.dtype, w.scales->data<uint16_t>() + expert * N * S, w.group()};
}

void weight_row_f32(const WeightRows& w, int64_t n, int64_t K, float* dst) {
  if (w.scales == nullptr) {
    to_f32(w.data, w.dtype, n * K, K, dst);
    return;
  }
  const uint16_t* scales = w.scales + n * (K / w.group);
  if (w.dtype == DType::I8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(q[k]) * bf16_to_f32(scales[k / w.group]);
    return;
  }
  // I4: byte j holds columns 2j (low nibble) and 2j + 1 (high nibble), each as value + 8.
  const uint8_t* q = static_cast<const uint8_t*>(w.data) + n * (K / 2);
  for (int64_t j = 0; j < K / 2; ++j) {
    const float scale = bf16_to_f32(scales[2 * j / w.group]);  // the group is even: both columns share it
    dst[2 * j] = static_cast<float>(static_cast<int>(q[j] & 0xf) - 8) * scale;
    dst[2 * j + 1] = static_cast<float>(static_cast<int>(q[j] >> 4) - 8) * scale;
  }
}

}  // namespace weft::cpu
