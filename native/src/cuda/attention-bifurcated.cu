// Bifurcated decode attention on CUDA cores in fp32 (f32 caches, and head dims the tensor-core kernels of
// attention-bifurcated-mma.cu do not take): prefix, private and merge kernels, and the launch that picks between the
// two (attention-bifurcated.cuh). Scores are dot(q, k) * scale, softmax partials in fp32 with exp(score - max), as
// attention-decode.cu.
#include <algorithm>

#include "cuda/attention-bifurcated.cuh"
#include "cuda/attention-bifurcated-mma.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kRowTile = 16;   // query rows (member x head) per block: two chunks of kRows
constexpr int kRows = 8;       // query rows accumulated in registers at once
constexpr int kMaxHeadDim = 256;

struct Plan {
  int P;        // positions per chunk
  int slots_a;  // prefix chunks per (token, head): ceil(C / P)
  int slots_b;  // private chunks per (token, head): ceil(C / P)
  size_t smem;
};

using bifurcated::ceil_div;
using bifurcated::group_of;
using bifurcated::shared_of;

// smem: key row offsets [P] i64, q rows [kRowTile][hd], scores [kRowTile][P], the rows' (token, head) [kRowTile],
// the group's members [T] (prefix blocks).
size_t smem_bytes(int P, int64_t hd, int64_t T) {
  return static_cast<size_t>(P) * sizeof(int64_t) + static_cast<size_t>(kRowTile * hd + kRowTile * P) * sizeof(float) +
         static_cast<size_t>(kRowTile + T) * sizeof(int32_t);
}

Plan plan_for(int64_t T, int64_t n_kv, int64_t C, int64_t hd, int num_sms) {
  int P = 256;
  // a batch with few tokens and short rows: shorter chunks, for about two waves of blocks
  while (P > 64 && T * n_kv * ceil_div(C, P) < 2 * num_sms) P /= 2;
  while (P > 16 && smem_bytes(P, hd, T) > 48 * 1024) P /= 2;
  return {P, ceil_div(C, P), ceil_div(C, P), smem_bytes(P, hd, T)};
}

// The 8 partial sums of a lane reduced over the warp, transposed: afterwards lane l holds, in acc[0], the whole
// sum of row (l >> 2) & 7, for the lanes with l % 4 == 0 (9 shuffles instead of 8 warp_sums' 40).
__device__ __forceinline__ float warp_sum8(float (&acc)[kRows], int lane) {
#pragma unroll
  for (int half = 4, bit = 16; half >= 1; half >>= 1, bit >>= 1) {
    const bool upper = lane & bit;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? acc[j] : acc[j + half];
      const float keep = upper ? acc[j + half] : acc[j];
      acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
    }
  }
  acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 2);
  acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
  return acc[0];
}

