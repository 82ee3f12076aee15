// SparQ decode attention: the five kernels attention-sparq.cuh lists, and the append of its state.
#include <algorithm>

#include "cuda/attention-sparq.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

constexpr int kChunk = 256;        // positions per block of the scores and keys kernels (one per thread)
constexpr int kSelectThreads = 1024;
constexpr int kRowsPerPart = 32;   // selected rows per partition of the gather (8 per warp: latency-bound loads)
constexpr int kGatherThreads = 128;
constexpr int kMaxHd = 256;
constexpr size_t kKeysInSharedMax = 160 * 1024;  // keys of longer sequences stay in global memory (L2)

// The scratch, carved in this order (4-byte elements).
struct SparqScratch {
  float* logits;    // [T, nH, C]: step 2's logits
  float* chunk_ml;  // [T, nH, nChunks, 2]: max and sum of exp(logit - max) per chunk
  float* keys;      // [T, nKv, C]: the group's key per position
  int32_t* rows;    // [T, nKv, C]: the selected positions, ascending
  int32_t* n_rows;  // [T, nKv]: how many (len when exact, 0 for a bad token)
  float* alpha;     // [T, nH]
  float* part_out;  // [T, nH, nParts, hd]
  float* part_ml;   // [T, nH, nParts, 2]
  float* part_v;    // [T, nKv, nParts, hd]: partial sums of V for the mean
};

struct SparqShape {
  int64_t T, nH, nKv, C, hd, n_chunks, n_parts;
  int64_t floats() const {
    return T * nH * C + T * nH * n_chunks * 2 + 2 * T * nKv * C + T * nKv + T * nH + T * nH * n_parts * (hd + 2) +
           T * nKv * n_parts * hd;
  }
  SparqScratch carve(float* s) const {
    SparqScratch x;
    x.logits = s, s += T * nH * C;
    x.chunk_ml = s, s += T * nH * n_chunks * 2;
    x.keys = s, s += T * nKv * C;
    x.rows = reinterpret_cast<int32_t*>(s), s += T * nKv * C;
    x.n_rows = reinterpret_cast<int32_t*>(s), s += T * nKv;
    x.alpha = s, s += T * nH;
    x.part_out = s, s += T * nH * n_parts * hd;
    x.part_ml = s, s += T * nH * n_parts * 2;
    x.part_v = s;
    return x;
  }
};

SparqShape shape_of(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, int64_t n_heads) {
  const int64_t C = kv_block_table.dim(1) * k_cache.dim(2);
  return {q.dim(0), n_heads, k_cache.dim(1), C, k_cache.dim(3), (C + kChunk - 1) / kChunk,
          (C + kRowsPerPart - 1) / kRowsPerPart};
}

struct TokenArgs {
  int r, k;
};
__device__ __forceinline__ TokenArgs token_args(const int32_t* sparq_r, const int32_t* sparq_k, int t, int hd) {
  return {min(max(sparq_r[t], 1), hd), max(sparq_k[t], 1)};
}

// Block-wide max / sum over blockDim.x threads (a multiple of 32); `red` is 32 floats of shared memory.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float x = kMax ? -INFINITY : 0.0f;
  for (int w = 0; w < warps; ++w) x = kMax ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

// Exclusive prefix count of `flag` over the block in thread order; *total gets the block's count.
__device__ int block_exclusive_count(bool flag, int* warp_counts, int* total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  __syncthreads();
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < warps; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    all += warp_counts[w];
  }
  *total = all;
  return before + __popc(ballot & ((1u << lane) - 1));
}

// Step 1 into shared memory: cols[0..r) ascending, and c_h per head (coef). q_s [group][hd] loaded; rank [hd].
__device__ void select_columns(const float* q_s, int group, int hd, int r, float scale, float* abs_q, int* rank,
                               int* cols, float* coef) {
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float a = 0;
    for (int h = 0; h < group; ++h) a += fabsf(q_s[h * hd + d]);
    abs_q[d] = a;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    int above = 0;  // components ranked before d: larger, or equal at a lower index
    for (int j = 0; j < hd; ++j) above += abs_q[j] > abs_q[d] || (abs_q[j] == abs_q[d] && j < d);
    rank[d] = above;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    if (rank[d] >= r) continue;
    int slot = 0;  // selected components below d: d's place in ascending order
    for (int j = 0; j < d; ++j) slot += rank[j] < r;
    cols[slot] = d;
  }
  __syncthreads();
  for (int h = threadIdx.x; h < group; h += blockDim.x) {
    float all = 0, kept = 0;
    for (int d = 0; d < hd; ++d) all += fabsf(q_s[h * hd + d]);
    for (int i = 0; i < r; ++i) kept += fabsf(q_s[h * hd + cols[i]]);
    coef[h] = kept > 0 ? scale * sqrtf(all / kept) : scale;
  }
  __syncthreads();
}

