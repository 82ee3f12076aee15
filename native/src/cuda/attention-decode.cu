// Decode attention: split-K flash-decoding over the KV block table (attention.cuh has the plan). Scores are
// dot(q, k) * scale as in the CPU; softmax in fp32 with exp of (score - max). The cache is f32 or bf16, widened
// to f32 as it is loaded, or fp8 / int8 codes whose row scales are folded in once per row rather than per
// element: a key's into its score (dot(q, codes) * scale * k_scale), a value's into its softmax weight
// (exp(score - max) * v_scale; the sum of the weights is taken before). Each K/V element is read once per kv
// head, for the whole GQA group.
#include <algorithm>

#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

// ---- decode: split-K

constexpr int kDecodeThreads = 128;  // 4 warps
constexpr int kHeadChunk = 8;        // query heads accumulated in registers at once
// Blocks per SM the registers must allow: the kernel is latency-bound (short dependent loads and reductions), so
// occupancy is its speed. Without the bound the paired loads took 167 registers (3 blocks per SM) and batch 8 at a
// 1024-token context decoded 22% slower than with single loads at 40 registers (measured on H200).
constexpr int kDecodeMinBlocks = 8;

struct DecodePlan {
  int P;       // positions per partition
  int n_part;  // ceil(C / P)
  size_t smem;
};

// Cache elements per load: pairs when hd is even (8-byte f32, 4-byte bf16 loads, 2-byte fp8 / int8 loads of the
// value pass), else single elements. The key pass of the 1-byte caches loads 4 codes (hd % 4 == 0, backend.cc):
// a warp then reads 128 bytes of a row at once.
int elements_per_load(int64_t hd) { return hd % 2 == 0 ? 2 : 1; }
constexpr int kQuantKeyVec = 4;

// The value pass gives each thread one load slot of a row (VEC elements); when a row has fewer slots (hd / VEC)
// than the block has threads, the threads split the rows into R groups, so that every thread loads, and the R
// partial sums are added in group order at the end. R = 1 when the slots fill the block.
__host__ __device__ __forceinline__ int value_row_groups(int hd, int vec) {
  const int slots = hd / vec;
  return slots >= kDecodeThreads ? 1 : kDecodeThreads / slots;
}

// C: the positions a sequence can hold (maxBlocksPerSeq * B). quantized: a 1-byte cache (its rows' k and v
// scales take 2 P floats more of shared memory).
DecodePlan decode_plan(int64_t T, int64_t n_kv, int64_t group, int64_t C, int64_t hd, int num_sms, bool quantized) {
  int P = 256;
  // Enough blocks for about two waves when the batch is small, partitions of at least 64 positions.
  while (P > 64 && T * n_kv * ((C + P - 1) / P) < 2 * num_sms) P /= 2;
  const int R = value_row_groups(static_cast<int>(hd), elements_per_load(hd));
  auto smem = [&](int p) {  // key row offsets, q rows, scores, the value pass's partial sums when R > 1, scales
    return static_cast<size_t>(p) * sizeof(int64_t) +
           static_cast<size_t>(group * hd + group * p + (R > 1 ? R * kHeadChunk * hd : 0) + (quantized ? 2 * p : 0)) *
               sizeof(float);
  };
  while (P > 16 && smem(P) > 48 * 1024) P /= 2;
  return {P, static_cast<int>((C + P - 1) / P), smem(P)};
}

