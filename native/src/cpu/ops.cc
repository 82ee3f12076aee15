// CPU reference kernels (llama2.c style): one plain loop nest per op, fp32 arithmetic, reductions that need
// it (norms, softmax denominators) accumulated in double. Read these to know what an op means; the CUDA
// kernels must agree with them within each op's stated tolerance.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bf16-round.h"
#include "cpu/convert.h"
#include "kv-quant.h"
#include "random-hash.h"
#include "sample-rule.h"

namespace weft::cpu {
namespace {

// Dot product with 8 independent partial sums, so that -O3 vectorises it without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// HF rotate_half of one head: pairs (j, j + half), not (2j, 2j + 1).
inline void rotate_half(float* out, const float* x, const float* cos_a, const float* sin_a, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    float x1 = x[j], x2 = x[j + half];
    out[j] = x1 * cos_a[j] - x2 * sin_a[j];
    out[j + half] = x2 * cos_a[j] + x1 * sin_a[j];
  }
}

// cos and sin of position * inv_freq[j], j < half: the angle in fp32, as HF's inv_freq @ position_ids.
inline void rope_angles(int32_t position, const float* inv_freq, int64_t half, float* cos_a, float* sin_a) {
  for (int64_t j = 0; j < half; ++j) {
    float angle = static_cast<float>(position) * inv_freq[j];
    cos_a[j] = std::cos(angle);
    sin_a[j] = std::sin(angle);
  }
}

}  // namespace

void embedding(float* out, const void* table, DType table_dtype, int64_t Vr, int64_t H, const int32_t* ids,
               int64_t T, int64_t vocab_start) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t row = static_cast<int64_t>(ids[t]) - vocab_start;  // this rank's slice of the vocabulary
    if (row >= 0 && row < Vr)
      to_f32(table, table_dtype, row * H, H, out + t * H);
    else
      std::fill(out + t * H, out + (t + 1) * H, 0.0f);
  }
}

void rms_norm(float* out, const float* x, const void* weight, DType weight_dtype, int64_t T, int64_t H, float eps) {
  std::vector<float> w(static_cast<size_t>(H));
  to_f32(weight, weight_dtype, 0, H, w.data());
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * H;
    double sum_sq = 0;
    for (int64_t i = 0; i < H; ++i) sum_sq += static_cast<double>(xt[i]) * xt[i];
    float mean_sq = H > 0 ? static_cast<float>(sum_sq / static_cast<double>(H)) : 0.0f;
    float inv_rms = 1.0f / std::sqrt(mean_sq + eps);  // HF: x * torch.rsqrt(variance + eps), then * weight
    for (int64_t i = 0; i < H; ++i) out[t * H + i] = (xt[i] * inv_rms) * w[i];
  }
}

void matmul(ThreadPool& pool, float* out, const float* x, const WeightRows& w, int64_t T, int64_t K, int64_t N) {
  int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, T * K));  // ~64K multiply-adds per chunk
  const bool widen = w.dtype != DType::F32;
  pool.parallel_for(N, grain, [&](int64_t n_begin, int64_t n_end) {
    // A narrow or quantized weight row is widened once and reused for all T tokens.
    std::vector<float> row(widen ? static_cast<size_t>(K) : 0);
    for (int64_t n = n_begin; n < n_end; ++n) {
      const float* wn;
      if (!widen) {
        wn = static_cast<const float*>(w.data) + n * K;
      } else {
        weight_row_f32(w, n, K, row.data());
        wn = row.data();
      }
      for (int64_t t = 0; t < T; ++t) out[t * N + n] = dot(x + t * K, wn, K);
    }
  });
}