// grid (gx, T * nKv), kChunk threads: step 2 over chunks blockIdx.x, blockIdx.x + gx, ...
template <typename KV>
__global__ void __launch_bounds__(kChunk) sparq_scores(const float* __restrict__ q, const KV* __restrict__ k_t,
                                                       KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                                       const int32_t* __restrict__ positions,
                                                       const int32_t* __restrict__ sparq_r,
                                                       const int32_t* __restrict__ sparq_k, int nH, int hd,
                                                       float scale, SparqShape sh, SparqScratch x,
                                                       DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), t = blockIdx.y / n_kv, g = blockIdx.y % n_kv, group = nH / n_kv;
  const int seq = token_seq[t], pos = positions[t];
  if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, blockIdx.x == 0 && g == 0 && threadIdx.x == 0)) return;
  const TokenArgs a = token_args(sparq_r, sparq_k, t, hd);
  const int len = pos + 1, B = static_cast<int>(kv.block_size);
  if (len <= a.k) return;
  __shared__ float q_s[kSparqMaxGroup * kMaxHd], abs_q[kMaxHd], coef[kSparqMaxGroup], red[32];
  __shared__ int cols[kMaxHd], rank[kMaxHd];
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) q_s[i] = q[(size_t(t) * nH + g * group) * hd + i];
  __syncthreads();
  select_columns(q_s, group, hd, a.r, scale, abs_q, rank, cols, coef);
  const int n_valid = (len + kChunk - 1) / kChunk;
  for (int c = blockIdx.x; c < n_valid; c += gridDim.x) {
    const int p = c * kChunk + threadIdx.x;
    float acc[kSparqMaxGroup];
#pragma unroll
    for (int h = 0; h < kSparqMaxGroup; ++h) acc[h] = 0;
    if (p < len) {
      const int j = p / B;
      const int64_t block = kv_block_checked(kv, t, seq, j, StatusOp::AttentionBlock, status, true);
      const KV* col0 = k_t + ((max(block, int64_t(0)) * n_kv + g) * hd) * B + (p - j * B);  // [nBlocks, nKv, hd, B]
      for (int i = 0; i < a.r; ++i) {
        const int d = cols[i];
        const float kd = to_f32(col0[size_t(d) * B]);
#pragma unroll
        for (int h = 0; h < kSparqMaxGroup; ++h)
          if (h < group) acc[h] += q_s[h * hd + d] * kd;
      }
    }
#pragma unroll
    for (int h = 0; h < kSparqMaxGroup; ++h) {  // unrolled so that acc stays in registers; group is block-uniform
      if (h >= group) break;
      const float logit = p < len ? acc[h] * coef[h] : -INFINITY;
      const size_t th = size_t(t) * nH + g * group + h;
      if (p < len) x.logits[th * sh.C + p] = logit;
      const float m = block_reduce<true>(logit, red);
      const float l = block_reduce<false>(p < len ? expf(logit - m) : 0.0f, red);
      if (threadIdx.x == 0) {
        x.chunk_ml[(th * sh.n_chunks + c) * 2] = m;
        x.chunk_ml[(th * sh.n_chunks + c) * 2 + 1] = l;
      }
    }
  }
}

// The log of the softmax denominator of head th's logits over len positions, from the per-chunk max and sum.
__device__ float head_lse(const SparqShape& sh, const SparqScratch& x, size_t th, int len) {
  const int n_valid = (len + kChunk - 1) / kChunk;
  const float* ml = x.chunk_ml + th * sh.n_chunks * 2;
  float m = -INFINITY, z = 0;
  for (int c = 0; c < n_valid; ++c) m = fmaxf(m, ml[2 * c]);
  for (int c = 0; c < n_valid; ++c) z += expf(ml[2 * c] - m) * ml[2 * c + 1];
  return m + logf(z);
}

