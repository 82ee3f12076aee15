// Bifurcated decode attention, the fp32 reference (attention-bifurcated.h). A token of a prefix group reads its
// group's shared positions through the table row of the group's first member, then its own positions through
// its own row; each range gives a softmax partial (max, sum of exp, unnormalised output) and the two merge by
// their log-sum-exp. The CPU computes each (token, head) on its own: the sharing that saves bytes is the CUDA
// kernel's (cuda/attention-bifurcated.cu); this says what it must equal.
#include "cpu/attention-bifurcated.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "error.h"

namespace weft::cpu {
namespace {

// A cache row as f32 (f32 rows in place, bf16 rows widened into buf).
inline const float* row_f32(const float* src, int64_t, float*) { return src; }
inline const float* row_f32(const uint16_t* src, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(src[i]);
  return buf;
}

// The softmax partial of one query row over positions [lo, hi) of sequence row seq: max score m, sum l of
// exp(score - m) (double, as cpu::attention's denominator), o = sum of exp(score - m) * v (unnormalised).
struct Partial {
  float m = -std::numeric_limits<float>::infinity();
  double l = 0;
};

template <typename KV>
Partial partial(const float* qh, const KV* k_cache, const KV* v_cache, const KvBlockTable& kv, int64_t seq,
                int64_t kv_head, int64_t lo, int64_t hi, int64_t hd, float scale, float* o, std::vector<float>& score,
                std::vector<float>& buf) {
  Partial p;
  std::fill(o, o + hd, 0.0f);
  if (hi <= lo) return p;
  for (int64_t pos = lo; pos < hi; ++pos) {
    const float* kr = row_f32(k_cache + kv.row_of(seq, kv_head, pos) * hd, hd, buf.data());
    float s = 0;
    for (int64_t d = 0; d < hd; ++d) s += qh[d] * kr[d];
    score[pos - lo] = s * scale;
    p.m = std::max(p.m, score[pos - lo]);
  }
  for (int64_t pos = lo; pos < hi; ++pos) {
    const float e = std::exp(score[pos - lo] - p.m);
    p.l += e;
    const float* vr = row_f32(v_cache + kv.row_of(seq, kv_head, pos) * hd, hd, buf.data());
    for (int64_t d = 0; d < hd; ++d) o[d] += e * vr[d];
  }
  return p;
}

template <typename KV>
void attention_bifurcated_typed(ThreadPool& pool, float* out, const float* q, const KV* k_cache, const KV* v_cache,
                                const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                                const int32_t* token_group, const int32_t* group_shared, int64_t T, int64_t n_heads,
                                int64_t hd, float scale) {
  const int64_t group = n_heads / kv.n_kv;
  // per token of a group: the sequence row its shared positions are read from, its group's first member's
  std::vector<int64_t> leader(static_cast<size_t>(T), -1);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t g = token_group[t];
    if (g < 0) continue;
    for (int64_t u = 0; u <= t; ++u)
      if (token_group[u] == g) {
        leader[t] = token_seq[u];
        break;
      }
  }
  int64_t longest = 1;
  for (int64_t t = 0; t < T; ++t) longest = std::max<int64_t>(longest, positions[t] + 1);
  pool.parallel_for(T * n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(static_cast<size_t>(longest)), buf(static_cast<size_t>(hd)), o_own(static_cast<size_t>(hd));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / n_heads, h = i % n_heads, kv_head = h / group, len = positions[t] + 1;
      const int64_t shared = token_group[t] < 0 ? 0 : group_shared[token_group[t]];
      const float* qh = q + i * hd;
      float* oh = out + i * hd;
      Partial a = partial(qh, k_cache, v_cache, kv, leader[t] < 0 ? token_seq[t] : leader[t], kv_head, 0, shared, hd,
                          scale, oh, score, buf);
      Partial b = partial(qh, k_cache, v_cache, kv, token_seq[t], kv_head, shared, len, hd, scale, o_own.data(), score,
                          buf);
      const float m = std::max(a.m, b.m);  // finite: len >= 1 positions in all
      const double wa = a.l > 0 ? std::exp(a.m - m) : 0, wb = b.l > 0 ? std::exp(b.m - m) : 0;
      const double inv = 1.0 / (wa * a.l + wb * b.l);
      for (int64_t d = 0; d < hd; ++d) oh[d] = static_cast<float>((wa * oh[d] + wb * o_own[d]) * inv);
    }
  });
}

}  // namespace

void check_prefix_groups(const char* op, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                         const int32_t* token_group, int64_t T, const int32_t* group_shared, int64_t G) {
  for (int64_t g = 0; g < G; ++g)
    WEFT_CHECK(group_shared[g] >= 0, op, "groupShared[", g, "] = ", group_shared[g], " is negative");
  std::vector<int64_t> first(static_cast<size_t>(G), -1);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t g = token_group[t];
    WEFT_CHECK(g >= -1 && g < G, op, "tokenGroup[", t, "] = ", g, " is not -1 or a group below ", G);
    if (g < 0) continue;
    const int64_t shared = group_shared[g];
    WEFT_CHECK(shared <= positions[t] + 1, op, "groupShared[", g, "] = ", shared, " is past position ", positions[t],
               " of its member token ", t);
    if (first[g] < 0) {
      first[g] = t;
      continue;
    }
    const int64_t lead = token_seq[first[g]];
    for (int64_t j = 0; j * kv.block_size < shared; ++j)
      WEFT_CHECK(kv.block_id(token_seq[t], j) == kv.block_id(lead, j), op, "token ", t, " of group ", g,
                 " holds block ", kv.block_id(token_seq[t], j), " as its block ", j, ", its group's first member (token ",
                 first[g], ") block ", kv.block_id(lead, j), ": the shared ", shared, " positions are not shared");
  }
}

void attention_bifurcated(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                          DType kv_dtype, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                          const int32_t* token_group, const int32_t* group_shared, int64_t T, int64_t n_heads,
                          int64_t hd, float scale) {
  if (kv_dtype == DType::BF16)
    attention_bifurcated_typed(pool, out, q, static_cast<const uint16_t*>(k_cache),
                               static_cast<const uint16_t*>(v_cache), kv, token_seq, positions, token_group,
                               group_shared, T, n_heads, hd, scale);
  else
    attention_bifurcated_typed(pool, out, q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                               kv, token_seq, positions, token_group, group_shared, T, n_heads, hd, scale);
}

}  // namespace weft::cpu
