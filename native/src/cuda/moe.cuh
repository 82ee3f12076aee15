// Mixture-of-experts ops around the expert GEMV (expert-gemv.cu): routeTopK, combineExperts, and the row scatter of
// expertMatmul's grouped (prefill) path. Launchers check the launch and throw weft::Error.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// logits [T, E] f32 -> experts [T, k] i32, weights [T, k] f32 (moe-route.h's rule, one thread per token).
// rows_in_use (device, or null): rows at and past its value choose no expert (moe-route.h route_padding).
void launch_route_top_k(const Ctx& ctx, const Tensor& logits, const int32_t* rows_in_use, const Tensor& experts,
                        const Tensor& weights);
// out [T, N] = sum_j weights [T, k] * y [T k, N].
void launch_combine_experts(const Ctx& ctx, const Tensor& y, const Tensor& weights, const Tensor& out);
// out row rows[i] = src row i, for i < R (rows distinct; other out rows untouched). f32.
void launch_scatter_rows(const Ctx& ctx, const float* src, const int32_t* rows, int64_t R, int64_t N, float* out);

}  // namespace weft::cuda