// grid (gx, T * nKv), kChunk threads: key[p] = sum over the group of exp(logit - lse).
__global__ void __launch_bounds__(kChunk) sparq_keys(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                                     const int32_t* __restrict__ positions,
                                                     const int32_t* __restrict__ sparq_r,
                                                     const int32_t* __restrict__ sparq_k, int nH, int hd,
                                                     SparqShape sh, SparqScratch x) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), t = blockIdx.y / n_kv, g = blockIdx.y % n_kv, group = nH / n_kv;
  const int seq = token_seq[t], pos = positions[t];
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) return;  // reported by sparq_scores
  const int len = pos + 1;
  if (len <= token_args(sparq_r, sparq_k, t, hd).k) return;
  __shared__ float lse[kSparqMaxGroup];
  const size_t th0 = size_t(t) * nH + g * group;
  if (threadIdx.x < group) lse[threadIdx.x] = head_lse(sh, x, th0 + threadIdx.x, len);
  __syncthreads();
  const int n_valid = (len + kChunk - 1) / kChunk;
  for (int c = blockIdx.x; c < n_valid; c += gridDim.x) {
    const int p = c * kChunk + threadIdx.x;
    if (p >= len) continue;
    float key = 0;
    for (int h = 0; h < group; ++h) key += expf(x.logits[(th0 + h) * sh.C + p] - lse[h]);
    x.keys[(size_t(t) * n_kv + g) * sh.C + p] = key;
  }
}

// grid (T * nKv), kSelectThreads threads: the k positions of largest key (ties to the lower index) in index
// order, and alpha per head. Keys are >= 0, so their bit patterns order as they do.
__global__ void __launch_bounds__(kSelectThreads) sparq_select(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                                                const int32_t* __restrict__ positions,
                                                                const int32_t* __restrict__ sparq_r,
                                                                const int32_t* __restrict__ sparq_k, int nH, int hd,
                                                                SparqShape sh, SparqScratch x, int keys_in_shared) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), t = blockIdx.x / n_kv, g = blockIdx.x % n_kv, group = nH / n_kv;
  const int seq = token_seq[t], pos = positions[t];
  const size_t tg = size_t(t) * n_kv + g, th0 = size_t(t) * nH + g * group;
  int32_t* rows = x.rows + tg * sh.C;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {
    if (threadIdx.x == 0) x.n_rows[tg] = 0;
    return;
  }
  const int len = pos + 1, k = token_args(sparq_r, sparq_k, t, hd).k;
  if (len <= k) {  // exact
    for (int p = threadIdx.x; p < len; p += blockDim.x) rows[p] = p;
    if (threadIdx.x < group) x.alpha[th0 + threadIdx.x] = 1.0f;
    if (threadIdx.x == 0) x.n_rows[tg] = len;
    return;
  }
  extern __shared__ float keys_s[];
  __shared__ int hist[256], warp_counts[32];
  __shared__ unsigned prefix_s, remaining_s;
  __shared__ float lse[kSparqMaxGroup], red[32][kSparqMaxGroup];
  const float* keys_g = x.keys + tg * sh.C;
  const float* keys = keys_in_shared ? keys_s : keys_g;
  if (keys_in_shared)
    for (int p = threadIdx.x; p < len; p += blockDim.x) keys_s[p] = keys_g[p];
  if (threadIdx.x < group) lse[threadIdx.x] = head_lse(sh, x, th0 + threadIdx.x, len);
  unsigned prefix = 0, mask = 0, remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // Most keys share their high bytes (one exponent range), so a warp's lanes that hit one bin add once: whole
    // warps run every iteration, and the lowest lane of each group of equal bins adds the group's count.
    for (int p0 = 0; p0 < len; p0 += blockDim.x) {
      const int p = p0 + threadIdx.x;
      const unsigned u = p < len ? __float_as_uint(keys[p]) : 0u;
      const bool counted = p < len && (u & mask) == prefix;
      const unsigned bin = counted ? (u >> shift) & 255 : 256 + (threadIdx.x & 31);  // uncounted lanes: unique
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (counted && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the bin holding the remaining-th largest, counting from the top
      unsigned above = 0;
      int b = 255;
      for (; b > 0 && above + hist[b] < remaining; --b) above += hist[b];
      prefix_s = prefix | (unsigned(b) << shift);
      remaining_s = remaining - above;
    }
    __syncthreads();
    prefix = prefix_s, remaining = remaining_s, mask |= 255u << shift;
  }
  // prefix is the k-th largest key; take every larger key and the first `remaining` equal ones.
  float alpha[kSparqMaxGroup];
