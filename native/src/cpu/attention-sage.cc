// SageAttention-style quantized prefill attention, the CPU reference (the algorithm is stated in
// cuda/attention-sage.cuh, whose kernels follow it): the same smoothing (the K means summed in the CUDA
// pre-pass's order, so both get the same bits), the same int8 blocks and codes (kv-quant.h's rule), the same
// online softmax over 64-position tiles with P rounded to f16 or e4m3 as the tensor cores take it.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/ops.h"
#include "kv-quant.h"

namespace weft::cpu {
namespace {

constexpr int64_t kBlock = 64;      // query rows per Q scale, positions per K / V scale and softmax tile
constexpr int64_t kSpanRows = 512;  // positions per partial K sum (the CUDA pre-pass's spans)
constexpr int64_t kSumWarps = 8;    // its warps: warp w sums rows w, w + 8, ... of a span
constexpr float kLog2e = 1.4426950408889634f;

// f32 -> the f16 value nearest (ties to even), saturating at +-65504: cvt.rn.satfinite.f16.f32.
float round_f16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t sign = bits & 0x80000000u, a = bits & 0x7fffffffu;
  if (a > 0x7f800000u) return x;  // NaN
  uint32_t r;
  if (a >= 0x477ff000u) {  // >= 65520 rounds past the largest finite half
    r = sign | 0x477fe000u;
  } else if (a < 0x38800000u) {  // below 2^-14: multiples of 2^-24
    float m;
    std::memcpy(&m, &a, sizeof m);
    m *= 16777216.0f;
    uint32_t q = static_cast<uint32_t>(m);
    const float rest = m - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    const float v = static_cast<float>(q) / 16777216.0f;
    std::memcpy(&r, &v, sizeof r);
    r |= sign;
  } else {  // keep 10 of the 23 mantissa bits, to nearest even
    const uint32_t rest = a & 0x1fffu;
    r = a & ~0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 0x2000u))) r += 0x2000u;
    r |= sign;
  }
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

// One cache row (any KV dtype) as f32.
void load_row(const void* cache, DType dtype, const float* scales, int64_t row, int64_t hd, float* dst) {
  for (int64_t d = 0; d < hd; ++d) {
    const int64_t i = row * hd + d;
    switch (dtype) {
      case DType::BF16: dst[d] = bf16_to_f32(static_cast<const uint16_t*>(cache)[i]); break;
      case DType::FP8: dst[d] = kv_dequantize(static_cast<const uint8_t*>(cache)[i], scales[row]); break;
      case DType::I8: dst[d] = kv_dequantize(static_cast<const int8_t*>(cache)[i], scales[row]); break;
      default: dst[d] = static_cast<const float*>(cache)[i]; break;
    }
  }
}

// One (sequence, kv head)'s quantized keys and values over its positions [0, end).
struct QuantizedKv {
  std::vector<int8_t> k;        // [nb * 64, hd] int8 codes of K - mean
  std::vector<float> k_scale;   // [nb]
  std::vector<float> v;         // [nb * 64, hd] the P V operand's values: f16, or e4m3 codes (fp8)
  std::vector<float> v_scale;   // [nb] fp8: the codes' scale
};