void add(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void add_rms_norm(float* sum, float* normed, const float* x, const float* y, const void* weight, DType weight_dtype,
                  int64_t T, int64_t H, float eps) {
  std::vector<float> w(static_cast<size_t>(H));
  to_f32(weight, weight_dtype, 0, H, w.data());
  for (int64_t t = 0; t < T; ++t) {
    float* st = sum + t * H;
    double sum_sq = 0;
    for (int64_t i = 0; i < H; ++i) {
      st[i] = x[t * H + i] + y[t * H + i];  // add
      sum_sq += static_cast<double>(st[i]) * st[i];
    }
    float mean_sq = H > 0 ? static_cast<float>(sum_sq / static_cast<double>(H)) : 0.0f;  // then rms_norm
    float inv_rms = 1.0f / std::sqrt(mean_sq + eps);
    for (int64_t i = 0; i < H; ++i) normed[t * H + i] = (st[i] * inv_rms) * w[i];
  }
}

void rope(float* out, const float* x, const int32_t* positions, const float* inv_freq, int64_t T, int64_t width,
          int64_t head_dim) {
  int64_t half = head_dim / 2;
  std::vector<float> cos_a(static_cast<size_t>(half)), sin_a(static_cast<size_t>(half));
  for (int64_t t = 0; t < T; ++t) {
    rope_angles(positions[t], inv_freq, half, cos_a.data(), sin_a.data());
    for (int64_t h = 0; h < width / head_dim; ++h)
      rotate_half(out + t * width + h * head_dim, x + t * width + h * head_dim, cos_a.data(), sin_a.data(), half);
  }
}

namespace {

// The KV cache's rows, by row index (kv-block-table.h, in units of hd elements): f32, bf16 (uint16_t bits) written
// rounded to nearest even (bf16-round.h) and read exactly, or 1-byte codes (uint8_t e4m3, int8_t int8) with one
// scale per row (kv-quant.h) read as code * scale. Every read converts to f32 and the arithmetic is the f32 path's.
template <typename KV>
struct KvRows {
  KV* cache;      // [rows, hd]
  float* scales;  // [rows] for the 1-byte codes, else null
  int64_t hd;

  void store(int64_t row, const float* src) const {
    KV* dst = cache + row * hd;
    if constexpr (std::is_same_v<KV, float>)
      std::memcpy(dst, src, static_cast<size_t>(hd) * sizeof(float));
    else if constexpr (std::is_same_v<KV, uint16_t>)
      for (int64_t i = 0; i < hd; ++i) dst[i] = f32_to_bf16_rn(src[i]);
    else
      scales[row] = kv_quantize_row(src, hd, dst);
  }
  // The row as f32: an f32 row in place, others widened into buf.
  const float* load(int64_t row, float* buf) const {
    const KV* src = cache + row * hd;
    if constexpr (std::is_same_v<KV, float>) {
      return src;
    } else if constexpr (std::is_same_v<KV, uint16_t>) {
      for (int64_t i = 0; i < hd; ++i) buf[i] = bf16_to_f32(src[i]);
    } else {
      const float scale = scales[row];
      for (int64_t i = 0; i < hd; ++i) buf[i] = kv_dequantize(src[i], scale);
    }
    return buf;
  }
};

// Runs f with the k and v caches as KvRows of their element type: float for f32, uint16_t for bf16, uint8_t for
// fp8, int8_t for i8 (backend.cc checked it).
template <typename F>
void with_kv_rows(DType kv_dtype, const void* k_cache, const void* v_cache, const float* k_scales,
                  const float* v_scales, int64_t hd, F&& f) {
  auto run = [&](auto tag) {
    using KV = decltype(tag);
    f(KvRows<KV>{static_cast<KV*>(const_cast<void*>(k_cache)), const_cast<float*>(k_scales), hd},
      KvRows<KV>{static_cast<KV*>(const_cast<void*>(v_cache)), const_cast<float*>(v_scales), hd});
  };
  if (kv_dtype == DType::BF16)
    run(uint16_t{});
  else if (kv_dtype == DType::FP8)
    run(uint8_t{});
  else if (kv_dtype == DType::I8)
    run(int8_t{});
  else
    run(float{});
}

template <typename KV>
void write_kv_typed(const KvRows<KV>& k_rows, const KvRows<KV>& v_rows, const float* k, const float* v,
                    const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < kv.n_kv; ++h) {
      int64_t dst = kv.row_of(token_seq[t], h, positions[t]);  // [nBlocks, nKv, B] rows of hd
      int64_t src = (t * kv.n_kv + h) * hd;                   // [T, nKv * hd]
      k_rows.store(dst, k + src);
      v_rows.store(dst, v + src);
    }
}

template <typename KV>
void qkv_rope_typed(float* q, const KvRows<KV>& k_rows, const KvRows<KV>& v_rows, const float* qkv,
                    const int32_t* positions, const float* inv_freq, const KvBlockTable& kv, const int32_t* token_seq,
                    int64_t T, int64_t n_heads, int64_t hd) {
  const int64_t n_kv = kv.n_kv, half = hd / 2, width = (n_heads + 2 * n_kv) * hd;
  std::vector<float> cos_a(static_cast<size_t>(half)), sin_a(static_cast<size_t>(half)), k_row(static_cast<size_t>(hd));
  for (int64_t t = 0; t < T; ++t) {
    rope_angles(positions[t], inv_freq, half, cos_a.data(), sin_a.data());
    const float* row = qkv + t * width;
    for (int64_t h = 0; h < n_heads; ++h)  // q heads: rotated
      rotate_half(q + (t * n_heads + h) * hd, row + h * hd, cos_a.data(), sin_a.data(), half);
    for (int64_t h = 0; h < n_kv; ++h) {  // k heads: rotated, then stored; v heads: stored
      const int64_t dst = kv.row_of(token_seq[t], h, positions[t]);
      rotate_half(k_row.data(), row + (n_heads + h) * hd, cos_a.data(), sin_a.data(), half);
      k_rows.store(dst, k_row.data());
      v_rows.store(dst, row + (n_heads + n_kv + h) * hd);
    }
  }
}

// Each query (token t, head h) attends as the plain loop does: its scores in position order, their maximum, exp and
// the denominator in double, then the value rows summed in position order. The loops run position-outermost over a
// tile of queries that read the same rows (up to kTokenTile consecutive tokens of one sequence, times the query
// heads of one KV head), so each key and value row is loaded once a tile instead of once a query (a prefill chunk at
// long context was bound by re-reading the cache); each query's arithmetic, and so its output, is unchanged. A
// tile's scores are held whole: fewer tokens a tile where they would pass kTileScores floats (16 MiB a thread).
constexpr int64_t kTokenTile = 16, kTileScores = int64_t{4} << 20;

template <typename KV>
void attention_typed(ThreadPool& pool, float* out, const float* q, const KvRows<KV>& k_rows,
                     const KvRows<KV>& v_rows, const KvBlockTable& kv, const int32_t* token_seq,
                     const int32_t* positions, int64_t T, int64_t n_heads, int64_t hd, float scale) {
  const int64_t group = n_heads / kv.n_kv;  // query heads per kv head (GQA)
  int64_t longest_all = 1;
  for (int64_t t = 0; t < T; ++t) longest_all = std::max<int64_t>(longest_all, positions[t] + 1);
  const int64_t token_tile = std::clamp<int64_t>(kTileScores / (longest_all * group), 1, kTokenTile);
  std::vector<int64_t> run_start;  // runs of consecutive tokens of one sequence, at most token_tile long
  for (int64_t t = 0; t < T; ++t)
    if (t == 0 || token_seq[t] != token_seq[t - 1] || t - run_start.back() == token_tile) run_start.push_back(t);
  run_start.push_back(T);
  const int64_t n_runs = static_cast<int64_t>(run_start.size()) - 1;
  // A tile takes the KV head's whole group of query heads where that leaves the pool enough tiles, else one head
  // (one decode token has n_kv tiles of a group, or n_heads of one).
  const int64_t heads = n_runs * kv.n_kv >= 2 * pool.size() ? group : 1, tiles_a_run = n_heads / heads;
  pool.parallel_for(n_runs * tiles_a_run, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score, max_score, row_buf(static_cast<size_t>(hd));
    std::vector<double> denom;
    std::vector<int64_t> rows, len;  // cache row of each position (once per key row); each query's length
    std::vector<const float*> qs;
    std::vector<float*> outs;
    for (int64_t i = begin; i < end; ++i) {
      // queries (t, h0 + j) for t in [t0, t1), j < heads, as qi = (t - t0) heads + j
      const int64_t t0 = run_start[i / tiles_a_run], t1 = run_start[i / tiles_a_run + 1];
      const int64_t h0 = (i % tiles_a_run) * heads, nq = (t1 - t0) * heads;
      len.resize(static_cast<size_t>(nq));
      qs.resize(static_cast<size_t>(nq));
      outs.resize(static_cast<size_t>(nq));
      int64_t longest = 1;
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t t = t0 + qi / heads, h = h0 + qi % heads;
        len[qi] = positions[t] + 1;  // positions 0..positions[t]; later ones are not read
        qs[qi] = q + (t * n_heads + h) * hd;
        outs[qi] = out + (t * n_heads + h) * hd;
        longest = std::max(longest, len[qi]);
      }
      rows.resize(static_cast<size_t>(longest));
      for (int64_t p = 0; p < longest; ++p) rows[p] = kv.row_of(token_seq[t0], h0 / group, p);
      score.resize(static_cast<size_t>(nq * longest));
      max_score.assign(static_cast<size_t>(nq), -std::numeric_limits<float>::infinity());
      for (int64_t p = 0; p < longest; ++p) {
        const float* kr = k_rows.load(rows[p], row_buf.data());
        for (int64_t qi = 0; qi < nq; ++qi) {
          if (p >= len[qi]) continue;
          const float s = dot(qs[qi], kr, hd) * scale;
          score[qi * longest + p] = s;
          max_score[qi] = std::max(max_score[qi], s);
        }
      }
      denom.assign(static_cast<size_t>(nq), 0.0);
      for (int64_t qi = 0; qi < nq; ++qi) {
        float* sq = score.data() + qi * longest;
        for (int64_t p = 0; p < len[qi]; ++p) {
          sq[p] = std::exp(sq[p] - max_score[qi]);
          denom[qi] += sq[p];
        }
        std::fill(outs[qi], outs[qi] + hd, 0.0f);
      }
      for (int64_t p = 0; p < longest; ++p) {
        const float* vr = v_rows.load(rows[p], row_buf.data());
        for (int64_t qi = 0; qi < nq; ++qi) {
          if (p >= len[qi]) continue;
          const float w = score[qi * longest + p];
          float* oh = outs[qi];
          for (int64_t d = 0; d < hd; ++d) oh[d] += w * vr[d];
        }
      }
      for (int64_t qi = 0; qi < nq; ++qi) {
        const float inv_denom = static_cast<float>(1.0 / denom[qi]);
        for (int64_t d = 0; d < hd; ++d) outs[qi][d] *= inv_denom;
      }
    }
  });
}

}  // namespace