#pragma unroll
  for (int h = 0; h < kSparqMaxGroup; ++h) alpha[h] = 0;
  int eq_before = 0, taken = 0;
  for (int p0 = 0; p0 < len; p0 += blockDim.x) {
    const int p = p0 + threadIdx.x;
    const unsigned u = p < len ? __float_as_uint(keys[p]) : 0u;
    const bool eq = p < len && u == prefix;
    int eq_total, take_total;
    const int eq_rank = eq_before + block_exclusive_count(eq, warp_counts, &eq_total);
    const bool take = p < len && (u > prefix || (eq && unsigned(eq_rank) < remaining));
    const int slot = taken + block_exclusive_count(take, warp_counts, &take_total);
    if (take) {
      rows[slot] = p;
#pragma unroll
      for (int h = 0; h < kSparqMaxGroup; ++h)
        if (h < group) alpha[h] += expf(x.logits[(th0 + h) * sh.C + p] - lse[h]);
    }
    eq_before += eq_total, taken += take_total;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < kSparqMaxGroup; ++h) {
    const float s = warp_sum(alpha[h]);
    if (lane == 0 && h < group) red[warp][h] = s;
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float s = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) s += red[w][threadIdx.x];
    x.alpha[th0 + threadIdx.x] = s;
  }
  if (threadIdx.x == 0) x.n_rows[tg] = k;
}

// grid (gx, T * nKv), kGatherThreads threads: per partition of kRowsPerPart selected rows, the max, sum and
// exp-weighted V sum per head (split-K decode over the rows), and a share of the V sums for the mean.
template <typename KV>
__global__ void __launch_bounds__(kGatherThreads) sparq_gather(const float* __restrict__ q,
                                                               const KV* __restrict__ k_cache,
                                                               const KV* __restrict__ v_cache,
                                                               const float* __restrict__ v_sum, KvBlockTable kv,
                                                               const int32_t* __restrict__ token_seq,
                                                               const int32_t* __restrict__ positions, int nH, int hd,
                                                               float scale, SparqShape sh, SparqScratch x,
                                                               DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), t = blockIdx.y / n_kv, g = blockIdx.y % n_kv, group = nH / n_kv;
  const size_t tg = size_t(t) * n_kv + g, th0 = size_t(t) * nH + g * group;
  const int n = x.n_rows[tg];
  if (n == 0) return;
  const int seq = token_seq[t], len = positions[t] + 1, B = static_cast<int>(kv.block_size);
  const int n_parts = (n + kRowsPerPart - 1) / kRowsPerPart;
  __shared__ float q_s[kSparqMaxGroup * kMaxHd], sc[kSparqMaxGroup][kRowsPerPart];
  __shared__ int64_t row_off[kRowsPerPart];
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) q_s[i] = q[th0 * hd + i];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int full = len / B;
  for (int c = blockIdx.x; c < n_parts; c += gridDim.x) {
    const int i0 = c * kRowsPerPart, np = min(kRowsPerPart, n - i0);
    __syncthreads();
    for (int i = threadIdx.x; i < np; i += blockDim.x)
      row_off[i] = kv_read_row(kv, t, seq, g, x.rows[tg * sh.C + i0 + i], status) * hd;
    __syncthreads();
    for (int i = warp; i < np; i += warps) {
      const KV* kr = k_cache + row_off[i];
      float acc[kSparqMaxGroup];
#pragma unroll
      for (int h = 0; h < kSparqMaxGroup; ++h) acc[h] = 0;
      for (int d = lane; d < hd; d += 32) {
        const float kd = to_f32(kr[d]);
#pragma unroll
        for (int h = 0; h < kSparqMaxGroup; ++h)
          if (h < group) acc[h] += q_s[h * hd + d] * kd;
      }
#pragma unroll
      for (int h = 0; h < kSparqMaxGroup; ++h) {
        const float s = warp_sum(acc[h]);
        if (lane == 0 && h < group) sc[h][i] = s * scale;
      }
    }
    __syncthreads();
    for (int h = warp; h < group; h += warps) {
      float m = -INFINITY;
      for (int i = lane; i < np; i += 32) m = fmaxf(m, sc[h][i]);
      m = warp_max(m);
      float l = 0;
      for (int i = lane; i < np; i += 32) {
        const float e = expf(sc[h][i] - m);
        sc[h][i] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        x.part_ml[((th0 + h) * sh.n_parts + c) * 2] = m;
        x.part_ml[((th0 + h) * sh.n_parts + c) * 2 + 1] = l;
      }
    }
    __syncthreads();
    // full blocks [b0, b1) of the V mean are this partition's share; partition 0 also takes the partial block
    const int per = (full + n_parts - 1) / n_parts, b0 = min(full, c * per), b1 = min(full, b0 + per);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float acc[kSparqMaxGroup];
#pragma unroll
      for (int h = 0; h < kSparqMaxGroup; ++h) acc[h] = 0;
#pragma unroll 4
      for (int i = 0; i < np; ++i) {
        const float vd = to_f32(v_cache[row_off[i] + d]);
#pragma unroll
        for (int h = 0; h < kSparqMaxGroup; ++h)
          if (h < group) acc[h] += sc[h][i] * vd;
      }
      for (int h = 0; h < group; ++h) x.part_out[((th0 + h) * sh.n_parts + c) * hd + d] = acc[h];
      if (n == len) continue;  // exact: no mean
      float vs = 0;
      for (int j = b0; j < b1; ++j) vs += v_sum[(int64_t(kv.block_id(seq, j)) * n_kv + g) * hd + d];
      if (c == 0)
        for (int p = full * B; p < len; ++p) vs += to_f32(v_cache[kv_read_row(kv, t, seq, g, p, status) * hd + d]);
      x.part_v[(tg * sh.n_parts + c) * hd + d] = vs;
    }
  }
}

