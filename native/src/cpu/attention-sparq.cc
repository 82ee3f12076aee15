// SparQ approximate decode attention, the CPU reference (the algorithm is stated in cuda/attention-sparq.cuh,
// which the CUDA kernels follow): the same selections (ties to the lower index), fp32 arithmetic, the softmax
// denominators in double. Tokens whose length is at most their k are not touched here: the backend computes them
// with the dense attention first, so they equal it bit for bit.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/convert.h"
#include "cpu/ops.h"

namespace weft::cpu {
namespace {

inline float at(const float* p, int64_t i) { return p[i]; }
inline float at(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

// The n indices of the largest keys[0..m), ties to the lower index, returned in ascending index order.
std::vector<int64_t> top_indices(const std::vector<float>& keys, int64_t n) {
  std::vector<int64_t> idx(keys.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [&](int64_t a, int64_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
  std::nth_element(idx.begin(), idx.begin() + (n - 1), idx.end(), before);
  idx.resize(static_cast<size_t>(n));
  std::sort(idx.begin(), idx.end());
  return idx;
}

template <typename KV>
void sparq_typed(ThreadPool& pool, float* out, const float* q, const KV* k_cache, const KV* v_cache, const KV* k_t,
                 const float* v_sum, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                 const int32_t* sparq_r, const int32_t* sparq_k, int64_t T, int64_t n_heads, int64_t hd,
                 float scale) {
  const int64_t group = n_heads / kv.n_kv, B = kv.block_size;
  pool.parallel_for(T * kv.n_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / kv.n_kv, g = i % kv.n_kv, seq = token_seq[t], len = positions[t] + 1;
      const int64_t r = std::clamp<int64_t>(sparq_r[t], 1, hd), k = std::max<int64_t>(sparq_k[t], 1);
      if (len <= k) continue;  // exact: the dense attention wrote it
      const float* qg = q + (t * n_heads + g * group) * hd;  // the group's heads, [group, hd]
      // 1. columns: the r largest |q| summed over the group
      std::vector<float> abs_q(static_cast<size_t>(hd), 0.0f);
      for (int64_t h = 0; h < group; ++h)
        for (int64_t d = 0; d < hd; ++d) abs_q[d] += std::fabs(qg[h * hd + d]);
      const std::vector<int64_t> cols = top_indices(abs_q, r);
      // 2. approximate logits from those columns of the transposed K, scaled by sqrt(||q||_1 / ||q[cols]||_1)
      std::vector<float> logit(static_cast<size_t>(group * len));
      std::vector<float> lse(static_cast<size_t>(group));
      for (int64_t h = 0; h < group; ++h) {
        const float* qh = qg + h * hd;
        float all = 0, kept = 0;
        for (int64_t d = 0; d < hd; ++d) all += std::fabs(qh[d]);
        for (int64_t c : cols) kept += std::fabs(qh[c]);
        const float c_h = kept > 0 ? scale * std::sqrt(all / kept) : scale;
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < len; ++p) {
          const int64_t base = (static_cast<int64_t>(kv.block_id(seq, p / B)) * kv.n_kv + g) * hd * B + p % B;
          float acc = 0;
          for (int64_t c : cols) acc += qh[c] * at(k_t, base + c * B);  // [nBlocks, nKv, hd, B]
          logit[h * len + p] = acc * c_h;
          max_logit = std::max(max_logit, logit[h * len + p]);
        }
        double z = 0;
        for (int64_t p = 0; p < len; ++p) z += std::exp(logit[h * len + p] - max_logit);
        lse[h] = max_logit + static_cast<float>(std::log(z));
      }
      // 3. rows: the k positions of largest approximate probability summed over the group
      std::vector<float> key(static_cast<size_t>(len), 0.0f);
      for (int64_t h = 0; h < group; ++h)
        for (int64_t p = 0; p < len; ++p) key[p] += std::exp(logit[h * len + p] - lse[h]);
      const std::vector<int64_t> rows = top_indices(key, k);
      // the mean of V over [0, len): whole blocks from v_sum, the rest row by row
      std::vector<float> v_mean(static_cast<size_t>(hd), 0.0f);
      const int64_t full = len / B;
      for (int64_t j = 0; j < full; ++j) {
        const float* s = v_sum + (static_cast<int64_t>(kv.block_id(seq, j)) * kv.n_kv + g) * hd;
        for (int64_t d = 0; d < hd; ++d) v_mean[d] += s[d];
      }
      for (int64_t p = full * B; p < len; ++p) {
        const KV* vr = v_cache + kv.row_of(seq, g, p) * hd;
        for (int64_t d = 0; d < hd; ++d) v_mean[d] += at(vr, d);
      }
      for (int64_t d = 0; d < hd; ++d) v_mean[d] /= static_cast<float>(len);
      // 4-5. exact softmax over the selected rows, blended with the mean by alpha
      std::vector<float> score(static_cast<size_t>(k));
      for (int64_t h = 0; h < group; ++h) {
        const float* qh = qg + h * hd;
        float alpha = 0, max_score = -std::numeric_limits<float>::infinity();
        for (size_t s = 0; s < rows.size(); ++s) {
          alpha += std::exp(logit[h * len + rows[s]] - lse[h]);
          const KV* kr = k_cache + kv.row_of(seq, g, rows[s]) * hd;
          float dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += qh[d] * at(kr, d);
          score[s] = dot * scale;
          max_score = std::max(max_score, score[s]);
        }
        double denom = 0;
        for (size_t s = 0; s < rows.size(); ++s) denom += score[s] = std::exp(score[s] - max_score);
        float* oh = out + (t * n_heads + g * group + h) * hd;
        std::fill(oh, oh + hd, 0.0f);
        for (size_t s = 0; s < rows.size(); ++s) {
          const KV* vr = v_cache + kv.row_of(seq, g, rows[s]) * hd;
          for (int64_t d = 0; d < hd; ++d) oh[d] += score[s] * at(vr, d);
        }
        const float inv_denom = static_cast<float>(1.0 / denom);
        for (int64_t d = 0; d < hd; ++d) oh[d] = alpha * (oh[d] * inv_denom) + (1 - alpha) * v_mean[d];
      }
    }
  });
}

template <typename KV>
void sparq_append_typed(KV* k_t, float* v_sum, const KV* k_cache, const KV* v_cache, const KvBlockTable& kv,
                        const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd) {
  const int64_t B = kv.block_size;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < kv.n_kv; ++g) {
      const int64_t pos = positions[t], o = pos % B;
      const int64_t block = kv.block_id(token_seq[t], pos / B);
      const KV* kr = k_cache + kv.row(block, g, o) * hd;
      for (int64_t d = 0; d < hd; ++d) k_t[((block * kv.n_kv + g) * hd + d) * B + o] = kr[d];
      if (o != B - 1) continue;  // a block's V sum is made once, when its last row is written
      float* s = v_sum + (block * kv.n_kv + g) * hd;
      std::fill(s, s + hd, 0.0f);
      for (int64_t row = 0; row < B; ++row) {
        const KV* vr = v_cache + kv.row(block, g, row) * hd;
        for (int64_t d = 0; d < hd; ++d) s[d] += at(vr, d);
      }
    }
}

}  // namespace

