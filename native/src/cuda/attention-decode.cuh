// Shared by the two decode attention kernels (attention-decode.cu on CUDA cores, attention-decode-mma.cu on tensor
// cores): the partition plan, which both follow so that the scratch they need and the merge are the same, and the
// steps they share (the block's unit, its row lookups, the online softmax of a tile). Only for .cu files.
#pragma once

#include <algorithm>

#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda {
namespace decode {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;       // key (and value) rows per pipeline stage: one per lane in the softmax
constexpr int kStages = 3;          // tiles in flight: two arriving while one is used
// Blocks resident per SM the plan assumes, and the most positions a block reads (their row indices stay in shared
// memory). f32 and bf16: the tensor-core kernel's ~110 KiB a block at head dims up to 128 allows 2. The 1-byte
// caches: tiles of 2 KiB (with their rows' scales) and two stages a warp take 33 KiB a block beside the row indices
// (8 KiB at 2048 positions), so 4 fit (16 warps an SM, at most 128 registers a thread). Their tiles cost more
// instructions a byte than bf16's (the conversions to f16), and with 8 warps an SM each warp's chain of dependent
// instructions, not the bytes, set the time (ncu: 2 warps a scheduler issuing 0.49 a cycle, DRAM at 54%). 16 warps:
// 1.3x -> 1.4-1.6x bf16's speed at 32K (H200). Session 18: 5 blocks, or 3 stages at 4 blocks, were 3-5% faster at
// batch 8 and 4-6% slower for Llama-3-8B at batch 1 (bench/RESULTS.md).
// Long partitions: each block's start (its row lookups, the first tiles' latency) is a bubble that the blocks of the
// next round do not hide, so the fewer rounds the better. Session 19 (H200, 32K, batch 1): bf16 up to 2048 positions
// (896 before) took Llama-3-8B from two rounds to one (51.2 -> 44.5 us a layer) and Llama-2-7B from four to two
// (146.5 -> 141.4 us, 89% of the copy bandwidth); codes up to 1024 (512 before) Llama-2-7B fp8 99.2 -> 96.3 us.
// Session 26: codes up to 2048 take Llama-2-7B at 32K, batch 1, from two rounds to one (fp8 77.4 -> 73.1 us a layer
// in graphs of 8 launches; ncu 76.3 us against bf16's 140.0).
struct PlanLimits {
  int blocks_per_sm, max_partition;
};
constexpr PlanLimits kPlanLimits{2, 2048}, kCodePlanLimits{4, 2048};
constexpr int kBlocksPerSm = kPlanLimits.blocks_per_sm;  // the bifurcated kernels' plan too
// What a block's start costs (its row lookups) in tiles' worth of time.
constexpr int kBlockStartTiles = 2;
static_assert(kTileRows == 32, "the softmax gives each lane of a warp one row of a tile");

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The partitions of a launch: n_part per (token, kv head, head chunk), from the shapes, the SM count and whether the
// cache holds 1-byte codes (their kernel fits more blocks an SM): f32 and bf16 caches sum in the same order. A
// token's positions 0 .. pos are cut into n_part partitions of the same whole number of tiles (partition_rows), so
// a short sequence in a large cache still spreads over every block. n_part is the count that makes the grid's
// rounds of resident blocks times the tiles each block reads (plus its start) smallest at the full capacity.
struct DecodePlan {
  int P;              // positions per partition at the full capacity C: the most a block reads
  int n_part;         // partitions per (token, kv head, head chunk)
  int head_chunk;     // HC: query heads one block serves (1, 2, 4 or 8)
  int n_head_chunks;  // ceil(group / HC): blocks per (token, kv head, partition)
};

inline DecodePlan decode_plan(int64_t T, int64_t n_kv, int64_t group, int64_t C, int num_sms, bool codes) {
  // Eager steps ask for the same plan at every layer (and the scratch size before it): the search below, up to
  // 1024 candidates, runs once per distinct shape in a row, not once per launch.
  thread_local int64_t last_key[6] = {-1, -1, -1, -1, -1, -1};
  thread_local DecodePlan last{};
  const int64_t key[6] = {T, n_kv, group, C, num_sms, codes};
  if (std::equal(key, key + 6, last_key)) return last;
  const PlanLimits limits = codes ? kCodePlanLimits : kPlanLimits;
  DecodePlan p{};
  p.head_chunk = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  p.n_head_chunks = static_cast<int>(ceil_div(group, p.head_chunk));
  const int64_t units = T * n_kv * p.n_head_chunks, tiles = ceil_div(C, kTileRows);
  const int64_t slots = int64_t{limits.blocks_per_sm} * num_sms;
  const int64_t n_min = ceil_div(tiles, limits.max_partition / kTileRows), n_max = std::max(n_min, std::min<int64_t>(tiles, 1024));
  int64_t best = n_min, best_cost = INT64_MAX;
  for (int64_t n = n_min; n <= n_max; ++n) {
    const int64_t cost = ceil_div(units * n, slots) * (ceil_div(tiles, n) + kBlockStartTiles);
    if (cost < best_cost) best = n, best_cost = cost;
  }
  p.n_part = static_cast<int>(best);
  p.P = static_cast<int>(ceil_div(tiles, best) * kTileRows);
  std::copy(key, key + 6, last_key);
  last = p;
  return p;
}

// Positions per partition for a token at position pos: whole tiles, the same for all n_part partitions.
__host__ __device__ __forceinline__ int partition_rows(int pos, int n_part) {
  return static_cast<int>(ceil_div(ceil_div(pos + 1, kTileRows), n_part) * kTileRows);
}

// 8 bytes global -> shared, zeros when !in: the rows of 1-byte codes whose head dim is not a multiple of 16 (the
// CUDA-core kernel; 16-byte copies are mma-tile.cuh's cp_async16).
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool in) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 8 : 0) : "memory");
}
// 4 bytes (a row scale) the same way.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool in) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 4 : 0) : "memory");
}