// grid (n_tiles * slots, tasks * n_kv). prefix: task = group g over its positions [0, groupShared[g]) read through
// its first member's row; else task = token t over [shared(t), positions[t] + 1). The rows of a task are its
// members x the kv head's GQA heads (prefix) or the kv head's GQA heads (private); a block takes kRowTile of them.
// part_out [T * nH, slots_a + slots_b, hd], part_ml [T * nH, slots_a + slots_b, 2] (max, sum); chunk c of a
// task is slot c (prefix) or slots_a + c (private). VEC: elements per load (2 for an even hd); ITERS: loads of
// VEC elements per lane to cover a row, ceil(hd / (32 VEC)).
template <typename KV, int VEC, int ITERS>
__global__ void __launch_bounds__(kThreads)
    bifurcated_partial(bool prefix, const float* __restrict__ q, const KV* __restrict__ k_cache,
                       const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                       const int32_t* __restrict__ positions, const int32_t* __restrict__ token_group,
                       const int32_t* __restrict__ group_shared, int T, int G, int nH, int hd, int P, int n_tiles,
                       int slots_a, int n_slots, float scale, float* __restrict__ part_out,
                       float* __restrict__ part_ml, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  const int n_kv = static_cast<int>(kv.n_kv), group = nH / n_kv;
  const int tile = blockIdx.x % n_tiles, c = blockIdx.x / n_tiles;
  const int task = blockIdx.y / n_kv, g = blockIdx.y % n_kv, h_first = g * group;
  extern __shared__ float smem[];
  int64_t* rows = reinterpret_cast<int64_t*>(smem);  // [P]: each key row's offset in the cache
  float* qs = smem + 2 * P;                           // [kRowTile][hd]
  float* sc = qs + kRowTile * hd;                     // [kRowTile][P]: scores, then exp(score - max)
  int* row_th = reinterpret_cast<int*>(sc + kRowTile * P);  // [kRowTile]: (token * nH + head) of each row
  int* members = row_th + kRowTile;                         // [T]: the group's tokens, in order (prefix)

  // The task's range [lo, hi), the sequence row it is read through, its rows and its slot.
  int lo, hi, seq, n_rows, slot, reporter_t;
  if (prefix) {
    const int shared = shared_of(group_shared, task, kv.capacity());
    lo = c * P;
    if (shared <= 0 || lo >= shared) return;
    __shared__ int n_members;
    bifurcated::find_members(token_group, T, G, task, members, &n_members);
    __syncthreads();
    if (n_members == 0) return;
    reporter_t = members[0];
    seq = token_seq[reporter_t];
    hi = min(lo + P, shared);
    if (!kv_token_in_range(kv, reporter_t, seq, hi - 1, kKvRead, status, c == 0 && g == 0 && threadIdx.x == 0)) return;
    n_rows = min(kRowTile, n_members * group - tile * kRowTile);
    if (n_rows <= 0) return;
    for (int r = threadIdx.x; r < n_rows; r += blockDim.x) {
      const int x = tile * kRowTile + r;
      row_th[r] = members[x / group] * nH + h_first + x % group;
    }
    slot = c;
  } else {
    const int t = task, pos = positions[t];
    reporter_t = t;
    seq = token_seq[t];
    if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, c == 0 && g == 0 && threadIdx.x == 0)) return;
    lo = shared_of(group_shared, group_of(token_group, t, G), kv.capacity()) + c * P;
    hi = min(lo + P, pos + 1);
    if (lo >= hi) return;
    n_rows = min(kRowTile, group - tile * kRowTile);
    if (n_rows <= 0) return;
    for (int r = threadIdx.x; r < n_rows; r += blockDim.x) row_th[r] = t * nH + h_first + tile * kRowTile + r;
    slot = slots_a + c;
  }
  const int np = hi - lo;
  __syncthreads();
  for (int i = threadIdx.x; i < np; i += blockDim.x) rows[i] = kv_read_row(kv, reporter_t, seq, g, lo + i, status) * hd;
  for (int i = threadIdx.x; i < kRowTile * hd; i += blockDim.x) {
    const int r = i / hd;
    qs[i] = r < n_rows ? q[size_t(row_th[r]) * hd + i % hd] : 0.0f;  // rows past the tile score 0, unused
  }
  __syncthreads();

  // Scores: a warp per key row against every row of the tile. Lane l holds elements (it * 32 + l) * VEC .. + VEC
  // of every query row in registers (loaded once) and of the key row, so the products need no shared memory.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float q_reg[kRowTile][ITERS][VEC];