// grid (n_part, T * n_kv). part_out [T * nH, n_part, hd], part_ml [T * nH, n_part, 2] (max, sum). KV: the
// cache's element type (f32, bf16, or the 1-byte codes with k_scales, v_scales [rows]); VEC: elements per load of
// a key or value row (elements_per_load; the same threads sum the same elements in the same order for f32 and
// bf16, so a bf16 cache gives the f32 cache's result bit for bit when it holds the same values). The key pass of
// the 1-byte caches loads kQuantKeyVec codes.
template <typename KV, int VEC>
__global__ void __launch_bounds__(kDecodeThreads, kDecodeMinBlocks)
    attention_decode_partial(const float* __restrict__ q, const KV* __restrict__ k_cache,
                             const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                             const int32_t* __restrict__ positions, int nH, int hd, int P, int n_part, float scale,
                             float* __restrict__ part_out, float* __restrict__ part_ml, DeviceStatus* status,
                             const float* __restrict__ k_scales, const float* __restrict__ v_scales) {
  constexpr bool quantized = kKvQuantized<KV>;
  constexpr int KVEC = quantized ? kQuantKeyVec : VEC;
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv);
  int c = blockIdx.x, t = blockIdx.y / n_kv, g = blockIdx.y % n_kv;
  int seq = token_seq[t], pos = positions[t];
  if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, c == 0 && g == 0 && threadIdx.x == 0)) return;
  int len = pos + 1, p0 = c * P;
  if (p0 >= len) return;
  int np = min(P, len - p0);
  int group = nH / n_kv, h_first = g * group;
  extern __shared__ float smem[];
  int64_t* rows = reinterpret_cast<int64_t*>(smem);  // [P]: each key row's offset in the cache, via the table
  float* qs = smem + 2 * P;                           // [group][hd]
  float* sc = qs + group * hd;                        // [group][P]: scores, then exp(score - max)
  float* partial = sc + group * P;                    // [R][kHeadChunk][hd]: the value pass's sums, R > 1
  const int R = value_row_groups(hd, VEC);
  float* k_row_scale = partial + (R > 1 ? R * kHeadChunk * hd : 0);  // [P] quantized only: each row's k scale
  float* v_row_scale = k_row_scale + P;                               // [P] and v scale
  for (int i = threadIdx.x; i < np; i += blockDim.x) {
    const int64_t row = kv_read_row(kv, t, seq, g, p0 + i, status);
    rows[i] = row * hd;
    if constexpr (quantized) {
      k_row_scale[i] = k_scales[row];
      v_row_scale[i] = v_scales[row];
    }
  }
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) qs[i] = q[(size_t(t) * nH + h_first) * hd + i];
  __syncthreads();

  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int i = warp; i < np; i += warps) {
    const KV* kr = k_cache + rows[i];
    for (int h0 = 0; h0 < group; h0 += kHeadChunk) {
      float acc[kHeadChunk];
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) acc[j] = 0;
      for (int d = lane * KVEC; d < hd; d += 32 * KVEC) {
        float k_d[KVEC];
        load_as_f32(kr + d, k_d);
#pragma unroll
        for (int j = 0; j < kHeadChunk; ++j) {
          if (h0 + j >= group) continue;
          float q_d[KVEC];  // one 8-byte shared load for VEC = 2: lanes read consecutive pairs, no bank conflict
          load_as_f32(qs + (h0 + j) * hd + d, q_d);
#pragma unroll
          for (int e = 0; e < KVEC; ++e) acc[j] += q_d[e] * k_d[e];
        }
      }
      float row_scale = scale;
      if constexpr (quantized) row_scale = scale * k_row_scale[i];
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        float s = warp_sum(acc[j]);
        if (lane == 0 && h0 + j < group) sc[(h0 + j) * P + i] = s * row_scale;
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
      sc[h * P + i] = quantized ? e * v_row_scale[i] : e;
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

  // Values: thread slot `slot` of row group r loads elements [slot VEC, (slot + 1) VEC) of rows r, r + R, ...
  const int slots = hd / VEC;
  const int r = R > 1 ? threadIdx.x / slots : 0, first_slot = R > 1 ? threadIdx.x % slots : threadIdx.x;
  const int slot_step = R > 1 ? slots : blockDim.x;  // R > 1: one slot per thread
  for (int h0 = 0; h0 < group; h0 += kHeadChunk) {
    for (int slot = first_slot; r < R && slot < slots; slot += slot_step) {
      float acc[kHeadChunk][VEC];
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = 0;
#pragma unroll 4
      for (int i = r; i < np; i += R) {
        float v_d[VEC];
        load_as_f32(v_cache + rows[i] + slot * VEC, v_d);
#pragma unroll
        for (int j = 0; j < kHeadChunk; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (h0 + j < group) acc[j][e] += sc[(h0 + j) * P + i] * v_d[e];
      }
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = slot * VEC + e;
          if (h0 + j >= group) continue;
          if (R > 1)
            partial[(r * kHeadChunk + j) * hd + d] = acc[j][e];
          else
            part_out[((size_t(t) * nH + h_first + h0 + j) * n_part + c) * hd + d] = acc[j][e];
        }
    }
    if (R > 1) {  // block-uniform: add the row groups' sums in order
      __syncthreads();
      for (int x = threadIdx.x; x < kHeadChunk * hd; x += blockDim.x) {
        const int j = x / hd, d = x % hd;
        if (h0 + j >= group) continue;
        float sum = 0;
        for (int rr = 0; rr < R; ++rr) sum += partial[(rr * kHeadChunk + j) * hd + d];
        part_out[((size_t(t) * nH + h_first + h0 + j) * n_part + c) * hd + d] = sum;
      }
      __syncthreads();  // before the next chunk of heads overwrites `partial`
    }
  }
}