// ---- the steps both kernels share (device side)

// What one block of the partial kernels serves: token t's partition c of positions, kv head g, and the chunk of
// its GQA group's heads [h_first, h_first + nh).
struct DecodeUnit {
  int c, t, g, seq, p0, np, h_first, nh;
};

// The block's unit for grid (n_part, T * n_kv * n_hc); false when the block has nothing to do (its partition is
// past the token's position, or the token is out of range: reported once).
__device__ __forceinline__ bool decode_unit(const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                                            int nH, int n_part, int n_hc, int head_chunk, DeviceStatus* status,
                                            DecodeUnit& u) {
  const int n_kv = static_cast<int>(kv.n_kv);
  u.c = blockIdx.x;
  u.t = blockIdx.y / (n_kv * n_hc);
  u.g = blockIdx.y / n_hc % n_kv;
  const int hc = blockIdx.y % n_hc;
  u.seq = token_seq[u.t];
  const int pos = positions[u.t];
  if (!kv_token_in_range(kv, u.t, u.seq, pos, kKvRead, status, u.c == 0 && u.g == 0 && hc == 0 && threadIdx.x == 0))
    return false;
  const int rows_each = partition_rows(pos, n_part);
  u.p0 = u.c * rows_each;
  if (u.p0 > pos) return false;
  u.np = min(rows_each, pos + 1 - u.p0);
  const int group = nH / n_kv;
  u.h_first = u.g * group + hc * head_chunk;
  u.nh = min(head_chunk, group - hc * head_chunk);
  return true;
}

