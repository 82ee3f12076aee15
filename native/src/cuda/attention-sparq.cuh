// SparQ approximate decode attention (arXiv 2312.04985, Algorithm 1), with the selection shared by a GQA group.
// Per token t (length len = positions[t] + 1, r = sparqR[t] columns, k = sparqK[t] rows) and kv head g, whose
// group has the query heads h = g p .. g p + p - 1:
//  0. len <= k: the exact attention (every position selected, alpha = 1, no mean term).
//  1. columns: the r indices of the largest a[i] = sum over the group of |q_h[i]|, ties to the lower index.
//  2. approximate logits over all positions from those columns of K only, read from kT (K transposed within each
//     block, so a column of a block is B contiguous elements): s_h[p] = c_h sum_i q_h[i] K[p][i] with
//     c_h = scale sqrt(||q_h||_1 / ||q_h[cols]||_1) (scale = 1 / sqrt(hd): the paper's temperature
//     sqrt(hd ||q[cols]||_1 / ||q||_1)); shat_h = softmax(s_h) over [0, len).
//  3. rows: the k positions of the largest key[p] = sum over the group of shat_h[p], ties to the lower index;
//     alpha_h = the sum of shat_h over them.
//  4. y_h = exact softmax(q_h . K[p] scale) over the selected rows, times V.
//  5. out_h = alpha_h y_h + (1 - alpha_h) vmean, vmean the mean of V over [0, len): the full blocks' sums from
//     vSum (kept by sparq_append), the rows of the last, partial block from the V cache.
// Why one selection per group: every head of the group then reads the same r columns and k rows of its kv head,
// so a GQA model moves the bytes of an MHA model with nKv heads (the point of SparQ is the bytes); per-head
// selections would read up to p times as many rows. The paper's GQA variant does the same sums. Tensor
// parallelism needs nothing: each rank runs this on its own heads. Several tokens of one sequence in a step
// (speculative verification) each get their own selection over their own length.
//
// One kernel (batch of at most kSparqMaxTokens tokens; every length is read on the device, so a captured graph stays
// valid): a thread-block cluster per (token, kv head) whose blocks each own a slice of the positions: steps 1-3
// with the logits and keys in shared memory, the softmax normalizers, the radix select of the k-th largest key
// (each block's bins summed over the cluster), the rows in index order, alpha and the V mean; then each block takes
// a share of the selected rows (step 4: on tensor cores for bf16 caches, GQA groups of 2-4 and head dims 64 and
// 128, else on CUDA cores) and the cluster merges the shares through distributed shared memory and blends (step 5).
// The CPU reference is cpu/attention-sparq.cc; ops-check.cc compares the two.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

constexpr int64_t kSparqMaxTokens = 64;
constexpr int64_t kSparqMaxGroup = 8;  // query heads per kv head the kernels keep in registers

// Floats of device scratch launch_sparq_attention needs.
int64_t sparq_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, int64_t n_heads);

// In place, after the caches hold the step's rows: kT [nBlocks, nKv, hd, B] gets each token's K row; vSum
// [nBlocks, nKv, hd] f32 is remade from the V cache for a block whose last row a token wrote.
void launch_sparq_append(const Ctx& ctx, const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache,
                         const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                         const Tensor& positions);

// out [T, nH * hd] as above. r is clamped to [1, hd] and k to >= 1 on the device (the API refuses other values).
void launch_sparq_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& k_t, const Tensor& v_sum, const Tensor& token_seq,
                            const Tensor& kv_block_table, const Tensor& positions, const Tensor& sparq_r,
                            const Tensor& sparq_k, int64_t n_heads, float scale, const Tensor& out, float* scratch);

}  // namespace weft::cuda
