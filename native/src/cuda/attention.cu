// Decode (split-K) and prefill (tiled, online softmax) attention; see attention.cuh for the plan.
// Scores are dot(q, k) * scale as in the CPU; softmax in fp32 with exp of (score - max).
#include <algorithm>

#include "cuda/attention.cuh"

namespace weft::cuda {
namespace {

// ---- decode: split-K

constexpr int kDecodeThreads = 128;  // 4 warps
constexpr int kHeadChunk = 8;        // query heads accumulated in registers at once

struct DecodePlan {
  int P;       // positions per partition
  int n_part;  // ceil(C / P)
  size_t smem;
};

DecodePlan decode_plan(int64_t T, int64_t n_kv, int64_t group, int64_t C, int64_t hd, int num_sms) {
  int P = 256;
  // Enough blocks for about two waves when the batch is small, partitions of at least 64 positions.
  while (P > 64 && T * n_kv * ((C + P - 1) / P) < 2 * num_sms) P /= 2;
  auto smem = [&](int p) { return static_cast<size_t>(group * hd + group * p) * sizeof(float); };
  while (P > 16 && smem(P) > 48 * 1024) P /= 2;
  return {P, static_cast<int>((C + P - 1) / P), smem(P)};
}

// grid (n_part, T * n_kv). part_out [T * nH, n_part, hd], part_ml [T * nH, n_part, 2] (max, sum).
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_partial(const float* __restrict__ q, const float* __restrict__ k_cache,
                             const float* __restrict__ v_cache, const int32_t* __restrict__ slots,
                             const int32_t* __restrict__ positions, int S, int nH, int n_kv, int C, int hd, int P,
                             int n_part, float scale, float* __restrict__ part_out, float* __restrict__ part_ml,
                             DeviceStatus* status) {
  int c = blockIdx.x, t = blockIdx.y / n_kv, g = blockIdx.y % n_kv;
  int slot = slots[t], pos = positions[t];
  if (slot < 0 || slot >= S || pos < 0 || pos >= C) {
    if (c == 0 && g == 0 && threadIdx.x == 0) {
      if (slot < 0 || slot >= S)
        report(status, StatusOp::AttentionSlot, t, slot, S);
      else
        report(status, StatusOp::AttentionPosition, t, pos, C);
    }
    return;
  }
  int len = pos + 1, p0 = c * P;
  if (p0 >= len) return;
  int np = min(P, len - p0);
  int group = nH / n_kv, h_first = g * group;
  extern __shared__ float smem[];
  float* qs = smem;                // [group][hd]
  float* sc = smem + group * hd;   // [group][P]: scores, then exp(score - max)
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) qs[i] = q[(size_t(t) * nH + h_first) * hd + i];
  __syncthreads();

  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  size_t head_base = (size_t(slot) * n_kv + g) * C;
  const float* kb = k_cache + (head_base + p0) * hd;
  const float* vb = v_cache + (head_base + p0) * hd;
  for (int i = warp; i < np; i += warps) {
    const float* kr = kb + size_t(i) * hd;
    for (int h0 = 0; h0 < group; h0 += kHeadChunk) {
      float acc[kHeadChunk];
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) acc[j] = 0;
      for (int d = lane; d < hd; d += 32) {
        float kv = kr[d];
#pragma unroll
        for (int j = 0; j < kHeadChunk; ++j)
          if (h0 + j < group) acc[j] += qs[(h0 + j) * hd + d] * kv;
      }
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        float s = warp_sum(acc[j]);
        if (lane == 0 && h0 + j < group) sc[(h0 + j) * P + i] = s * scale;
      }
    }
  }
  __syncthreads();

  for (int h = warp; h < group; h += warps) {
    float m = -INFINITY;
    for (int i = lane; i < np; i += 32) m = fmaxf(m, sc[h * P + i]);
    m = warp_max(m);
    float l = 0;
    for (int i = lane; i < np; i += 32) {
      float e = expf(sc[h * P + i] - m);
      sc[h * P + i] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      size_t r = (size_t(t) * nH + h_first + h) * n_part + c;
      part_ml[2 * r] = m;
      part_ml[2 * r + 1] = l;
    }
  }
  __syncthreads();

  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    for (int h0 = 0; h0 < group; h0 += kHeadChunk) {
      float acc[kHeadChunk];
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) acc[j] = 0;
#pragma unroll 4
      for (int i = 0; i < np; ++i) {
        float vv = vb[size_t(i) * hd + d];
#pragma unroll
        for (int j = 0; j < kHeadChunk; ++j)
          if (h0 + j < group) acc[j] += sc[(h0 + j) * P + i] * vv;
      }
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j)
        if (h0 + j < group) part_out[((size_t(t) * nH + h_first + h0 + j) * n_part + c) * hd + d] = acc[j];
    }
  }
}

