// topLogprobs: the log-prob of one id per asked-for row and the k most likely ids with theirs (k <= 20).
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// out [Q, 1 + 2k] f32 from logits [R, V] f32, rows [Q] i32, ids [R] i32 (Backend::top_logprobs). A row or id out
// of range (not checked on the host: they may live on the device only) gives NaN in its entries.
void launch_top_logprobs(const Ctx& ctx, const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k,
                         const Tensor& out);

}  // namespace weft::cuda
