// sampleTensor (and the host-array sample through it): one block per row.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

void launch_sample(const Ctx& ctx, const char* op, const Tensor& logits, const Tensor& temperature,
                   const Tensor& top_k, const Tensor& top_p, const Tensor& uniform, const Tensor& out);

}  // namespace weft::cuda
