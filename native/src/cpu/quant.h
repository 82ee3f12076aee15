// A matmul's weight as the CPU kernels read it: dense (f32/f16/bf16) or quantized (i8/i4 with bf16 scales per
// group of columns, backend.h upload_quantized), one row at a time widened to fp32. Dequantizing a row is
// exactly what a dequantize-then-matmul reference does (w = q * scale in fp32), so the quantized matmul equals it.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace weft::cpu {

struct WeightRows {
  const void* data;        // [rows, K] of dtype (I4: [rows, K / 2] bytes)
  DType dtype;
  const uint16_t* scales;  // quantized: [rows, K / group] bf16; null for dense
  int64_t group;           // quantized: columns per scale

  // The weight of one [N, K] matrix of w [N, K] or expert e of w [El, N, K].
  static WeightRows of(const Tensor& w, int64_t expert = 0);
};

// dst[K] = row n of w in fp32: widened, or q * scale of its group.
void weight_row_f32(const WeightRows& w, int64_t n, int64_t K, float* dst);

}  // namespace weft::cpu
