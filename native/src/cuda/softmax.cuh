// logSoftmax and logprobs: one block per row.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

void launch_log_softmax(const Ctx& ctx, const Tensor& logits, const Tensor& out);
// out [R] f32 = log_softmax(logits[r])[ids[r]]; ids [R] i32 on the device, already checked < V.
void launch_logprobs(const Ctx& ctx, const Tensor& logits, const Tensor& ids, const Tensor& out);

}  // namespace weft::cuda
