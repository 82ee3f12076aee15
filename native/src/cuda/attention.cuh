// attention: q [T, nH * hd] over caches [nBlocks, nKv, B, hd] f32 or bf16, or fp8 / int8 codes with their row
// scales (kv-quant.h; dequantized in registers, never in memory), addressed through tokenSeq [T] and
// kvBlockTable [S, maxBlocksPerSeq] (kv-block-table.h); tokenSeq, the table and positions are read on the
// device, so a captured graph stays valid as they change. Each kernel looks a key row's block up once per row
// (and tile), never per element, so any B >= 1 works and one block per sequence runs as fast as before. C below
// is a sequence's capacity, maxBlocksPerSeq * B. Two kernels, chosen by the step's shape (takes_decode_kernel):
//  - decode (T <= kDecodeMaxTokens, or a decode batch of any size): split-K flash-decoding (attention-decode.cuh
//    has the plan). Each token's positions are cut into the same number of partitions of whole 32-row tiles (the
//    count from the shapes only);
//    one block per (token, kv head, partition) serves the whole GQA group of query heads from one read of its K/V
//    rows, which stream through shared memory by cp.async while the previous tile is used; a second kernel merges
//    the partitions (max / sum / partial output, in a fixed order: same bits every replay). bf16, fp8 and int8
//    caches at head dims 64, 128 and 256 run on tensor cores (attention-decode-mma.cu), f32 caches and other head
//    dims (multiples of 8) on CUDA cores (attention-decode.cu).
//  - prefill (the other steps): FlashAttention-2 on tensor cores (mma.sync m16n8k16, f16 operands, f32 softmax and
//    accumulators) for head dims 64 and 128: blocks of 64 query tokens x one head, K/V tiles of 64 positions
//    fetched (cp.async) while the previous one is used, converted to f16 once per block; causal through
//    positions; a tile whose tokens belong to several sequences runs once per sequence. Other head dims
//    (<= 256): the same plan on CUDA cores in fp32 (tiles of 16 query tokens). Results differ from the fp32 CPU reference by the
//    f16 rounding of q, k, v and p (about 1e-4 to 1e-3 of max|out|; attention-bench.cu, ops-check.cc).
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

constexpr int64_t kDecodeMaxTokens = 64;

// Whether a step of T query tokens over a table of S sequence rows runs on the decode kernel: up to
// kDecodeMaxTokens tokens, or a decode batch of any size (one table row per token, as a decode step of S
// sequences has: a graph's padding rows are sequences of their own). The prefill kernel serves a 64-token tile's
// sequences one pass each, so 256 decode tokens would be 4 tiles a head, each walking 64 sequences' keys in turn;
// the decode kernel gives every token its own blocks. decode_rows: the caller knows each token is its sequence's
// only one in the launch (a mixed step's decode rows, Backend::attention), as T == S says of a whole step. Either
// kernel is exact for any batch: this is a speed choice. The bound on T * n_heads keeps the decode grid's rows
// (T * nKv * head chunks) within a grid's 65535.
inline bool takes_decode_kernel(int64_t T, int64_t S, int64_t n_heads, bool decode_rows = false) {
  return T <= kDecodeMaxTokens || ((T == S || decode_rows) && T * n_heads <= 65535);
}

// Floats of device scratch the launch needs (the prefill kernel: its key splits' partials, or 0).
int64_t attention_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table,
                                 int64_t n_heads, int num_sms, bool decode_rows = false);

void launch_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads,
                      float scale, const Tensor& out, float* scratch, int num_sms, bool decode_rows = false);

namespace detail {
// The two halves launch_attention picks between (attention-decode.cu, attention-prefill.cu), after its checks.
// quantized: a 1-byte KV cache (fp8 or int8 with its scales).
int64_t attention_decode_scratch_floats(int64_t T, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms,
                                        bool quantized);
void launch_attention_decode(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                             int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms);
// The tensor-core prefill kernel's splits of the key range (1: none) for T query tokens, n_heads heads and a
// capacity of C positions, and the floats of scratch their partials take.
int prefill_key_splits(int64_t T, int64_t n_heads, int64_t C, int64_t hd, int num_sms);
int64_t attention_prefill_scratch_floats(int64_t T, int64_t n_heads, int64_t C, int64_t hd, int num_sms);
// scratch: attention_prefill_scratch_floats of them, or null (no split).
void launch_attention_prefill(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                              int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms);
// The fp32 CUDA-core prefill kernel whatever the head dim (the fallback above; bench/kernels/attention-bench.cu
// compares against it).
void launch_attention_prefill_fp32(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                   const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                   int64_t n_heads, float scale, const Tensor& out);
}  // namespace detail

}  // namespace weft::cuda