void write_kv(void* k_cache, void* v_cache, DType kv_dtype, const float* k, const float* v, const KvBlockTable& kv,
              const int32_t* token_seq, const int32_t* positions, int64_t T, int64_t hd, float* k_scales,
              float* v_scales) {
  with_kv_rows(kv_dtype, k_cache, v_cache, k_scales, v_scales, hd, [&](const auto& k_rows, const auto& v_rows) {
    write_kv_typed(k_rows, v_rows, k, v, kv, token_seq, positions, T, hd);
  });
}

void qkv_rope(float* q, void* k_cache, void* v_cache, DType kv_dtype, const float* qkv, const int32_t* positions,
              const float* inv_freq, const KvBlockTable& kv, const int32_t* token_seq, int64_t T, int64_t n_heads,
              int64_t hd, float* k_scales, float* v_scales) {
  with_kv_rows(kv_dtype, k_cache, v_cache, k_scales, v_scales, hd, [&](const auto& k_rows, const auto& v_rows) {
    qkv_rope_typed(q, k_rows, v_rows, qkv, positions, inv_freq, kv, token_seq, T, n_heads, hd);
  });
}

void attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache, DType kv_dtype,
               const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions, int64_t T,
               int64_t n_heads, int64_t hd, float scale, const float* k_scales, const float* v_scales) {
  with_kv_rows(kv_dtype, k_cache, v_cache, k_scales, v_scales, hd, [&](const auto& k_rows, const auto& v_rows) {
    attention_typed(pool, out, q, k_rows, v_rows, kv, token_seq, positions, T, n_heads, hd, scale);
  });
}