// rows [ceil(np / stride)]: the cache row of every stride-th position of the partition (stride 1: each position's);
// for codes also k_row_scales, v_row_scales (stride 1). Ends with a barrier.
// A thread's kRowBatch positions are looked up together: the table entries, then the scales, each load of a batch
// issued before the first is used. One position at a time cost a table round trip and a dependent scale round trip
// each, 8 a thread at 1024 positions: 12% of the fp8 kernel's stall samples at 32K (ncu, bench/RESULTS.md session 25).
constexpr int kRowBatch = 8;
template <bool QUANTIZED>
__device__ __forceinline__ void load_partition_rows(const KvBlockTable& kv, const DecodeUnit& u, DeviceStatus* status,
                                                    const float* k_scales, const float* v_scales, int32_t* rows,
                                                    float* k_row_scales, float* v_row_scales, int stride = 1) {
  const int B = static_cast<int>(kv.block_size);  // 32-bit division: attention checks capacity < 2^31 on the host
  const int n = (u.np + stride - 1) / stride;
  for (int first = threadIdx.x; first < n; first += kRowBatch * blockDim.x) {
    int32_t block[kRowBatch];
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      const int i = first + j * blockDim.x;
      block[j] = i < n ? kv.block_id(u.seq, (u.p0 + i * stride) / B) : 0;
    }
    int64_t row[kRowBatch];
    float ks[kRowBatch], vs[kRowBatch];
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      const int pos = u.p0 + (first + j * blockDim.x) * stride;
      const bool bad = block[j] < 0 || block[j] >= kv.n_blocks;  // reported below; the read goes to row 0
      row[j] = bad ? 0 : kv.row(block[j], u.g, pos - pos / B * B);
      if constexpr (QUANTIZED) ks[j] = k_scales[row[j]], vs[j] = v_scales[row[j]];
    }
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      const int i = first + j * blockDim.x;
      if (i >= n) break;
      if (block[j] < 0 || block[j] >= kv.n_blocks) report(status, StatusOp::AttentionBlock, u.t, block[j], kv.n_blocks);
      rows[i] = static_cast<int32_t>(row[j]);
      if constexpr (QUANTIZED) k_row_scales[i] = ks[j], v_row_scales[i] = vs[j];
    }
  }
  __syncthreads();
}

// One tile's online softmax, one warp per head (lane l takes rows l, l + 32, ...): sc [heads][TILE_ROWS] holds the
// scores of rows < nr and becomes the weights exp(score - max) (times the value row's scale when v_row_scales is
// given); alpha[h] the rescale of what was summed before (0 on the first tile, m_run = -inf). Between barriers.
template <int TILE_ROWS, int HEADS_PER_WARP>
__device__ __forceinline__ void softmax_tile(float* sc, float* alpha, const float* v_row_scales, int nh, int nr,
                                             float (&m_run)[HEADS_PER_WARP], float (&l_run)[HEADS_PER_WARP]) {
  constexpr int kRowsPerLane = TILE_ROWS / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < HEADS_PER_WARP; ++i) {
    const int h = warp + i * kWarps;
    if (h >= nh) continue;
    float s[kRowsPerLane], tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) {
      s[j] = lane + 32 * j < nr ? sc[h * TILE_ROWS + lane + 32 * j] : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m_run[i], warp_max(tile_max));
    float sum = 0;
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) {
      const int r = lane + 32 * j;
      const float e = r < nr ? expf(s[j] - m_new) : 0.0f;
      sum += e;
      sc[h * TILE_ROWS + r] = v_row_scales != nullptr && r < nr ? e * v_row_scales[r] : e;
    }
    const float a = expf(m_run[i] - m_new);
    l_run[i] = l_run[i] * a + warp_sum(sum);
    m_run[i] = m_new;
    if (lane == 0) alpha[h] = a;
  }
}

// The tiles of a partition through shared memory, STAGES - 1 of them in flight: issue(it) starts tile it's copies,
// use(it) runs on tile it once every thread's copies of it have landed. A tile's stage is refilled only after the
// barrier that follows every thread's use of it. Ends with no copy in flight.
template <int STAGES, typename Issue, typename Use>
__device__ __forceinline__ void stream_tiles(int n_tiles, Issue issue, Use use) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) issue(s);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait(STAGES - 2 > 0);
    __syncthreads();  // tile `it` landed for every thread; the stage tile it - 1 used is free again
    if (it + STAGES - 1 < n_tiles) issue(it + STAGES - 1);
    cp_async_commit();
    use(it);
  }
  cp_async_wait_all();
}