// grid (T * nH): merge the partitions of one (token, head) in partition order.
__global__ void attention_decode_merge(const int32_t* __restrict__ slots, const int32_t* __restrict__ positions,
                                       int S, int nH, int C, int hd, int P, int n_part,
                                       const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                       float* __restrict__ out) {
  int th = blockIdx.x, t = th / nH;
  int slot = slots[t], pos = positions[t];
  float* o = out + size_t(th) * hd;
  if (slot < 0 || slot >= S || pos < 0 || pos >= C) {  // reported by the partial kernel
    for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0;
    return;
  }
  int n_valid = (pos + 1 + P - 1) / P;
  const float* ml = part_ml + size_t(th) * n_part * 2;
  float M = -INFINITY;
  for (int c = 0; c < n_valid; ++c) M = fmaxf(M, ml[2 * c]);
  float L = 0;
  for (int c = 0; c < n_valid; ++c) L += expf(ml[2 * c] - M) * ml[2 * c + 1];
  float inv_L = 1.0f / L;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int c = 0; c < n_valid; ++c) acc += expf(ml[2 * c] - M) * part_out[(size_t(th) * n_part + c) * hd + d];
    o[d] = acc * inv_L;
  }
}

// ---- prefill: tiled flash attention, fp32

constexpr int kBQ = 16;               // query tokens per tile
constexpr int kPrefillThreads = 128;  // 8 threads per query row
constexpr int kRowThreads = kPrefillThreads / kBQ;