void silu_mul(float* out, const float* gate_up, int64_t T, int64_t F) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < F; ++f) {
      float g = gate_up[t * 2 * F + f], u = gate_up[t * 2 * F + F + f];
      out[t * F + f] = g / (1.0f + std::exp(-g)) * u;
    }
}

void copy_cols(uint8_t* out, int64_t out_row_bytes, int64_t out_offset_bytes, const uint8_t* x, int64_t x_row_bytes,
               int64_t x_offset_bytes, int64_t T, int64_t n_bytes) {
  if (n_bytes == 0) return;
  for (int64_t t = 0; t < T; ++t)
    std::memcpy(out + t * out_row_bytes + out_offset_bytes, x + t * x_row_bytes + x_offset_bytes,
                static_cast<size_t>(n_bytes));
}

void gather_rows(uint8_t* out, const uint8_t* x, int64_t row_bytes, const int32_t* rows, int64_t R) {
  if (row_bytes == 0) return;
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(out + r * row_bytes, x + rows[r] * row_bytes, static_cast<size_t>(row_bytes));
}

void combine_experts(float* out, const float* y, const float* weights, int64_t T, int64_t k, int64_t N) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += weights[t * k + j] * y[(t * k + j) * N + n];
      out[t * N + n] = sum;
    }
}