// kept_mean: the mean a state slot keeps for this (sequence, kv head), used as it is (null: the mean over [0, end)
// is computed, and stored into store_mean when that is given).
QuantizedKv quantize_kv(const void* k_cache, const void* v_cache, DType dtype, const float* k_scales,
                        const float* v_scales, const KvBlockTable& kv, int64_t seq, int64_t g, int64_t end, int64_t hd,
                        bool fp8, const float* kept_mean, float* store_mean) {
  const int64_t nb = (end + kBlock - 1) / kBlock;
  std::vector<float> row(static_cast<size_t>(hd)), mean(static_cast<size_t>(hd), 0.0f);
  // the mean, summed as the CUDA pre-pass sums it
  std::vector<float> part(static_cast<size_t>(kSumWarps * hd));
  if (kept_mean) std::copy(kept_mean, kept_mean + hd, mean.begin());
  for (int64_t p0 = 0; !kept_mean && p0 < end; p0 += kSpanRows) {
    std::fill(part.begin(), part.end(), 0.0f);
    for (int64_t p = p0; p < std::min(end, p0 + kSpanRows); ++p) {
      load_row(k_cache, dtype, k_scales, kv.row_of(seq, g, p), hd, row.data());
      float* acc = part.data() + ((p - p0) % kSumWarps) * hd;
      for (int64_t d = 0; d < hd; ++d) acc[d] += row[d];
    }
    for (int64_t d = 0; d < hd; ++d) {
      float x = 0;
      for (int64_t w = 0; w < kSumWarps; ++w) x += part[w * hd + d];
      mean[d] += x;
    }
  }
  if (!kept_mean) {
    for (int64_t d = 0; d < hd; ++d) mean[d] /= static_cast<float>(end);
    if (store_mean) std::copy(mean.begin(), mean.end(), store_mean);
  }

  QuantizedKv out{std::vector<int8_t>(static_cast<size_t>(nb * kBlock * hd), 0), std::vector<float>(nb),
                  std::vector<float>(static_cast<size_t>(nb * kBlock * hd), 0.0f), std::vector<float>(nb)};
  std::vector<float> x(static_cast<size_t>(kBlock * hd));
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t rows = std::min(kBlock, end - j * kBlock);
    float amax = 0;
    for (int64_t r = 0; r < rows; ++r) {
      load_row(k_cache, dtype, k_scales, kv.row_of(seq, g, j * kBlock + r), hd, x.data() + r * hd);
      for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(x[r * hd + d] -= mean[d]));
    }
    KvRowScale s = kv_row_scale(amax, kInt8Max);
    out.k_scale[j] = s.scale;
    for (int64_t i = 0; i < rows * hd; ++i) out.k[j * kBlock * hd + i] = f32_to_int8_code(x[i] * s.inv);
    amax = 0;
    for (int64_t r = 0; r < rows; ++r) {
      load_row(v_cache, dtype, v_scales, kv.row_of(seq, g, j * kBlock + r), hd, x.data() + r * hd);
      for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(x[r * hd + d]));
    }
    s = kv_row_scale(amax, kFp8Max);
    out.v_scale[j] = s.scale;
    float* v = out.v.data() + j * kBlock * hd;
    for (int64_t i = 0; i < rows * hd; ++i) v[i] = fp8 ? e4m3_to_f32(f32_to_e4m3(x[i] * s.inv)) : round_f16(x[i]);
  }
  return out;
}

}  // namespace

void sage_state_reset(const SageStateView& state, int64_t n_seqs) {
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int32_t slot = state.slots[3 * s];
    if (slot >= 0 && slot < state.n_slots && state.slots[3 * s + 1]) state.header[2 * slot] = 0;
  }
}