#pragma unroll
  for (int r = 0; r < kRowTile; ++r)
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int d = (it * 32 + lane) * VEC;
      if (d < hd) load_as_f32(qs + r * hd + d, q_reg[r][it]);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (d >= hd) q_reg[r][it][e] = 0;  // and k_reg's element there is 0 too
    }
  // key rows a warp apart: the next one's load is issued before this one's products (two loads in flight)
  auto load_key = [&](int i, float (&k_reg)[ITERS][VEC]) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int d = (it * 32 + lane) * VEC;
      if (d < hd && i < np) load_as_f32(k_cache + rows[i] + d, k_reg[it]);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (d >= hd || i >= np) k_reg[it][e] = 0;
    }
  };
  float k_next[ITERS][VEC];
  load_key(warp, k_next);
  for (int i = warp; i < np; i += warps) {
    float k_reg[ITERS][VEC];
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
#pragma unroll
      for (int e = 0; e < VEC; ++e) k_reg[it][e] = k_next[it][e];
    load_key(i + warps, k_next);
#pragma unroll
    for (int r0 = 0; r0 < kRowTile; r0 += kRows) {
      if (r0 >= n_rows) break;  // block-uniform
      float acc[kRows];
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        acc[j] = 0;
#pragma unroll
        for (int it = 0; it < ITERS; ++it)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j] += q_reg[r0 + j][it][e] * k_reg[it][e];
      }
      const float s = warp_sum8(acc, lane);
      const int r = r0 + ((lane >> 2) & 7);
      if ((lane & 3) == 0 && r < n_rows) sc[r * P + i] = s * scale;
    }
  }
  __syncthreads();

  for (int r = warp; r < n_rows; r += warps) {
    float m = -INFINITY;
    for (int i = lane; i < np; i += 32) m = fmaxf(m, sc[r * P + i]);
    m = warp_max(m);
    float l = 0;
    for (int i = lane; i < np; i += 32) {
      const float e = expf(sc[r * P + i] - m);
      sc[r * P + i] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      const size_t x = size_t(row_th[r]) * n_slots + slot;
      part_ml[2 * x] = m;
      part_ml[2 * x + 1] = l;
    }
  }
  __syncthreads();

  // Values: thread (x, rg) owns element slots x, x + width, ... of the row chunks rg, rg + n_rg, ...; each value
  // row element is loaded once per chunk of kRows query rows.
  const int slots = hd / VEC, width = min(slots, kThreads), n_rg = kThreads / width;
  const int x0 = threadIdx.x % width, rg = threadIdx.x / width;
  for (int r0 = rg * kRows; rg < n_rg && r0 < n_rows; r0 += n_rg * kRows)
    for (int s = x0; s < slots; s += width) {
      float acc[kRows][VEC];
#pragma unroll
      for (int j = 0; j < kRows; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = 0;
      // four positions at a time: one 16-byte read of each row's weights (P and i are multiples of 4)
      int i = 0;
      for (; i + 4 <= np; i += 4) {
        float v_d[4][VEC];
#pragma unroll
        for (int u = 0; u < 4; ++u) load_as_f32(v_cache + rows[i + u] + s * VEC, v_d[u]);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const float4 w = *reinterpret_cast<const float4*>(sc + (r0 + j) * P + i);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc[j][e] += w.x * v_d[0][e];
            acc[j][e] += w.y * v_d[1][e];
            acc[j][e] += w.z * v_d[2][e];
            acc[j][e] += w.w * v_d[3][e];
          }
        }
      }
      for (; i < np; ++i) {
        float v_d[VEC];
        load_as_f32(v_cache + rows[i] + s * VEC, v_d);
#pragma unroll
        for (int j = 0; j < kRows; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] += sc[(r0 + j) * P + i] * v_d[e];
      }
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        if (r0 + j >= n_rows) continue;
        float* o = part_out + (size_t(row_th[r0 + j]) * n_slots + slot) * hd + s * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = acc[j][e];
      }
    }
}

// grid (T * nH): merge one (token, head)'s prefix chunks, then its private chunks, by their log-sum-exp.
__global__ void bifurcated_merge(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                 const int32_t* __restrict__ positions, const int32_t* __restrict__ token_group,
                                 const int32_t* __restrict__ group_shared, int G, int nH, int hd, int P, int slots_a,
                                 int n_slots, const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                 float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  const int th = blockIdx.x, t = th / nH;
  const int seq = token_seq[t], pos = positions[t];
  float* o = out + size_t(th) * hd;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {  // reported by the partial kernel
    for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0;
    return;
  }
  const int shared = shared_of(group_shared, group_of(token_group, t, G), kv.capacity());
  const int n_a = ceil_div(shared, P), n_b = ceil_div(max(0, pos + 1 - shared), P);
  const float* ml = part_ml + size_t(th) * n_slots * 2;
  auto slot_of = [&](int k) { return k < n_a ? k : slots_a + k - n_a; };  // k-th partial in merge order
  float M = -INFINITY;
  for (int k = 0; k < n_a + n_b; ++k) M = fmaxf(M, ml[2 * slot_of(k)]);
  float L = 0;
  for (int k = 0; k < n_a + n_b; ++k) L += expf(ml[2 * slot_of(k)] - M) * ml[2 * slot_of(k) + 1];
  const float inv_L = 1.0f / L;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int k = 0; k < n_a + n_b; ++k) {
      const int s = slot_of(k);
      acc += expf(ml[2 * s] - M) * part_out[(size_t(th) * n_slots + s) * hd + d];
    }
    o[d] = acc * inv_L;
  }
}

}  // namespace

int64_t attention_bifurcated_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table,
                                            const Tensor& group_shared, int64_t n_heads, int num_sms) {
  const int64_t T = q.dim(0), hd = k_cache.dim(3), C = kv_block_table.dim(1) * k_cache.dim(2);
  if (bifurcated::mma_takes(k_cache.dtype, hd))
    return bifurcated::mma_scratch_floats(T, group_shared.dim(0), n_heads, k_cache.dim(1), C, hd, num_sms);
  const Plan plan = plan_for(T, k_cache.dim(1), C, hd, num_sms);
  return T * n_heads * (plan.slots_a + plan.slots_b) * (hd + 2);
}