// grid (T * nH): merge the partitions of one (token, head), then the V-mean blend, in partition order.
__global__ void sparq_merge(const int32_t* __restrict__ positions, int nH, int n_kv, int hd, SparqShape sh,
                            SparqScratch x, float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  const int th = blockIdx.x, t = th / nH, g = (th % nH) / (nH / n_kv);
  const size_t tg = size_t(t) * n_kv + g;
  const int n = x.n_rows[tg], len = positions[t] + 1;
  float* o = out + size_t(th) * hd;
  if (n == 0) {  // a bad token (reported)
    for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0;
    return;
  }
  const int n_parts = (n + kRowsPerPart - 1) / kRowsPerPart;
  const float* ml = x.part_ml + size_t(th) * sh.n_parts * 2;
  float M = -INFINITY, L = 0;
  for (int c = 0; c < n_parts; ++c) M = fmaxf(M, ml[2 * c]);
  for (int c = 0; c < n_parts; ++c) L += expf(ml[2 * c] - M) * ml[2 * c + 1];
  const float inv_L = 1.0f / L, alpha = x.alpha[th];
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int c = 0; c < n_parts; ++c) acc += expf(ml[2 * c] - M) * x.part_out[(size_t(th) * sh.n_parts + c) * hd + d];
    const float y = acc * inv_L;
    if (n == len) {
      o[d] = y;
      continue;
    }
    float vs = 0;
    for (int c = 0; c < n_parts; ++c) vs += x.part_v[(tg * sh.n_parts + c) * hd + d];
    o[d] = alpha * y + (1 - alpha) * (vs / float(len));
  }
}

// grid (T * nKv), max(hd, 32) threads: the token's K row into kT; the block's V sum when row B - 1 is written.
template <typename KV>
__global__ void sparq_append(KV* __restrict__ k_t, float* __restrict__ v_sum, const KV* __restrict__ k_cache,
                             const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                             const int32_t* __restrict__ positions, int hd, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), t = blockIdx.x / n_kv, g = blockIdx.x % n_kv;
  const int seq = token_seq[t], pos = positions[t];
  const int64_t row = kv_write_row(kv, t, seq, pos, g, status, g == 0 && threadIdx.x == 0);
  if (row < 0) return;
  const int64_t B = kv.block_size, o = pos % B, block = (row - o) / B / n_kv;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    k_t[((block * n_kv + g) * hd + d) * B + o] = k_cache[row * hd + d];
    if (o != B - 1) continue;
    float s = 0;
    for (int64_t i = 0; i < B; ++i) s += to_f32(v_cache[kv.row(block, g, i) * hd + d]);
    v_sum[(block * n_kv + g) * hd + d] = s;
  }
}

