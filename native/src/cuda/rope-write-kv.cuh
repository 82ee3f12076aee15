// rope and writeKv: per-head kernels of the attention block's edges (rmsNorm: fused-layer.cuh, with addRmsNorm).
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

void launch_rope(const Ctx& ctx, const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                 const Tensor& out);
// caches [nBlocks, nKv, B, hd], token_seq [T], kv_block_table [S, maxBlocksPerSeq] (kv-block-table.h).
void launch_write_kv(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                     const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions);

}  // namespace weft::cuda