void sparq_attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                     const void* k_t, const float* v_sum, DType kv_dtype, const KvBlockTable& kv,
                     const int32_t* token_seq, const int32_t* positions, const int32_t* sparq_r,
                     const int32_t* sparq_k, int64_t T, int64_t n_heads, int64_t hd, float scale) {
  if (kv_dtype == DType::BF16)
    sparq_typed(pool, out, q, static_cast<const uint16_t*>(k_cache), static_cast<const uint16_t*>(v_cache),
                static_cast<const uint16_t*>(k_t), v_sum, kv, token_seq, positions, sparq_r, sparq_k, T, n_heads, hd,
                scale);
  else
    sparq_typed(pool, out, q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                static_cast<const float*>(k_t), v_sum, kv, token_seq, positions, sparq_r, sparq_k, T, n_heads, hd,
                scale);
}

void sparq_append(void* k_t, float* v_sum, const void* k_cache, const void* v_cache, DType kv_dtype,
                  const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd) {
  if (kv_dtype == DType::BF16)
    sparq_append_typed(static_cast<uint16_t*>(k_t), v_sum, static_cast<const uint16_t*>(k_cache),
                       static_cast<const uint16_t*>(v_cache), kv, token_seq, positions, T, hd);
  else
    sparq_append_typed(static_cast<float*>(k_t), v_sum, static_cast<const float*>(k_cache),
                       static_cast<const float*>(v_cache), kv, token_seq, positions, T, hd);
}

}  // namespace weft::cpu
