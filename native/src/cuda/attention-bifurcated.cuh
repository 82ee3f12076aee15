// Bifurcated decode attention (Backend::attention_bifurcated): the tokens of a prefix group (the n samples of
// one prompt, whose table rows begin with the same blocks) read the shared positions once per step for the whole
// group. Three kernels, as the split-K decode kernel (attention-decode.cu) but over two kinds of task:
//  - prefix: one block per (group, kv head, chunk of P shared positions, tile of query rows) loads each key and
//    value row of the chunk once and scores it against every member x GQA head of the tile: for head dims 64 and
//    128 on tensor cores (attention-bifurcated-prefix.cu: f16 operands, f32 accumulators, up to 64 rows a block),
//    for the others on CUDA cores in fp32 (kRowTile rows);
//  - private: one block per (token, kv head, chunk) over the token's own positions groupShared..positions[t]
//    (every position for a token of no group);
//  - merge: per (token, head) the partials of both, in a fixed order (prefix chunks, then private ones), by
//    their log-sum-exp. The private and merge kernels and the fp32 prefix equal the CPU reference up to
//    summation order; the tensor-core prefix rounds q * scale, k, v and the softmax weights to f16, as the
//    prefill kernel does (ops-check's bound for it is the prefill's).
// Caches f32 or bf16 (WEFT_DISPATCH_KV). Quantized caches (int8/fp8, with scales) enter where the K and V rows
// are loaded: the one `load_as_f32` in each pass of bifurcated_partial, the scales convert_kv_tile takes
// (mma-tile.cuh) in the tensor-core prefix.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// Floats of device scratch the launch needs: the partials of both kinds for every (token, head).
int64_t attention_bifurcated_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table,
                                            const Tensor& group_shared, int64_t n_heads, int num_sms);

// Arguments as Backend::attention_bifurcated (checked there); scratch of attention_bifurcated_scratch_floats.
void launch_attention_bifurcated(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                 const Tensor& token_group, const Tensor& group_shared, int64_t n_heads, float scale,
                                 const Tensor& out, float* scratch, int num_sms);

namespace detail {
// The prefix kernel alone (no private or merge kernel), its partials into scratch: benchmarks time it to see
// whether it is bound by bytes.
void launch_attention_bifurcated_prefix(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                        const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                        const Tensor& token_group, const Tensor& group_shared, int64_t n_heads,
                                        float scale, float* scratch, int num_sms);
}  // namespace detail

}  // namespace weft::cuda
