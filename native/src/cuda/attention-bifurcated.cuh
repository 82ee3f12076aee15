// Bifurcated decode attention (Backend::attention_bifurcated): the tokens of a prefix group (the n samples of
// one prompt, whose table rows begin with the same blocks) read the shared positions once per step for the whole
// group. As the split-K decode kernel, over two kinds of task, then a merge:
//  - prefix: a block per (group, kv head, tile of query rows, part of the shared positions) loads each key and
//    value row once and scores it against every member x GQA head of the tile;
//  - private: a block per (token, kv head, part of its own positions groupShared..positions[t]; every position for
//    a token of no group);
//  - merge: per (token, head) the partials of both, in a fixed order (prefix parts, then private ones), by their
//    log-sum-exp.
// bf16 caches at head dims 64 and 128 run on tensor cores (attention-bifurcated-mma.cu: both kinds of task in one
// kernel on the decode kernel's plan and tiles; f16 operands, f32 accumulators: within the prefill's bound, 1e-3,
// in ops-check); f32 caches and other head dims on CUDA cores in fp32 (attention-bifurcated.cu: the CPU
// reference up to summation order). Quantized caches (int8/fp8, with scales) would enter where the K and V rows are
// loaded: the one `load_as_f32` in each pass of bifurcated_partial, and the tensor-core kernel's staged tiles (as
// attention-decode-mma.cu converts codes).
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