// grid (ceil(T / kBQ), nH). MAXJ = head-dim elements per thread (hd <= 8 * MAXJ); BK = keys per tile.
template <int MAXJ, int BK>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill(const float* __restrict__ q, const float* __restrict__ k_cache,
                      const float* __restrict__ v_cache, const int32_t* __restrict__ slots,
                      const int32_t* __restrict__ positions, int T, int S, int nH, int n_kv, int C, int hd,
                      float scale, float* __restrict__ out, DeviceStatus* status) {
  extern __shared__ float smem[];
  const int ld = hd + 1;  // padded rows: no bank conflicts across the rows a warp reads
  float* qs = smem;                 // [kBQ][ld]
  float* ks = qs + kBQ * ld;        // [BK][ld]
  float* vs = ks + BK * ld;         // [BK][hd]
  float* ps = vs + BK * hd;         // [kBQ][BK]
  __shared__ int tok_slot[kBQ], tok_pos[kBQ], tok_done[kBQ];
  __shared__ int cur_slot, kv_end;

  int t0 = blockIdx.x * kBQ, h = blockIdx.y, g = h / (nH / n_kv);
  int tid = threadIdx.x, r = tid / kRowThreads, l8 = tid % kRowThreads;
  if (tid < kBQ) {
    int t = t0 + tid, slot = -1, pos = -1;
    if (t < T) {
      slot = slots[t];
      pos = positions[t];
      if (slot < 0 || slot >= S || pos < 0 || pos >= C) {
        if (h == 0) report(status, slot < 0 || slot >= S ? StatusOp::AttentionSlot : StatusOp::AttentionPosition, t,
                           slot < 0 || slot >= S ? slot : pos, slot < 0 || slot >= S ? S : C);
        for (int d = 0; d < hd; ++d) out[(size_t(t) * nH + h) * hd + d] = 0;
        slot = -1;
      }
    }
    tok_slot[tid] = slot;
    tok_pos[tid] = pos;
    tok_done[tid] = slot < 0;
  }
  for (int i = tid; i < kBQ * hd; i += blockDim.x) {
    int row = i / hd, d = i % hd, t = t0 + row;
    qs[row * ld + d] = t < T ? q[(size_t(t) * nH + h) * hd + d] : 0.0f;
  }

  for (;;) {
    __syncthreads();
    if (tid == 0) {
      cur_slot = -1;
      kv_end = 0;
      for (int i = 0; i < kBQ; ++i)
        if (!tok_done[i] && (cur_slot < 0 || tok_slot[i] == cur_slot)) {
          cur_slot = tok_slot[i];
          kv_end = max(kv_end, tok_pos[i] + 1);
        }
    }
    __syncthreads();
    if (cur_slot < 0) break;
    bool active = !tok_done[r] && tok_slot[r] == cur_slot;
    int my_pos = tok_pos[r];
    float m_i = -INFINITY, l_i = 0;
    float o[MAXJ];
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) o[j] = 0;
    const float* kb = k_cache + (size_t(cur_slot) * n_kv + g) * C * hd;
    const float* vb = v_cache + (size_t(cur_slot) * n_kv + g) * C * hd;

    for (int kv0 = 0; kv0 < kv_end; kv0 += BK) {
      __syncthreads();
      for (int i = tid; i < BK * hd; i += blockDim.x) {
        int row = i / hd, d = i % hd;
        bool in = kv0 + row < kv_end;
        ks[row * ld + d] = in ? kb[size_t(kv0) * hd + i] : 0.0f;
        vs[row * hd + d] = in ? vb[size_t(kv0) * hd + i] : 0.0f;
      }
      __syncthreads();
      float s[BK / kRowThreads];
      float m_tile = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < BK / kRowThreads; ++jj) {
        int kc = l8 + kRowThreads * jj, p = kv0 + kc;
        float dot = 0;
        for (int d = 0; d < hd; ++d) dot += qs[r * ld + d] * ks[kc * ld + d];
        s[jj] = active && p <= my_pos && p < kv_end ? dot * scale : -INFINITY;
        m_tile = fmaxf(m_tile, s[jj]);
      }
#pragma unroll
      for (int o8 = kRowThreads / 2; o8 > 0; o8 >>= 1) m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, o8));
      float m_new = fmaxf(m_i, m_tile);
      float alpha = m_i == -INFINITY ? 0.0f : expf(m_i - m_new);
      float l_tile = 0;
#pragma unroll
      for (int jj = 0; jj < BK / kRowThreads; ++jj) {
        float p = s[jj] == -INFINITY ? 0.0f : expf(s[jj] - m_new);
        ps[r * BK + l8 + kRowThreads * jj] = p;
        l_tile += p;
      }
#pragma unroll
      for (int o8 = kRowThreads / 2; o8 > 0; o8 >>= 1) l_tile += __shfl_xor_sync(0xffffffffu, l_tile, o8);
      l_i = l_i * alpha + l_tile;
      m_i = m_new;
      __syncwarp();
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        int d = l8 + kRowThreads * j;
        if (d < hd) {
          float acc = o[j] * alpha;
          for (int kc = 0; kc < BK; ++kc) acc += ps[r * BK + kc] * vs[kc * hd + d];
          o[j] = acc;
        }
      }
    }
    if (active) {
      float inv_l = 1.0f / l_i;
      size_t base = (size_t(t0 + r) * nH + h) * hd;
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        int d = l8 + kRowThreads * j;
        if (d < hd) out[base + d] = o[j] * inv_l;
      }
    }
    __syncthreads();
    if (tid < kBQ && !tok_done[tid] && tok_slot[tid] == cur_slot) tok_done[tid] = 1;
  }
}