unsigned grid_x(int64_t parts, int64_t units, int num_sms) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(parts, 16 * num_sms / std::max<int64_t>(units, 1))));
}

}  // namespace

int64_t sparq_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, int64_t n_heads,
                             int /*num_sms*/) {
  return shape_of(q, k_cache, kv_block_table, n_heads).floats();
}

void launch_sparq_append(const Ctx& ctx, const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache,
                         const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                         const Tensor& positions) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int64_t T = token_seq.dim(0), hd = k_cache.dim(3);
  if (T == 0) return;
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    launch_pdl(ctx, sparq_append<KV>, static_cast<unsigned>(T * kv.n_kv), std::max<int>(32, int(std::min<int64_t>(hd, 256))), 0,
               k_t.data<KV>(), v_sum.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), kv,
               token_seq.data<int32_t>(), positions.data<int32_t>(), int(hd), ctx.status);
  });
  check_launch(ctx, "sparqAppend", {Named{"kT", k_t}, Named{"kCache", k_cache}, Named{"positions", positions}});
}

void launch_sparq_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& k_t, const Tensor& v_sum, const Tensor& token_seq,
                            const Tensor& kv_block_table, const Tensor& positions, const Tensor& sparq_r,
                            const Tensor& sparq_k, int64_t n_heads, float scale, const Tensor& out, float* scratch,
                            int num_sms) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const SparqShape sh = shape_of(q, k_cache, kv_block_table, n_heads);
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"kvBlockTable", kv_block_table}};
  const int64_t group = n_heads / sh.nKv;
  WEFT_CHECK(sh.T <= kSparqMaxTokens, "sparqAttention", "serves at most ", kSparqMaxTokens, " tokens a step (got ",
             sh.T, "; longer steps take the dense attention)");
  WEFT_CHECK(group <= kSparqMaxGroup && sh.hd <= kMaxHd, "sparqAttention", "supports GQA groups of at most ",
             kSparqMaxGroup, " query heads and head dims of at most ", kMaxHd, " (got ", group, " and ", sh.hd, ")");
  WEFT_CHECK(sh.C < (int64_t(1) << 31), "sparqAttention", "a sequence capacity of ", sh.C, " positions is too large");
  if (sh.T == 0) return;
  const SparqScratch x = sh.carve(scratch);
  const unsigned units = static_cast<unsigned>(sh.T * sh.nKv);
  const int32_t *seq = token_seq.data<int32_t>(), *pos = positions.data<int32_t>();
  const int32_t *r = sparq_r.data<int32_t>(), *k = sparq_k.data<int32_t>();
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    launch_pdl(ctx, sparq_scores<KV>, dim3(grid_x(sh.n_chunks, units, num_sms), units), kChunk, 0, q.data<float>(),
               k_t.data<KV>(), kv, seq, pos, r, k, int(n_heads), int(sh.hd), scale, sh, x, ctx.status);
  });
  check_launch(ctx, "sparqAttention", args);
  launch_pdl(ctx, sparq_keys, dim3(grid_x(sh.n_chunks, units, num_sms), units), kChunk, 0, kv, seq, pos, r, k,
             int(n_heads), int(sh.hd), sh, x);
  check_launch(ctx, "sparqAttention", args);
  const size_t keys_bytes = size_t(sh.C) * sizeof(float);
  const int in_shared = keys_bytes <= kKeysInSharedMax;
  const size_t smem = in_shared ? keys_bytes : 0;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(sparq_select, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  launch_pdl(ctx, sparq_select, units, kSelectThreads, smem, kv, seq, pos, r, k, int(n_heads), int(sh.hd), sh, x,
             in_shared);
  check_launch(ctx, "sparqAttention", args);
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    launch_pdl(ctx, sparq_gather<KV>, dim3(grid_x(sh.n_parts, units, num_sms), units), kGatherThreads, 0,
               q.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), v_sum.data<float>(), kv, seq, pos,
               int(n_heads), int(sh.hd), scale, sh, x, ctx.status);
  });
  check_launch(ctx, "sparqAttention", args);
  launch_pdl(ctx, sparq_merge, static_cast<unsigned>(sh.T * n_heads), 128, 0, pos, int(n_heads), int(sh.nKv),
             int(sh.hd), sh, x, out.data<float>());
  check_launch(ctx, "sparqAttention", args);
}

}  // namespace weft::cuda