namespace {

// The partial kernels (the prefix alone when !with_private: a benchmark's view of it), then the merge into out
// (none when out is null).
void launch_bifurcated(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                       const Tensor& token_group, const Tensor& group_shared, int64_t n_heads, float scale,
                       const Tensor* out, float* scratch, int num_sms, bool with_private) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int64_t T = q.dim(0), n_kv = k_cache.dim(1), C = kv.capacity(), hd = k_cache.dim(3), G = group_shared.dim(0);
  if (T == 0 || hd == 0) return;
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"kvBlockTable", kv_block_table},
               Named{"tokenGroup", token_group}, Named{"groupShared", group_shared}};
  const char* op = "attentionBifurcated";
  WEFT_CHECK(C > 0 && kv.n_blocks > 0 && kv.n_seqs > 0, op, "kCache ", k_cache, " and kvBlockTable ", kv_block_table,
             " have no positions to attend to");
  WEFT_CHECK(C < (int64_t{1} << 31) && T * n_heads < (int64_t{1} << 31), op, "shapes too large (", q, ", ", k_cache,
             ", ", kv_block_table, ")");
  if (bifurcated::mma_takes(k_cache.dtype, hd)) {
    bifurcated::launch_mma(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, token_group, group_shared,
                           n_heads, scale, out, scratch, num_sms, with_private);
    check_launch(ctx, op, args);
    return;
  }
  const Plan plan = plan_for(T, n_kv, C, hd, num_sms);
  WEFT_CHECK(plan.smem <= 48 * 1024, op, "a batch of ", T, " tokens with heads of ", hd,
             " dims does not fit the kernel's shared memory (", q, ", ", k_cache, ")");
  const int group = static_cast<int>(n_heads / n_kv), n_slots = plan.slots_a + plan.slots_b;
  float* part_out = scratch;
  float* part_ml = scratch + T * n_heads * n_slots * hd;
  // prefix tiles: a group's rows are at most every token x the GQA heads; private tiles: the GQA heads
  const int tiles_a = ceil_div(T * group, kRowTile), tiles_b = ceil_div(group, kRowTile);
  auto partial = [&](auto kernel, const auto* k, const auto* v) {
    if (G > 0)
      launch_pdl(ctx, kernel, dim3(tiles_a * plan.slots_a, static_cast<unsigned>(G * n_kv)), kThreads, plan.smem, true,
                 q.data<float>(), k, v, kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
                 token_group.data<int32_t>(), group_shared.data<int32_t>(), int(T), int(G), int(n_heads), int(hd),
                 plan.P, tiles_a, plan.slots_a, n_slots, scale, part_out, part_ml, ctx.status);
    if (with_private)
      launch_pdl(ctx, kernel, dim3(tiles_b * plan.slots_b, static_cast<unsigned>(T * n_kv)), kThreads, plan.smem,
                 false, q.data<float>(), k, v, kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
                 token_group.data<int32_t>(), group_shared.data<int32_t>(), int(T), int(G), int(n_heads), int(hd),
                 plan.P, tiles_b, plan.slots_a, n_slots, scale, part_out, part_ml, ctx.status);
  };
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    const KV *k = k_cache.data<KV>(), *v = v_cache.data<KV>();
    if (hd % 2 == 1)
      partial(bifurcated_partial<KV, 1, kMaxHeadDim / 32>, k, v);
    else if (hd <= 64)
      partial(bifurcated_partial<KV, 2, 1>, k, v);
    else if (hd <= 128)
      partial(bifurcated_partial<KV, 2, 2>, k, v);
    else if (hd <= 192)
      partial(bifurcated_partial<KV, 2, 3>, k, v);
    else
      partial(bifurcated_partial<KV, 2, 4>, k, v);
  });
  check_launch(ctx, op, args);
  if (!out) return;
  launch_pdl(ctx, bifurcated_merge, static_cast<unsigned>(T * n_heads), 128, 0, kv, token_seq.data<int32_t>(),
             positions.data<int32_t>(), token_group.data<int32_t>(), group_shared.data<int32_t>(), int(G),
             int(n_heads), int(hd), plan.P, plan.slots_a, n_slots, part_out, part_ml, out->data<float>());
  check_launch(ctx, op, args);
}

}  // namespace

void launch_attention_bifurcated(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                 const Tensor& token_group, const Tensor& group_shared, int64_t n_heads, float scale,
                                 const Tensor& out, float* scratch, int num_sms) {
  launch_bifurcated(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, token_group, group_shared,
                    n_heads, scale, &out, scratch, num_sms, true);
}

namespace detail {
void launch_attention_bifurcated_prefix(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                        const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                        const Tensor& token_group, const Tensor& group_shared, int64_t n_heads,
                                        float scale, float* scratch, int num_sms) {
  launch_bifurcated(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, token_group, group_shared,
                    n_heads, scale, nullptr, scratch, num_sms, false);
}
}  // namespace detail

}  // namespace weft::cuda