void sage_attention(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                    DType kv_dtype, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                    int64_t T, int64_t n_heads, int64_t hd, float scale, bool fp8, const float* k_scales,
                    const float* v_scales, const SageStateView* state) {
  const int64_t S = kv.n_seqs, G = kv.n_kv, group = n_heads / G;
  std::vector<int64_t> seq_end(static_cast<size_t>(S), 0), seq_start(static_cast<size_t>(S), INT64_MAX);
  for (int64_t t = 0; t < T; ++t) {
    seq_end[token_seq[t]] = std::max<int64_t>(seq_end[token_seq[t]], positions[t] + 1);
    seq_start[token_seq[t]] = std::min<int64_t>(seq_start[token_seq[t]], positions[t]);
  }
  // each row's slot (sage-state.h): the mean it keeps, where its kept blocks leave any (the CUDA kernels reuse those
  // blocks; quantized again here from the same rows and mean, they are the same), else the step's mean, kept
  std::vector<const float*> kept(static_cast<size_t>(S), nullptr);
  std::vector<float*> store(static_cast<size_t>(S), nullptr);
  if (state) {
    sage_state_reset(*state, S);
    for (int64_t s = 0; s < S; ++s) {
      const int32_t slot = state->slots[3 * s];
      if (slot < 0 || slot >= state->n_slots || seq_end[s] == 0 || (seq_end[s] + kBlock - 1) / kBlock > state->nb_max)
        continue;
      const int64_t held = std::min<int64_t>({state->header[2 * slot], state->slots[3 * s + 2], seq_start[s]});
      float* mean = state->means + slot * G * hd;
      if (std::max<int64_t>(held, 0) / kBlock > 0)
        kept[s] = mean;
      else
        store[s] = mean;
      state->header[2 * slot] = static_cast<int32_t>(seq_end[s]);
    }
  }
  std::vector<QuantizedKv> kvq(static_cast<size_t>(S * G));
  pool.parallel_for(S * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / G, g = i % G;
      if (seq_end[s] > 0)
        kvq[i] = quantize_kv(k_cache, v_cache, kv_dtype, k_scales, v_scales, kv, s, g, seq_end[s], hd, fp8,
                             kept[s] ? kept[s] + g * hd : nullptr, store[s] ? store[s] + g * hd : nullptr);
    }
  });
  // Q: one scale per (64 tokens of the step, head)
  const int64_t qb = (T + kBlock - 1) / kBlock;
  std::vector<int8_t> q8(static_cast<size_t>(T * n_heads * hd));
  std::vector<float> q_scale(static_cast<size_t>(qb * n_heads));
  for (int64_t b = 0; b < qb; ++b)
    for (int64_t h = 0; h < n_heads; ++h) {
      float amax = 0;
      for (int64_t t = b * kBlock; t < std::min(T, (b + 1) * kBlock); ++t)
        for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(q[(t * n_heads + h) * hd + d]));
      const KvRowScale s = kv_row_scale(amax, kInt8Max);
      q_scale[b * n_heads + h] = s.scale;
      for (int64_t t = b * kBlock; t < std::min(T, (b + 1) * kBlock); ++t)
        for (int64_t d = 0; d < hd; ++d)
          q8[(t * n_heads + h) * hd + d] = f32_to_int8_code(q[(t * n_heads + h) * hd + d] * s.inv);
    }
  const float qscale = scale * kLog2e;
  pool.parallel_for(T * n_heads, 1, [&](int64_t begin, int64_t end) {
    float s[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / n_heads, h = i % n_heads, pos = positions[t];
      const QuantizedKv& kq = kvq[token_seq[t] * G + h / group];
      const int8_t* qh = q8.data() + (t * n_heads + h) * hd;
      const float sq = q_scale[(t / kBlock) * n_heads + h];
      float* oh = out + (t * n_heads + h) * hd;
      std::fill(oh, oh + hd, 0.0f);
      float m = -std::numeric_limits<float>::infinity(), l = 0;
      for (int64_t j = 0; j * kBlock <= pos; ++j) {
        const int64_t n = std::min(kBlock, pos + 1 - j * kBlock);
        const float f = sq * kq.k_scale[j] * qscale;
        float mx = m;
        for (int64_t r = 0; r < n; ++r) {
          const int8_t* kr = kq.k.data() + (j * kBlock + r) * hd;
          int32_t acc = 0;
          for (int64_t d = 0; d < hd; ++d) acc += int32_t{qh[d]} * int32_t{kr[d]};
          s[r] = static_cast<float>(acc) * f;
          mx = std::max(mx, s[r]);
        }
        const float base = mx == -std::numeric_limits<float>::infinity() ? 0.0f : mx;
        const float alpha = std::exp2(m - base);
        m = mx;
        float rs = 0;
        for (int64_t r = 0; r < n; ++r) rs += s[r] = std::exp2(s[r] - base);
        l = l * alpha + rs;
        const float v_unit = fp8 ? kq.v_scale[j] / kFp8Max : 1.0f;  // fp8: p as e4m3(p * 448), V as its codes
        for (int64_t d = 0; d < hd; ++d) oh[d] *= alpha;
        for (int64_t r = 0; r < n; ++r) {
          const float p = fp8 ? e4m3_to_f32(f32_to_e4m3(s[r] * kFp8Max)) * v_unit : round_f16(s[r]);
          const float* vr = kq.v.data() + (j * kBlock + r) * hd;
          for (int64_t d = 0; d < hd; ++d) oh[d] += p * vr[d];
        }
      }
      for (int64_t d = 0; d < hd; ++d) oh[d] /= l;
    }
  });
}

}  // namespace weft::cpu
