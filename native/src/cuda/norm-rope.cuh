// rmsNorm, rope and writeKv: per-row and per-head kernels of the attention block's edges.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// out_w (optional, [T, H] in weight's dtype): the rows also written there, rounded to nearest.
void launch_rms_norm(const Ctx& ctx, const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                     const Tensor* out_w = nullptr);
void launch_rope(const Ctx& ctx, const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                 const Tensor& out);
// caches [nBlocks, nKv, B, hd], token_seq [T], kv_block_table [S, maxBlocksPerSeq] (kv-block-table.h).
void launch_write_kv(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                     const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions);

}  // namespace weft::cuda