template <int MAXJ, int BK>
void launch_prefill(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                    const Tensor& slots, const Tensor& positions, int64_t n_heads, float scale, const Tensor& out) {
  int hd = static_cast<int>(k_cache.dim(3)), T = static_cast<int>(q.dim(0));
  size_t smem = static_cast<size_t>(kBQ * (hd + 1) + BK * (hd + 1) + BK * hd + kBQ * BK) * sizeof(float);
  auto kernel = attention_prefill<MAXJ, BK>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  dim3 grid((T + kBQ - 1) / kBQ, static_cast<unsigned>(n_heads));
  kernel<<<grid, kPrefillThreads, smem, ctx.stream>>>(
      q.data<float>(), k_cache.data<float>(), v_cache.data<float>(), slots.data<int32_t>(), positions.data<int32_t>(),
      T, int(k_cache.dim(0)), int(n_heads), int(k_cache.dim(1)), int(k_cache.dim(2)), hd, scale, out.data<float>(),
      ctx.status);
}

}  // namespace

int64_t attention_scratch_floats(const Tensor& q, const Tensor& k_cache, int64_t n_heads, int num_sms) {
  int64_t T = q.dim(0);
  if (T > kDecodeMaxTokens) return 0;
  int64_t n_kv = k_cache.dim(1), hd = k_cache.dim(3);
  DecodePlan plan = decode_plan(T, n_kv, n_heads / n_kv, k_cache.dim(2), hd, num_sms);
  return T * n_heads * plan.n_part * (hd + 2);
}

void launch_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& slots, const Tensor& positions, int64_t n_heads, float scale, const Tensor& out,
                      float* scratch, int num_sms) {
  int64_t T = q.dim(0), S = k_cache.dim(0), n_kv = k_cache.dim(1), C = k_cache.dim(2), hd = k_cache.dim(3);
  if (T == 0 || hd == 0) return;
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"slots", slots}, Named{"positions", positions}};
  WEFT_CHECK(C > 0 && S > 0, "attention", "kCache ", k_cache, " has no positions to attend to");
  WEFT_CHECK(C < (int64_t{1} << 31) && T * n_heads < (int64_t{1} << 31), "attention", "shapes too large (", q, ", ",
             k_cache, ")");
  if (T <= kDecodeMaxTokens) {
    int64_t group = n_heads / n_kv;
    DecodePlan plan = decode_plan(T, n_kv, group, C, hd, num_sms);
    WEFT_CHECK(plan.smem <= 48 * 1024, "attention", "a GQA group of ", group, " heads of ", hd,
               " dims does not fit the decode kernel's shared memory (", q, ", ", k_cache, ")");
    float* part_out = scratch;
    float* part_ml = scratch + T * n_heads * plan.n_part * hd;
    dim3 grid(plan.n_part, static_cast<unsigned>(T * n_kv));
    attention_decode_partial<<<grid, kDecodeThreads, plan.smem, ctx.stream>>>(
        q.data<float>(), k_cache.data<float>(), v_cache.data<float>(), slots.data<int32_t>(),
        positions.data<int32_t>(), int(S), int(n_heads), int(n_kv), int(C), int(hd), plan.P, plan.n_part, scale,
        part_out, part_ml, ctx.status);
    check_launch(ctx, "attention", args);
    attention_decode_merge<<<static_cast<unsigned>(T * n_heads), 128, 0, ctx.stream>>>(
        slots.data<int32_t>(), positions.data<int32_t>(), int(S), int(n_heads), int(C), int(hd), plan.P, plan.n_part,
        part_out, part_ml, out.data<float>());
    check_launch(ctx, "attention", args);
    return;
  }
  if (hd <= 64)
    launch_prefill<8, 32>(ctx, q, k_cache, v_cache, slots, positions, n_heads, scale, out);
  else if (hd <= 128)
    launch_prefill<16, 32>(ctx, q, k_cache, v_cache, slots, positions, n_heads, scale, out);
  else if (hd <= 256)
    launch_prefill<32, 16>(ctx, q, k_cache, v_cache, slots, positions, n_heads, scale, out);
  else
    WEFT_FAIL("attention", "headDim ", hd, " is over 256, the most the cuda prefill kernel takes (", q, ", ", k_cache,
              ")");
  check_launch(ctx, "attention", args);
}

}  // namespace weft::cuda