// The partition's max and sum of each head, from the warp that ran its softmax.
template <int HEADS_PER_WARP>
__device__ __forceinline__ void store_partition_ml(const DecodeUnit& u, int nH, int n_part,
                                                   const float (&m_run)[HEADS_PER_WARP],
                                                   const float (&l_run)[HEADS_PER_WARP], float* part_ml) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < HEADS_PER_WARP; ++i) {
    const int h = warp + i * kWarps;
    if (h < u.nh && lane == 0) {
      const size_t r = (size_t(u.t) * nH + u.h_first + h) * n_part + u.c;
      part_ml[2 * r] = m_run[i];
      part_ml[2 * r + 1] = l_run[i];
    }
  }
}

// What launch_decode_partial_mma did: nothing (the CUDA-core kernel then runs), the partials (the merge kernel is
// to run), or the whole attention (its blocks merged the partitions themselves).
enum class MmaLaunch { kNotTaken, kPartials, kMerged };

// The tensor-core kernel (attention-decode-mma.cu) for bf16, fp8 and int8 caches of head dims 64, 128 and 256.
// Partials as attention_decode_partial writes them; where the grid has at most kMaxMergeTickets rows, the last
// block of each (token, kv head, head chunk) to finish also merges its partitions into out.
constexpr int kMaxMergeTickets = 1 << 16;
MmaLaunch launch_decode_partial_mma(const Ctx& ctx, const DecodePlan& plan, const Tensor& q, const Tensor& k_cache,
                                    const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                                    const Tensor& positions, int64_t n_heads, float scale, float* part_out,
                                    float* part_ml, float* out);
// The merge of one (token, head)'s partitions by their log-sum-exp, a block of kThreads: partition k < n_valid sits in
// slot slot_of(k) of part_out [slots][hd] and part_ml [slots][2] (its max m and sum l); o [hd] = the partitions'
// outputs weighted by exp(m_k - M) l_k, over L = their sum. Each weight first, then the warps take every kWarps-th
// partition (four dims a lane, loads independent of each other so that many are in flight) and add their sums in
// warp order: a fixed order, the same bits every replay. weights: shared memory for the slots (rounded up to float4s)
// and then [kWarps][hd] sums; block_red: kWarps floats of shared memory.
template <class SlotOf>
__device__ __forceinline__ void merge_partitions(const float* part_ml, const float* part_out, int slots, int n_valid, int hd,
                                                 SlotOf slot_of, float* weights, float* block_red, float* o) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  auto block_reduce = [&](float v, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) block_red[warp] = v;
    __syncthreads();
    float r = block_red[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, block_red[w]) : r + block_red[w];
    __syncthreads();
    return r;
  };
  float m = -INFINITY;
  for (int k = threadIdx.x; k < n_valid; k += kThreads) m = fmaxf(m, part_ml[2 * slot_of(k)]);
  const float M = block_reduce(m, true);
  float l = 0;
  for (int k = threadIdx.x; k < n_valid; k += kThreads) {
    const float e = expf(part_ml[2 * slot_of(k)] - M);
    weights[k] = e;
    l += e * part_ml[2 * slot_of(k) + 1];
  }
  const float inv_L = 1.0f / block_reduce(l, false);  // its barrier also publishes the weights

  float* sums = weights + (slots + 3) / 4 * 4;  // [kWarps][hd], float4-aligned
  const float4* part4 = reinterpret_cast<const float4*>(part_out);
  const int hd4 = hd / 4;
  for (int d4 = lane; d4 < hd4; d4 += 32) {
    float4 acc = make_float4(0, 0, 0, 0);
#pragma unroll 8
    for (int k = warp; k < n_valid; k += kWarps) {
      const float w = weights[k];
      const float4 x = part4[size_t(slot_of(k)) * hd4 + d4];
      acc.x += w * x.x, acc.y += w * x.y, acc.z += w * x.z, acc.w += w * x.w;
    }
    reinterpret_cast<float4*>(sums + warp * hd)[d4] = acc;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += kThreads) {
    float sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sums[w * hd + d];
    o[d] = sum * inv_L;
  }
}

}  // namespace decode
}  // namespace weft::cuda
