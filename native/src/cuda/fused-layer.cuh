// Fused ops of a transformer layer's small kernels (decode runs them once per layer, so launches count):
//  - addRmsNorm: the residual add and the next RMSNorm in one pass over the row (and rmsNorm, the same kernel
//    without the add);
//  - qkvRope: rope of the q and k heads out of the fused qkv matmul output, q into its own tensor, k and v
//    straight into the KV cache (replaces sliceCols x 3, rope x 2 and writeKv).
// Same arithmetic as the separate kernels (rope-write-kv.cu, elementwise.cu), so the same bounds against the CPU.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// out_w (optional, [T, H] in weight's dtype): the rows also written there, rounded to nearest.
void launch_rms_norm(const Ctx& ctx, const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                     const Tensor* out_w = nullptr);
// normed_w (optional, [T, H] in weight's dtype): the normed rows also written there, rounded to nearest.
void launch_add_rms_norm(const Ctx& ctx, const Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                         const Tensor& sum, const Tensor& normed, const Tensor* normed_w = nullptr);
// caches [nBlocks, nKv, B, hd], token_seq [T], kv_block_table [S, maxBlocksPerSeq] (kv-block-table.h).
void launch_qkv_rope(const Ctx& ctx, const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                     const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                     const Tensor& kv_block_table, const Tensor& q);

}  // namespace weft::cuda
