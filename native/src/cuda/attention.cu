// Attention: picks the decode (split-K, attention-decode.cu) or prefill (attention-prefill.cu) kernels by the
// number of query tokens, after the checks both share; attention.cuh has the plan.
#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {

int64_t attention_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table,
                                 int64_t n_heads, int num_sms, bool decode_rows) {
  int64_t T = q.dim(0);
  if (!takes_decode_kernel(T, kv_block_table.dim(0), n_heads, decode_rows))
    return detail::attention_prefill_scratch_floats(T, n_heads, kv_block_table.dim(1) * k_cache.dim(2), k_cache.dim(3),
                                                    num_sms);
  return detail::attention_decode_scratch_floats(T, n_heads, k_cache.dim(1), kv_block_table.dim(1) * k_cache.dim(2),
                                                 k_cache.dim(3), num_sms, k_cache.is_kv_quantized());
}

void launch_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads,
                      float scale, const Tensor& out, float* scratch, int num_sms, bool decode_rows) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  int64_t T = q.dim(0), C = kv.capacity(), hd = k_cache.dim(3);
  if (T == 0 || hd == 0) return;
  WEFT_CHECK(C > 0 && kv.n_blocks > 0 && kv.n_seqs > 0, "attention", "kCache ", k_cache, " and kvBlockTable ",
             kv_block_table, " have no positions to attend to");
  WEFT_CHECK(C < (int64_t{1} << 31) && T * n_heads < (int64_t{1} << 31), "attention", "shapes too large (", q, ", ",
             k_cache, ", ", kv_block_table, ")");
  if (takes_decode_kernel(T, kv.n_seqs, n_heads, decode_rows))
    detail::launch_attention_decode(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale,
                                    out, scratch, num_sms);
  else
    detail::launch_attention_prefill(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale,
                                     out, scratch, num_sms);
}

}  // namespace weft::cuda
