// Elementwise and copying ops: add, siluMul, slice/concat columns, gatherRows, embedding,
// randomUniform. Launchers check the launch and throw weft::Error; shapes were checked by Backend.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

void launch_add(const Ctx& ctx, const Tensor& a, const Tensor& b, const Tensor& out);
// out [T, F] f32, or f16/bf16 (rounded to nearest) for a prefill GEMM that reads it.
void launch_silu_mul(const Ctx& ctx, const Tensor& gate_up, const Tensor& out);
// The same into out [T, F] f32 and half [T, F] f16/bf16 (a prefill GEMM's copy of out), one pass.
void launch_silu_mul(const Ctx& ctx, const Tensor& gate_up, const Tensor& out, const Tensor& half);
// out[:, out_col + c] = x[:, x_col + c] for c < n_cols (sliceCols, concatCols).
void launch_copy_cols(const Ctx& ctx, const char* op, const Tensor& x, int64_t x_col, const Tensor& out,
                      int64_t out_col, int64_t n_cols);
void launch_gather_rows(const Ctx& ctx, const Tensor& x, const Tensor& rows, const Tensor& out);
void launch_embedding(const Ctx& ctx, const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out);
// ids[i] = from[i] < 0 ? ids[i] : src[from[i]] (feedTokens); a from index past src is reported on the device.
void launch_feed_tokens(const Ctx& ctx, const Tensor& ids, const Tensor& from, const Tensor& src);
void launch_random_uniform(const Ctx& ctx, const Tensor& out, uint64_t seed, float scale);

}  // namespace weft::cuda