// grid (T * nH): merge the partitions of one (token, head) in partition order.
__global__ void attention_decode_merge(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                       const int32_t* __restrict__ positions, int nH, int hd, int P, int n_part,
                                       const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                       float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  int th = blockIdx.x, t = th / nH;
  int seq = token_seq[t], pos = positions[t];
  float* o = out + size_t(th) * hd;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {  // reported by the partial kernel
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

}  // namespace

namespace detail {
int64_t attention_decode_scratch_floats(int64_t T, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms,
                                        bool quantized) {
  DecodePlan plan = decode_plan(T, n_kv, n_heads / n_kv, C, hd, num_sms, quantized);
  return T * n_heads * plan.n_part * (hd + 2);
}

void launch_attention_decode(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                             int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  int64_t T = q.dim(0), n_kv = k_cache.dim(1), C = kv.capacity(), hd = k_cache.dim(3);
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"tokenSeq", token_seq},
               Named{"kvBlockTable", kv_block_table}, Named{"positions", positions}};
  int64_t group = n_heads / n_kv;
  DecodePlan plan = decode_plan(T, n_kv, group, C, hd, num_sms, k_cache.is_kv_quantized());
  WEFT_CHECK(plan.smem <= 48 * 1024, "attention", "a GQA group of ", group, " heads of ", hd,
             " dims does not fit the decode kernel's shared memory (", q, ", ", k_cache, ")");
  float* part_out = scratch;
  float* part_ml = scratch + T * n_heads * plan.n_part * hd;
  dim3 grid(plan.n_part, static_cast<unsigned>(T * n_kv));
  auto partial = [&](auto kernel, const auto* k, const auto* v) {
    launch_pdl(ctx, kernel, grid, kDecodeThreads, plan.smem, q.data<float>(), k, v, kv, token_seq.data<int32_t>(),
               positions.data<int32_t>(), int(n_heads), int(hd), plan.P, plan.n_part, scale, part_out, part_ml,
               ctx.status, k_cache.kv_scales(), v_cache.kv_scales());
  };
  WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV, {
    const KV *k = k_cache.data<KV>(), *v = v_cache.data<KV>();
    if (elements_per_load(hd) == 2)
      partial(attention_decode_partial<KV, 2>, k, v);
    else
      partial(attention_decode_partial<KV, 1>, k, v);
  });
  check_launch(ctx, "attention", args);
  launch_pdl(ctx, attention_decode_merge, static_cast<unsigned>(T * n_heads), 128, 0,
      kv, token_seq.data<int32_t>(), positions.data<int32_t>(), int(n_heads), int(hd), plan.P, plan.n_part,
      part_out, part_ml, out.data<float>());
  check_launch(ctx, "attention", args);
}
}  // namespace detail

}  // namespace weft::cuda