// log(sum(exp(row - max))) and max, for a stable log-softmax.
void log_sum_exp(const float* row, int64_t V, float* max_out, float* log_sum_out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < V; ++v) m = std::max(m, row[v]);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - m);
  *max_out = m;
  *log_sum_out = static_cast<float>(std::log(sum));
}

void log_softmax(float* out, const float* logits, int64_t R, int64_t V) {
  for (int64_t r = 0; r < R; ++r) {
    float m, log_sum;
    log_sum_exp(logits + r * V, V, &m, &log_sum);
    for (int64_t v = 0; v < V; ++v) out[r * V + v] = (logits[r * V + v] - m) - log_sum;
  }
}

void logprobs(float* out, const float* logits, const int32_t* ids, int64_t R, int64_t V) {
  for (int64_t r = 0; r < R; ++r) {
    float m, log_sum;
    log_sum_exp(logits + r * V, V, &m, &log_sum);
    out[r] = (logits[r * V + ids[r]] - m) - log_sum;
  }
}

// The sampling rule of sample-rule.h, per row, by sorting the candidates (step numbers are the rule's).
void sample(int32_t* out, const float* logits, const SampleArgs& args, int64_t R, int64_t V) {
  std::vector<float> z;
  std::vector<int32_t> order;
  std::vector<double> p;
  for (int64_t r = 0; r < R; ++r) {
    const float* row = logits + r * V;
    float temperature = args.temperature[r];
    if (sample_greedy(temperature)) {  // 1.
      int64_t best = 0;
      for (int64_t v = 1; v < V; ++v)
        if (row[v] > row[best]) best = v;
      out[r] = static_cast<int32_t>(best);
      continue;
    }
    z.resize(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; ++v) z[v] = sample_z(row[v], temperature);  // 2.
    order.resize(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    auto before = [&](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
    int64_t kept = V;
    if (args.top_k[r] > 0 && args.top_k[r] < V) {
      kept = args.top_k[r];
      std::partial_sort(order.begin(), order.begin() + kept, order.end(), before);
    } else {
      std::sort(order.begin(), order.end(), before);
    }
    const float z_max = z[order[0]];
    p.resize(static_cast<size_t>(kept));
    double sum = 0;
    for (int64_t i = 0; i < kept; ++i) {  // 4.
      p[i] = sample_weight(z[order[i]], z_max);
      sum += p[i];
    }
    for (int64_t i = 0; i < kept; ++i) p[i] /= sum;
    double top_p = args.top_p[r];
    if (top_p < 1) {
      double cumulative = 0;
      for (int64_t i = 0; i < kept; ++i) {
        cumulative += p[i];
        if (cumulative >= top_p) {
          kept = i + 1;
          break;
        }
      }
    }
    double total = 0;
    for (int64_t i = 0; i < kept; ++i) total += p[i];
    double threshold = sample_threshold(args.uniform[r], total);  // 6.
    int32_t pick = order[kept - 1];
    double cumulative = 0;
    for (int64_t i = 0; i < kept; ++i) {
      cumulative += p[i];
      if (cumulative > threshold) {
        pick = order[i];
        break;
      }
    }
    out[r] = pick;
  }
}

void random_uniform(void* out, DType dtype, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    float v = uniform_value(seed, static_cast<uint64_t>(i), scale);
    if (dtype == DType::F32)
      static_cast<float*>(out)[i] = v;
    else if (dtype == DType::BF16)
      static_cast<uint16_t*>(out)[i] = f32_to_bf16_rz(v);
    else
      static_cast<uint16_t*>(out)[i] = f32_to_f16_rz(v);
  }
}

}  // namespace weft::cpu
