// The CPU reference kernels: plain loops over raw host pointers, fp32 arithmetic. Arguments were checked by
// Backend (backend.cc) and the index checks in backend-cpu.cc; these functions assume they fit.
// Weights (`w`, `table`, `weight`) may be f32, f16 or bf16 and are widened as they are read.
#pragma once

#include <cstdint>

#include "backend.h"
#include "cpu/quant.h"
#include "cpu/thread-pool.h"
#include "kv-block-table.h"
#include "tensor.h"

namespace weft::cpu {

// out [T, H] = table [Vr, H] row ids[t] - vocab_start, or zeros when that row is outside the table.
void embedding(float* out, const void* table, DType table_dtype, int64_t Vr, int64_t H, const int32_t* ids,
               int64_t T, int64_t vocab_start);

// out [T, H] = x / sqrt(mean(x^2) + eps) * weight[H].
void rms_norm(float* out, const float* x, const void* weight, DType weight_dtype, int64_t T, int64_t H, float eps);

// out [T, N] = x [T, K] @ w [N, K]^T over any weight (dense or quantized, quant.h), each row widened to fp32
// once; threaded over N.
void matmul(ThreadPool& pool, float* out, const float* x, const WeightRows& w, int64_t T, int64_t K, int64_t N);

void add(float* out, const float* a, const float* b, int64_t n);

// sum [T, H] = x + y; normed [T, H] = rms_norm(sum) (add, then rms_norm, in one loop).
void add_rms_norm(float* sum, float* normed, const float* x, const float* y, const void* weight, DType weight_dtype,
                  int64_t T, int64_t H, float eps);

// x, out [T, width], width = nHeads * head_dim; HF rotate_half per head.
void rope(float* out, const float* x, const int32_t* positions, const float* inv_freq, int64_t T, int64_t width,
          int64_t head_dim);

// The KV ops: caches [nBlocks, nKv, B, hd] of kv_dtype (f32, or bf16: written rounded to nearest even,
// bf16-round.h, and widened to f32 as read; or fp8 / i8 codes with k_scales, v_scales [nBlocks, nKv, B] f32,
// kv-quant.h) addressed through kv (kv-block-table.h); token_seq, positions [T].
// k, v [T, nKv * hd] into the cache rows of (token_seq[t], positions[t]).
void write_kv(void* k_cache, void* v_cache, DType kv_dtype, const float* k, const float* v, const KvBlockTable& kv,
              const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd, float* k_scales = nullptr,
              float* v_scales = nullptr);

// qkv [T, (nH + 2 nKv) hd] -> q [T, nH * hd] = rope(q heads); the caches get rope(k heads) and the v heads at
// the rows of (token_seq[t], positions[t]) (rope and write_kv in one loop).
void qkv_rope(float* q, void* k_cache, void* v_cache, DType kv_dtype, const float* qkv, const int32_t* positions,
              const float* inv_freq, const KvBlockTable& kv, const int32_t* token_seq, int64_t T, int64_t n_heads,
              int64_t hd, float* k_scales = nullptr, float* v_scales = nullptr);

// out, q [T, nH * hd]; query t attends over positions 0..positions[t] of sequence row token_seq[t]; threaded
// over T x nH.
void attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache, DType kv_dtype,
               const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions, int64_t T,
               int64_t n_heads, int64_t hd, float scale, const float* k_scales = nullptr,
               const float* v_scales = nullptr);

// SparQ (cpu/attention-sparq.cc; the algorithm in cuda/attention-sparq.cuh): out for the tokens whose length
// exceeds their k (the others are left as they are); k_t [nBlocks, nKv, hd, B] of kv_dtype, v_sum [nBlocks, nKv, hd].
void sparq_attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                     const void* k_t, const float* v_sum, DType kv_dtype, const KvBlockTable& kv,
                     const int32_t* token_seq, const int32_t* positions, const int32_t* sparq_r,
                     const int32_t* sparq_k, int64_t T, int64_t n_heads, int64_t hd, float scale);
// Copies each token's K cache rows into k_t, and remakes a block's V sum when its last row is written.
void sparq_append(void* k_t, float* v_sum, const void* k_cache, const void* v_cache, DType kv_dtype,
                  const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd);
// A layer's Sage state slots (sage-state.h) as the CPU reference keeps them: the header and the means (it quantizes
// every block again from the kept mean, which gives the blocks the CUDA kernels keep).
struct SageStateView {
  int32_t* header;       // [n_slots, 2]
  float* means;          // [n_slots, nKv, hd]
  const int32_t* slots;  // [S, 3]
  int64_t n_slots, nb_max;
};
// SageAttention-style quantized attention (cpu/attention-sage.cc; the algorithm in cuda/attention-sage.cuh): out for
// every token, P V in e4m3 when fp8, else f16; state: the rows' slots, or null.
void sage_attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                    DType kv_dtype, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                    int64_t T, int64_t n_heads, int64_t hd, float scale, bool fp8, const float* k_scales = nullptr,
                    const float* v_scales = nullptr, const SageStateView* state = nullptr);
// The slots that start afresh, emptied (a short step with state: it attends exactly).
void sage_state_reset(const SageStateView& state, int64_t n_seqs);

// gate_up [T, 2F] -> out [T, F].
void silu_mul(float* out, const float* gate_up, int64_t T, int64_t F);

// Row-wise byte copies: out row t = x row rows[t] (gather), columns of several inputs side by side (concat).
void copy_cols(uint8_t* out, int64_t out_row_bytes, int64_t out_offset_bytes, const uint8_t* x, int64_t x_row_bytes,
               int64_t x_offset_bytes, int64_t T, int64_t n_bytes);
void gather_rows(uint8_t* out, const uint8_t* x, int64_t row_bytes, const int32_t* rows, int64_t R);

// out [T, N] = sum over j of weights [T, k] * y [T * k, N] row t k + j, in j order.
void combine_experts(float* out, const float* y, const float* weights, int64_t T, int64_t k, int64_t N);

// Per row of logits [R, V].
void log_softmax(float* out, const float* logits, int64_t R, int64_t V);
void logprobs(float* out, const float* logits, const int32_t* ids, int64_t R, int64_t V);
void sample(int32_t* out, const float* logits, const SampleArgs& args, int64_t R, int64_t V);
// max and log(sum(exp(row - max))) of one row of V, the sum in double (log_softmax's denominator).
void log_sum_exp(const float* row, int64_t V, float* max_out, float* log_sum_out);
// out [Q, 1 + 2k] per row r = rows[q] of logits [R, V] (cpu/logprobs.cc): log p(ids[r]), then the k most likely
// ids (as floats), then their log-probs; highest first, ties to the lower id.
void top_logprobs(float* out, const float* logits, const int32_t* rows, const int32_t* ids, int64_t Q, int64_t V,
                  int64_t k);

// out [n] of dtype (f32/f16/bf16) = uniform_value(seed, i, scale) (random-hash.h), narrow dtypes toward zero.
void random_uniform(void* out, DType dtype, int64_t n, uint64_t seed, float scale);

}  // namespace weft::cpu
