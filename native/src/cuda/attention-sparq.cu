// SparQ decode attention: the kernel attention-sparq.cuh describes, and the append of its state.
//
// Where the time of a step goes at 32K (Llama-2-7B, r/k 1/8: r = 16 columns, k = 2048 rows) is bytes only if the
// fixed costs are small: the r columns of kT are 33.5 MB and the k rows of K and V 33.5 MB, ~16 us at copy
// bandwidth. So: one cluster of 4-8 blocks per (token, kv head) holds the whole selection in its shared
// memory (each block a slice of the positions: its logits, keys, a share of the V mean), exchanges what the
// selection needs between the blocks (softmax maxima and sums, radix bins, counts) through distributed shared
// memory, writes only the selected positions, then reads its share of them back and merges the shares over the
// cluster. One launch, no logits or keys in global memory (unless the slice outgrows shared memory), no single
// block walking all positions, and the barriers few: each is a wait for the slowest block of the cluster.
// With few (token, kv head) units (Llama-3-8B at batch 1: 8 clusters on 64 SMs) instructions bound it as much as
// bytes: ~9,700 instructions a warp (bench/RESULTS.md, session 39's profile; ~7,900 since), so the hot loops carry no
// per-element guards. Larger clusters (up to 16) and step 2 on tensor cores were slower there (the same session).
// Flat attention is the select's hard case: keys within a few percent of each other fill many bins of its second
// pass, so the blocks' lists grow long (a random-weights model's decode: ~64 us a layer against ~44, session 40).
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "cuda/attention-sparq.cuh"
#include "cuda/cluster-split.cuh"
#include "cuda/kv-block-table.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda {
namespace {

namespace cg = cooperative_groups;

// Blocks per (token, kv head): 8, or fewer (down to 4) when the units would not all be resident at 8 (launch_sparq
// chooses; each block then takes a larger slice). On H200 a cluster of 8 fits 30 at once where Llama-2-7B's 32 kv
// heads need 32, and the second wave cost more than larger slices: at 32K, r/k 1/8, 103.8 us at 8, 88.0-91.5 at 4,
// 73.0 at the largest size that fits in one wave; 16 was 3x slower.
constexpr int kMaxCluster = 8, kMinCluster = 4;
constexpr int kSelectThreads = 512;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kTopBins = 2048;       // the select's first radix digit: 11 bits
static_assert(kTopBins * 4 == kSelectThreads * 16, "v_part (a float4 a thread) lives in the histogram");
static_assert(kTopBins % kSelectThreads == 0 && 512 % kSelectThreads == 0, "the select's bins in whole warps");
constexpr int kPosPerThread = 4;      // consecutive positions a thread scores: one 8- or 16-byte load per column
constexpr int kMaxHd = 256;
// step 1: two lanes at least rank each component, and threads past kMaxHd sum the heads' |q| (up to 8 heads)
static_assert(kSelectThreads >= 2 * kMaxHd && kSelectThreads >= kMaxHd + 8, "step 1's threads");
constexpr int kVSumAhead = 4;  // V sums a thread loads at the start (the rest where they are summed)
constexpr size_t kSliceInSharedMax = 160 * 1024;  // bytes of a select block's logits and keys kept in shared memory

// The scratch, carved in this order (4-byte elements).
struct SparqScratch {
  int32_t* rows;     // [T, nKv, C]: the selected positions, ascending
  float* slices;     // [T, nKv, cluster, sliceFloats] when the slices are not in shared memory, else unused
};

struct SparqShape {
  int64_t T, nH, nKv, C, hd, group;
  int64_t cluster;  // blocks per (token, kv head)
  int64_t slice;    // positions a block holds at most: ceil(C / cluster), rounded up to kPosPerThread
  bool slices_in_shared;
  __host__ __device__ int64_t slice_floats() const { return (group + 1) * slice; }  // logits [group][slice], then keys [slice]
  int64_t floats() const { return T * nKv * C + (slices_in_shared ? 0 : T * nKv * cluster * slice_floats()); }
  // the slices when they are in shared memory, then step 4's [warps][group][hd] f32 in the same bytes
  size_t dyn_smem_bytes() const {
    return std::max<size_t>(slices_in_shared ? size_t(slice_floats()) * 4 : 0, size_t(kSelectWarps * group * hd) * 4);
  }
  SparqShape with_cluster(int64_t c) const {
    SparqShape sh = *this;
    sh.cluster = c;
    sh.slice = ((C + c - 1) / c + kPosPerThread - 1) / kPosPerThread * kPosPerThread;
    sh.slices_in_shared = size_t(sh.slice_floats()) * 4 <= kSliceInSharedMax;
    return sh;
  }
  SparqScratch carve(float* s) const {
    SparqScratch x;
    x.rows = reinterpret_cast<int32_t*>(s), s += T * nKv * C;
    x.slices = s;
    return x;
  }
};

// The shape at kMaxCluster blocks per (token, kv head); launch_sparq may take fewer (with_cluster).
SparqShape shape_of(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, int64_t n_heads) {
  SparqShape sh;
  sh.T = q.dim(0), sh.nH = n_heads, sh.nKv = k_cache.dim(1), sh.C = kv_block_table.dim(1) * k_cache.dim(2);
  sh.hd = k_cache.dim(3), sh.group = n_heads / std::max<int64_t>(sh.nKv, 1);
  return sh.with_cluster(kMaxCluster);
}

struct TokenArgs {
  int r, k;
};
__device__ __forceinline__ TokenArgs token_args(const int32_t* sparq_r, const int32_t* sparq_k, int t, int hd) {
  return {min(max(sparq_r[t], 1), hd), max(sparq_k[t], 1)};
}

// E consecutive cache elements as loaded (raw), widened to f32 where used: bf16 two to a word.
template <typename KV, int E>
struct Chunk {
  static constexpr int kBytes = E * int(sizeof(KV));
  static constexpr int kWords = (kBytes + 3) / 4;
  uint32_t w[kWords];
  __device__ __forceinline__ float at(int e) const {
    if constexpr (sizeof(KV) == 4) return __uint_as_float(w[e]);
    else return __uint_as_float((e & 1) ? (w[e >> 1] & 0xffff0000u) : (w[e >> 1] << 16));
  }
};

__device__ __forceinline__ uint32_t raw_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint32_t raw_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Elements p[0..E) in one (or two 16-byte) loads; p aligned to E elements.
template <typename KV, int E>
__device__ __forceinline__ void load_contiguous(const KV* p, Chunk<KV, E>& c) {
  constexpr int kBytes = Chunk<KV, E>::kBytes;
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      c.w[4 * i] = v.x, c.w[4 * i + 1] = v.y, c.w[4 * i + 2] = v.z, c.w[4 * i + 3] = v.w;
    }
  } else if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    c.w[0] = v.x, c.w[1] = v.y;
  } else if constexpr (kBytes == 4) {
    c.w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    c.w[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

// A lane's E elements of a row of hd: lane * E + e when the row is exactly 32 E long (contiguous), else
// lane + 32 e (strided, those past hd zero).
template <typename KV, int E>
__device__ __forceinline__ void load_lane(const KV* row, int lane, int hd, bool contiguous, Chunk<KV, E>& c) {
  if (contiguous) {
    load_contiguous<KV, E>(row + lane * E, c);
    return;
  }
#pragma unroll
  for (int i = 0; i < Chunk<KV, E>::kWords; ++i) c.w[i] = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d >= hd) continue;
    if constexpr (sizeof(KV) == 4) c.w[e] = raw_bits(row[d]);
    else c.w[e >> 1] |= raw_bits(row[d]) << (16 * (e & 1));
  }
}
__device__ __forceinline__ int lane_index(int lane, int e, int E, bool contiguous) {
  return contiguous ? lane * E + e : lane + 32 * e;
}

// Exclusive prefix count of `flag` over the block in thread order; *total gets the block's count. Every thread
// of the block calls it.
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

// Per head h < G, the block's max (kMax) or sum of v[h] into out[h]; red is [warps][G] of shared memory.
template <int G, bool kMax>
__device__ void block_reduce_heads(float (&v)[G], float (*red)[G], float* out, int group) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const float s = kMax ? warp_max(v[h]) : warp_sum(v[h]);
    if (lane == 0) red[warp][h] = s;
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float s = kMax ? -INFINITY : 0.0f;
    for (int w = 0; w < warps; ++w) s = kMax ? fmaxf(s, red[w][threadIdx.x]) : s + red[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

// Step 4 of one warp on tensor cores, for bf16 caches, GQA groups of 2-4 (G = 4) and head dims 32 E (64, 128):
// the rows [i_begin, i_end) (positions when exact, else rows[i]) of kv head g, attended by the group's heads (q_s,
// [group][hd] f32), 16 rows a step: scores S^T = K Q^T and values O^T = V^T P^T with the rows on the mma's M side
// and the heads as the columns of one n8 tile (column c: head c / 2's hi or lo part, split in bf16 so that the
// products keep ~16 bits of q and of the weights). Each lane loads 16 bytes of rows g and g + 8 per 32 dims (dims
// 8t .. 8t + 7: the query's fragments take the same order); V's fragments are those loads transposed in registers
// (movmatrix). Leaves the warp's max, sum and unnormalised output per head in wm, wl, wout [group][hd], as the
// CUDA-core loop does. Why: that loop's per-row warp reductions made step 4 ~28% of the kernel for Llama-3-8B at 32K
// (20.7 of 72.6 us, session 18's phase clocks).
template <int E>
__device__ void gather_rows_mma(const float* q_s, const __nv_bfloat16* __restrict__ k_cache,
                                const __nv_bfloat16* __restrict__ v_cache, const KvBlockTable& kv, int t, int seq,
                                int g_kv, const int32_t* rows, bool exact, int i_begin, int i_end, float scale,
                                DeviceStatus* status, int group, float* wm, float* wl, float* wout) {
  constexpr int hd = 32 * E;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3, hq = g >> 1;
  uint32_t qf[E][2][2];  // 32-dim block, k16 step (dims 8t .. + 3, 8t + 4 .. + 7), register
#pragma unroll
  for (int db = 0; db < E; ++db)
#pragma unroll
    for (int st = 0; st < 2; ++st)
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        const int d = 32 * db + 8 * tq + 4 * st + 2 * w;
        const float x0 = hq < group ? q_s[hq * hd + d] : 0.0f, x1 = hq < group ? q_s[hq * hd + d + 1] : 0.0f;
        uint32_t hi, lo;
        split_pair<true>(x0, x1, hi, lo);
        qf[db][st][w] = (g & 1) ? lo : hi;
      }
  // m16 tile 2 db + jp of dims: rows g, g + 8 are dims 32 db + 8 (g / 2) + 4 jp + (g & 1), and that + 2
  float o[2 * E][4];
#pragma unroll
  for (int mt = 0; mt < 2 * E; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0;
  float m_run = -INFINITY, l_run = 0;  // head tq's (the same in the lanes of that tq), this lane's part of the sum
  int64_t off = 0;                      // lane i: the cache offset of row i of the current 32
  for (int i0 = i_begin; i0 < i_end; i0 += 16) {
    if (((i0 - i_begin) & 31) == 0) {
      const int i = i0 + lane;
      if (i < i_end) off = kv_read_row(kv, t, seq, g_kv, exact ? i : rows[i], status) * hd;
    }
    const int half = (i0 - i_begin) & 16;
    const int64_t off_g = __shfl_sync(0xffffffffu, off, half + g), off_g8 = __shfl_sync(0xffffffffu, off, half + g + 8);
    const bool in_g = i0 + g < i_end, in_g8 = i0 + g + 8 < i_end;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float sc[4] = {0, 0, 0, 0};
    // V's loads beside K's: they do not wait for the softmax (a warp often has one step of 16 rows in all)
    uint4 v0s[E], v8s[E];
#pragma unroll
    for (int db = 0; db < E; ++db) {
      v0s[db] = in_g ? *reinterpret_cast<const uint4*>(v_cache + off_g + 32 * db + 8 * tq) : zero;
      v8s[db] = in_g8 ? *reinterpret_cast<const uint4*>(v_cache + off_g8 + 32 * db + 8 * tq) : zero;
    }
#pragma unroll
    for (int db = 0; db < E; ++db) {
      const uint4 k0 = in_g ? *reinterpret_cast<const uint4*>(k_cache + off_g + 32 * db + 8 * tq) : zero;
      const uint4 k8 = in_g8 ? *reinterpret_cast<const uint4*>(k_cache + off_g8 + 32 * db + 8 * tq) : zero;
      const uint32_t a0[4] = {k0.x, k8.x, k0.y, k8.y}, a1[4] = {k0.z, k8.z, k0.w, k8.w};
      mma_bf16(sc, a0, qf[db][0][0], qf[db][0][1]);
      mma_bf16(sc, a1, qf[db][1][0], qf[db][1][1]);
    }
    // the online softmax of head tq over rows g and g + 8 of the 16 (the other rows in the lanes of that tq)
    const float x0 = in_g ? (sc[0] + sc[1]) * scale : -INFINITY, x8 = in_g8 ? (sc[2] + sc[3]) * scale : -INFINITY;
    float tile_max = fmaxf(x0, x8);
    tile_max = max_over_rows(tile_max);
    const float m_new = fmaxf(m_run, tile_max), alpha = expf(m_run - m_new);  // row i0 exists: m_new is finite
    const float p0 = expf(x0 - m_new), p8 = expf(x8 - m_new);
    l_run = l_run * alpha + p0 + p8;
    m_run = m_new;
#pragma unroll
    for (int mt = 0; mt < 2 * E; ++mt) o[mt][0] *= alpha, o[mt][1] *= alpha, o[mt][2] *= alpha, o[mt][3] *= alpha;
    uint32_t b0, b1;  // P^T
    weights_as_b<true>(p0, p8, b0, b1);
#pragma unroll
    for (int db = 0; db < E; ++db) {
      const uint4 v0 = v0s[db], v8 = v8s[db];
      // word j of row g holds dims 8t + 2j, + 1: transposed, lane (g, t) holds rows 2t, 2t + 1 at dim 8 (g / 2) + 2j
      // + (g & 1), the A operand's (dim, rows) pairs
      const uint32_t t0[4] = {movmatrix_trans(v0.x), movmatrix_trans(v0.y), movmatrix_trans(v0.z),
                              movmatrix_trans(v0.w)};
      const uint32_t t8[4] = {movmatrix_trans(v8.x), movmatrix_trans(v8.y), movmatrix_trans(v8.z),
                              movmatrix_trans(v8.w)};
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        const uint32_t a[4] = {t0[2 * jp], t0[2 * jp + 1], t8[2 * jp], t8[2 * jp + 1]};
        mma_bf16(o[2 * db + jp], a, b0, b1);
      }
    }
  }
  l_run = sum_over_rows(l_run);
  if (tq < group) {  // columns 2t, 2t + 1: head tq's hi and lo parts
#pragma unroll
    for (int mt = 0; mt < 2 * E; ++mt) {
      const int d = 32 * (mt >> 1) + 8 * hq + 4 * (mt & 1) + (g & 1);
      wout[tq * hd + d] = o[mt][0] + o[mt][1];
      wout[tq * hd + d + 2] = o[mt][2] + o[mt][3];
    }
    if (g == 0) wm[tq] = m_run, wl[tq] = l_run;
  }
}

template <typename KV>
struct SparqArgs {
  const float* q;
  const KV* k_t;
  const KV* k_cache;
  const KV* v_cache;
  const float* v_sum;
  KvBlockTable kv;
  const int32_t* token_seq;
  const int32_t* positions;
  const int32_t* sparq_r;
  const int32_t* sparq_k;
  int nH, hd;
  float scale;
  SparqShape sh;
  SparqScratch x;
  DeviceStatus* status;
  float* out;
};

// grid (T * nKv * cluster), clusters of `cluster` (sh.cluster) along x, kSelectThreads threads, dynamic shared memory
// max(the slice's logits and keys when they fit, [warps][group][hd] f32); G >= the group (heads kept in registers),
// a row of hd is E elements a lane (E = hd / 32 contiguous, else strided). Cluster (t, g) computes out for token t's
// heads of kv head g. Steps 1-3 and the V mean: block `rank` owns positions [rank S, rank S + S) (S = ceil(len /
// cluster) rounded up to kPosPerThread), and of the V mean the full blocks that start in its slice and the partial
// block's rows in it; it writes the rows it selects to the scratch, in position order. Step 4: block `rank` takes
// the rank-th share of the n selected rows (n = k, or every position when len <= k) and leaves its softmax max, sum
// and exp-weighted V sum per head in shared memory. Step 5: each block merges a share of the (head, component)
// outputs over the cluster's blocks and blends them with the V mean.
template <typename KV, int G, int E>
__global__ void __launch_bounds__(kSelectThreads, G == 1 ? 2 : 1)
    sparq_attention_kernel(const __grid_constant__ SparqArgs<KV> a) {
  pdl_trigger();
  pdl_wait();
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nb = static_cast<int>(a.sh.cluster);
  const int n_kv = static_cast<int>(a.kv.n_kv), unit = blockIdx.x / nb, t = unit / n_kv, g = unit % n_kv;
  const int group = a.nH / n_kv, hd = a.hd, B = static_cast<int>(a.kv.block_size);
  const int64_t C = a.sh.C, slice = a.sh.slice;
  const size_t tg = size_t(t) * n_kv + g, th0 = size_t(t) * a.nH + size_t(g) * group;
  const SparqScratch x = a.x;
  const int seq = a.token_seq[t], pos = a.positions[t];
  // every block of the cluster takes the same branches, so none returns while another reads its shared memory
  if (!kv_token_in_range(a.kv, t, seq, pos, kKvRead, a.status, rank == 0 && g == 0 && tid == 0)) {
    if (rank == 0)  // a bad token (reported): zeros
      for (int i = tid; i < group * hd; i += blockDim.x) a.out[th0 * hd + i] = 0;
    return;
  }
  const TokenArgs ta = token_args(a.sparq_r, a.sparq_k, t, hd);
  const int len = pos + 1, r = ta.r;
  const bool exact = len <= ta.k;  // every position selected: alpha = 1, no mean term
  extern __shared__ float dyn_smem[];
  __shared__ float q_s[G * kMaxHd], lse[G];
  __shared__ float red[kSelectWarps][G];
  __shared__ float block_alpha[G], block_v[kMaxHd];  // read by the cluster
  // The slice, and the loads that need only it, issued before step 1 so that their latency passes under it: the
  // block of kT of this thread's first positions, and its first kVSumAhead V sums (their blocks, then the sums).
  const int per = (len + nb - 1) / nb, S = (per + kPosPerThread - 1) / kPosPerThread * kPosPerThread;
  const int s0 = min(len, rank * S), s1 = min(len, s0 + S), ns = s1 - s0;
  const bool vec = B % kPosPerThread == 0;  // a thread's positions share a block of kT and 8 or 16 bytes of it
  const int vw = hd % 4 == 0 ? 4 : 1, v_lanes = hd / vw, n_sub = blockDim.x / v_lanes, dv = tid % v_lanes,
            sub = tid / v_lanes, full = len / B;
  const int vj0 = (s0 + B - 1) / B, vj1 = min(full, (s1 + B - 1) / B);
  int64_t first_block = -1;
  float4 v_ahead[kVSumAhead];
  if (!exact) {
    if (vec && s0 + tid * kPosPerThread < s1)
      first_block = kv_block_checked(a.kv, t, seq, (s0 + tid * kPosPerThread) / B, StatusOp::AttentionBlock, a.status,
                                     true);
    int64_t vb[kVSumAhead];
#pragma unroll
    for (int u = 0; u < kVSumAhead; ++u) {
      const int j = vj0 + sub + u * n_sub;
      vb[u] = sub < n_sub && j < vj1 ? kv_block_checked(a.kv, t, seq, j, StatusOp::AttentionBlock, a.status, true) : -1;
    }
#pragma unroll
    for (int u = 0; u < kVSumAhead; ++u) {
      v_ahead[u] = make_float4(0, 0, 0, 0);
      if (vb[u] < 0) continue;
      const float* src = a.v_sum + (vb[u] * n_kv + g) * hd + dv * vw;
      if (vw == 4) v_ahead[u] = *reinterpret_cast<const float4*>(src);
      else v_ahead[u].x = src[0];
    }
  }
  for (int i = tid; i < group * hd; i += blockDim.x) q_s[i] = a.q[th0 * hd + i];
  __syncthreads();
  if (!exact) {

  // ---- step 1 (every block alike): columns, their q values [G][rp] and c_h
  // columns whose loads a thread issues before it uses them (MHA: 2 blocks a SM, so half as many in registers)
  constexpr int kColsInFlight = (G == 1 ? 16 : 32) / sizeof(KV);
  static_assert(kMaxHd % kColsInFlight == 0, "the padded columns fit");
  // The columns padded to whole rounds of loads (rp), and the heads to G: a padded column repeats column 0 with q 0,
  // a padded head has q 0, so that step 2's loop needs no guards (adding +0 leaves each real sum's bits).
  const int rp = (r + kColsInFlight - 1) / kColsInFlight * kColsInFlight;
  __shared__ float colq[G * kMaxHd], abs_q[kMaxHd], coef[G];
  __shared__ int cols[kMaxHd], col_off[kMaxHd], warp_counts[32];
  // |q| summed over the heads per component; and, by threads past hd, the heads' sums of |q| over all components
  // (in component order, as the CPU reference sums them)
  __shared__ float abs_all[G];
  for (int d = tid; d < hd; d += blockDim.x) {
    float s = 0;
    for (int h = 0; h < group; ++h) s += fabsf(q_s[h * hd + d]);
    abs_q[d] = s;
  }
  if (tid >= kMaxHd && tid < kMaxHd + group) {
    float all = 0;
    for (int d = 0; d < hd; ++d) all += fabsf(q_s[(tid - kMaxHd) * hd + d]);
    abs_all[tid - kMaxHd] = all;
  }
  __syncthreads();
  // A component's rank (how many rank before it: larger, or equal at a lower index), counted by `lanes` lanes
  // (a power of two, lanes * hd <= kSelectThreads) each over every lanes-th component and added over them; the
  // first lane of the group takes the flag, so the taken components stay in ascending order.
  const int lanes = hd <= 64 ? 8 : hd <= 128 ? 4 : 2, d_rank = tid / lanes;
  bool col_taken = false;
  {
    const int part = tid % lanes;
    int above = 0;
    if (d_rank < hd) {
      const float mine = abs_q[d_rank];
      for (int j = part; j < hd; j += lanes) above += abs_q[j] > mine || (abs_q[j] == mine && j < d_rank);
    }
    for (int o = 1; o < lanes; o <<= 1) above += __shfl_xor_sync(0xffffffffu, above, o);
    col_taken = d_rank < hd && part == 0 && above < r;
  }
  int n_cols;
  const int col_slot = block_exclusive_count(col_taken, warp_counts, &n_cols);
  if (col_taken) cols[col_slot] = d_rank;
  __syncthreads();
  for (int i = tid; i < G * rp; i += blockDim.x) {
    const int h = i / rp, c = i % rp;
    colq[i] = h < group && c < r ? q_s[h * hd + cols[c]] : 0.0f;
    if (h == 0) col_off[c] = (c < r ? cols[c] : cols[0]) * B;
  }
  __syncthreads();
  if (tid < group) {
    float kept = 0;
    for (int i = 0; i < r; ++i) kept += fabsf(colq[tid * rp + i]);
    coef[tid] = kept > 0 ? a.scale * sqrtf(abs_all[tid] / kept) : a.scale;
  }
  __syncthreads();

  // ---- step 2 over the slice: logits into logit_b [group][slice], the block's max and sum per head. Products and
  // sums rounded one by one in the CPU reference's order (no FMA contraction), so that the logits, and with them the
  // selections, are the CPU's bit for bit (the keys then differ only by the exponentials' and normalizers' last bits).
  float* buf = a.sh.slices_in_shared ? dyn_smem : x.slices + (tg * nb + rank) * a.sh.slice_floats();
  float* logit_b = buf;
  float* key_b = buf + group * slice;
  // the V sums loaded ahead, added in the order the loop below continues (block j0 + sub + u n_sub)
  float vs[4] = {0, 0, 0, 0};
#pragma unroll
  for (int u = 0; u < kVSumAhead; ++u)
    vs[0] += v_ahead[u].x, vs[1] += v_ahead[u].y, vs[2] += v_ahead[u].z, vs[3] += v_ahead[u].w;
  float m_t[G];
#pragma unroll
  for (int h = 0; h < G; ++h) m_t[h] = -INFINITY;
  for (int base = s0 + tid * kPosPerThread; base < s1; base += blockDim.x * kPosPerThread) {
    float acc[G][kPosPerThread];
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int e = 0; e < kPosPerThread; ++e) acc[h][e] = 0;
    if (vec) {
      const int j = base / B;
      const int64_t block = base == s0 + tid * kPosPerThread
                                ? first_block
                                : kv_block_checked(a.kv, t, seq, j, StatusOp::AttentionBlock, a.status, true);
      const KV* col0 = a.k_t + ((max(block, int64_t(0)) * n_kv + g) * hd) * B + (base - j * B);  // [nBlocks, nKv, hd, B]
      for (int i0 = 0; i0 < rp; i0 += kColsInFlight) {
        Chunk<KV, kPosPerThread> kc[kColsInFlight];
#pragma unroll
        for (int u = 0; u < kColsInFlight; ++u) load_contiguous<KV, kPosPerThread>(col0 + col_off[i0 + u], kc[u]);
#pragma unroll
        for (int u = 0; u < kColsInFlight; ++u)
#pragma unroll
          for (int h = 0; h < G; ++h) {
            const float qv = colq[h * rp + i0 + u];
#pragma unroll
            for (int e = 0; e < kPosPerThread; ++e) acc[h][e] = __fadd_rn(acc[h][e], __fmul_rn(qv, kc[u].at(e)));
          }
      }
    } else {  // blocks of a size not a multiple of kPosPerThread: each position on its own
      const KV* col0[kPosPerThread];
#pragma unroll
      for (int e = 0; e < kPosPerThread; ++e) {
        const int p = min(base + e, s1 - 1), j = p / B;
        const int64_t block = kv_block_checked(a.kv, t, seq, j, StatusOp::AttentionBlock, a.status, true);
        col0[e] = a.k_t + ((max(block, int64_t(0)) * n_kv + g) * hd) * B + (p - j * B);
      }
      for (int i = 0; i < r; ++i) {
        const int d = cols[i];
#pragma unroll
        for (int e = 0; e < kPosPerThread; ++e) {
          const float kd = to_f32(col0[e][size_t(d) * B]);
#pragma unroll
          for (int h = 0; h < G; ++h)
            if (h < group) acc[h][e] = __fadd_rn(acc[h][e], __fmul_rn(colq[h * rp + i], kd));
        }
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h >= group) break;
#pragma unroll
      for (int e = 0; e < kPosPerThread; ++e) {
        if (base + e >= s1) break;
        const float logit = acc[h][e] * coef[h];
        logit_b[h * slice + (base + e - s0)] = logit;
        m_t[h] = fmaxf(m_t[h], logit);
      }
    }
  }
  __shared__ float block_m[G], block_l[G];  // read by the cluster
  block_reduce_heads<G, true>(m_t, red, block_m, group);
  float l_t[G];
#pragma unroll
  for (int h = 0; h < G; ++h) l_t[h] = 0;
  for (int base = s0 + tid * kPosPerThread; base < s1; base += blockDim.x * kPosPerThread)
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h >= group) break;
      for (int e = 0; e < kPosPerThread && base + e < s1; ++e)
        l_t[h] += expf(logit_b[h * slice + (base + e - s0)] - block_m[h]);
    }
  block_reduce_heads<G, false>(l_t, red, block_l, group);

  // ---- the slice's share of the V sum: full blocks that start in it (from vSum), the partial block's rows in it.
  // Lanes take 4 components (one 16-byte load of vSum) when hd allows, so that one round of loads covers the slice.
  // v_part and step 3's histogram share their 8 KB (the static arrays stay under 48 KB at G = 8)
  __shared__ __align__(16) unsigned hist[kTopBins];
  __shared__ unsigned bin_list[2][kTopBins], list_len[2];  // read by the cluster; pass p fills [p & 1]
  float4* v_part = reinterpret_cast<float4*>(hist);  // [kSelectThreads]
  {
    if (sub < n_sub) {
#pragma unroll 4
      for (int j = vj0 + sub + kVSumAhead * n_sub; j < vj1; j += n_sub) {
        const int64_t block = kv_block_checked(a.kv, t, seq, j, StatusOp::AttentionBlock, a.status, true);
        if (block < 0) continue;
        const float* src = a.v_sum + (block * n_kv + g) * hd + dv * vw;
        if (vw == 4) {
          const float4 v = *reinterpret_cast<const float4*>(src);
          vs[0] += v.x, vs[1] += v.y, vs[2] += v.z, vs[3] += v.w;
        } else {
          vs[0] += src[0];
        }
      }
      for (int p = max(s0, full * B) + sub; p < s1; p += n_sub) {
        const KV* src = a.v_cache + kv_read_row(a.kv, t, seq, g, p, a.status) * hd + dv * vw;
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (c < vw) vs[c] += to_f32(src[c]);
      }
    }
    v_part[tid] = make_float4(vs[0], vs[1], vs[2], vs[3]);
    __syncthreads();
    if (tid < hd) {
      const int c = tid % vw, lane_of = tid / vw;
      float s = 0;
      for (int i = 0; i < n_sub; ++i) {
        const float4 v = v_part[i * v_lanes + lane_of];
        s += c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
      }
      block_v[tid] = s;
    }
  }
  cluster.sync();  // (1) block_m, block_l, block_v of every block

  // ---- the log-sum-exp per head over all positions (every block alike: the same reads in the same order)
  if (tid < group) {
    // every block's values loaded before any is used: the remote loads overlap instead of waiting one by one
    float mb[kMaxCluster], lb[kMaxCluster];
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b)
      if (b < nb) mb[b] = cluster.map_shared_rank(block_m, b)[tid], lb[b] = cluster.map_shared_rank(block_l, b)[tid];
    float M = -INFINITY;
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b)
      if (b < nb) M = fmaxf(M, mb[b]);
    double z = 0;
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b)
      if (b < nb && mb[b] != -INFINITY) z += double(expf(mb[b] - M)) * double(lb[b]);
    lse[tid] = M + static_cast<float>(log(z));
  }
  for (int i = tid; i < kTopBins; i += blockDim.x) hist[i] = 0;  // pass 0's histogram, counted with the keys
  if (tid == 0) list_len[0] = 0;
  __syncthreads();

  // ---- step 3: keys, then the k-th largest by a radix select over the cluster (keys >= 0: bits order as values)
  for (int i = tid; i < ns; i += blockDim.x) {
    float key = 0;
    for (int h = 0; h < group; ++h) key += expf(logit_b[h * slice + i] - lse[h]);
    key_b[i] = key;
    atomicAdd(&hist[(__float_as_uint(key) & 0x7fffffffu) >> 20], 1u);
  }
  __syncthreads();
  // Three digits from the top, 11, 11 and 9 bits (bit 31 is 0 for keys >= 0). A pass: each block counts the keys of
  // its slice that match the prefix so far into its histogram and lists the bins it has (bin, count); after the
  // cluster barrier it adds every block's list into its own histogram, which then holds the cluster's counts, and one
  // scan over the block finds the bin where the count from the top reaches `remaining` (every block the same). Why
  // lists: a block's keys fall in few bins, and reads of another block's shared memory are costly one by one
  // (reading whole 2048-bin histograms from 8 blocks made the select ~1.5x slower on H200).
  // The select stops after a pass whose bin holds exactly the keys still to take (often the second): every key of
  // that bin is taken, so comparing the keys' bits under the mask so far selects the same rows.
  constexpr int kBinsPer = kTopBins / kSelectThreads, kCountBits = 21;
  __shared__ unsigned warp_total[kSelectWarps], rank_len[kMaxCluster], sel_prefix, sel_remaining;
  __shared__ bool sel_whole;
  unsigned prefix = 0, mask = 0, remaining = static_cast<unsigned>(ta.k);
  for (int pass = 0; pass < 3; ++pass) {
    const int bits = pass < 2 ? 11 : 9, shift = pass == 0 ? 20 : pass == 1 ? 9 : 0, n_bins = 1 << bits;
    // free: every block read them before it arrived at the previous pass's barrier
    unsigned *list = bin_list[pass & 1], *len_p = &list_len[pass & 1];
    if (pass > 0) {  // pass 0's was counted with the keys
      for (int i = tid; i < n_bins; i += blockDim.x) hist[i] = 0;
      if (tid == 0) *len_p = 0;
      __syncthreads();
      for (int i = tid; i < ns; i += blockDim.x) {
        const unsigned u = __float_as_uint(key_b[i]) & 0x7fffffffu;
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & unsigned(n_bins - 1)], 1u);
      }
    }
    __syncthreads();
    for (int b = tid; b < n_bins; b += blockDim.x) {  // whole warps: n_bins is a multiple of the block
      const unsigned n = hist[b];  // <= the slice's positions < 2^kCountBits (the launch checks)
      const unsigned has = __ballot_sync(0xffffffffu, n != 0);
      unsigned at = 0;
      if (lane == 0 && has != 0) at = atomicAdd(len_p, unsigned(__popc(has)));  // one append a warp
      at = __shfl_sync(0xffffffffu, at, 0);
      if (n != 0) list[at + __popc(has & ((1u << lane) - 1))] = unsigned(b) << kCountBits | n;
    }
    __syncthreads();
    for (int i = tid; i < n_bins; i += blockDim.x) hist[i] = 0;
    cluster.sync();  // (2-4) every block's list of this pass
    if (tid < nb) rank_len[tid] = *cluster.map_shared_rank(len_p, tid);
    __syncthreads();
    // the blocks' lists end to end, a thread an entry: one round of remote loads for all of them, not one a block
    unsigned n_entries = 0;
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b) n_entries += b < nb ? rank_len[b] : 0u;
    for (unsigned x = tid; x < n_entries; x += blockDim.x) {
      int b = 0;
      unsigned e = x;
      while (e >= rank_len[b]) e -= rank_len[b], ++b;
      const unsigned w = cluster.map_shared_rank(list, b)[e];
      atomicAdd(&hist[w >> kCountBits], w & ((1u << kCountBits) - 1));
    }
    __syncthreads();
    // thread tid: bins n_bins - 1 - (tid * per + j), j < per (per = kBinsPer, or 1 for the 512 bins of the last pass)
    const int per = n_bins / kSelectThreads;
    unsigned c[kBinsPer], own = 0;
#pragma unroll
    for (int j = 0; j < kBinsPer; ++j) c[j] = j < per ? hist[n_bins - 1 - (tid * per + j)] : 0u, own += c[j];
    unsigned upto = own;  // inclusive prefix over the block in thread order (from the top bins down)
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned v = __shfl_up_sync(0xffffffffu, upto, o);
      if (lane >= o) upto += v;
    }
    if (lane == 31) warp_total[tid >> 5] = upto;
    __syncthreads();
    unsigned above = upto - own;
    for (int w = 0; w < (tid >> 5); ++w) above += warp_total[w];
    if (above < remaining && remaining <= above + own) {
      unsigned seen = above;  // this thread's bins from the top: the one where the count reaches `remaining`
#pragma unroll
      for (int j = 0; j < kBinsPer; ++j) {
        if (j < per && seen < remaining && remaining <= seen + c[j]) {
          sel_prefix = prefix | (unsigned(n_bins - 1 - (tid * per + j)) << shift);
          sel_remaining = remaining - seen;
          sel_whole = c[j] == remaining - seen;
        }
        seen += c[j];
      }
    }
    __syncthreads();
    prefix = sel_prefix, remaining = sel_remaining, mask |= unsigned(n_bins - 1) << shift;
    if (sel_whole) break;  // the same in every block: the cluster's counts
  }
  // prefix is the k-th largest key under the mask: take every larger key and the first `remaining` equal ones, in
  // position order.
  // Thread tid owns the run [tid * run, tid * run + run) of the slice: one scan of its (larger, equal) counts over
  // the block and the blocks of lower rank place every row it takes.
  __shared__ int block_counts[2];  // keys above and equal to it in the slice; read by the cluster
  __shared__ int warp_gt[kSelectWarps], warp_eq[kSelectWarps];
  const int run = (ns + int(blockDim.x) - 1) / int(blockDim.x), i_begin = min(ns, tid * run),
            i_end = min(ns, i_begin + run);
  int gt = 0, eq = 0;
  for (int i = i_begin; i < i_end; ++i) {
    const unsigned u = __float_as_uint(key_b[i]) & mask;
    gt += u > prefix, eq += u == prefix;
  }
  int gt_upto = gt, eq_upto = eq;  // inclusive prefixes over the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int a_gt = __shfl_up_sync(0xffffffffu, gt_upto, o), a_eq = __shfl_up_sync(0xffffffffu, eq_upto, o);
    if (lane >= o) gt_upto += a_gt, eq_upto += a_eq;
  }
  if (lane == 31) warp_gt[tid >> 5] = gt_upto, warp_eq[tid >> 5] = eq_upto;
  __syncthreads();
  if (tid == 0) {
    int n_gt = 0, n_eq = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) n_gt += warp_gt[w], n_eq += warp_eq[w];
    block_counts[0] = n_gt, block_counts[1] = n_eq;
  }
  cluster.sync();  // (5) block_counts
  int gt_before = gt_upto - gt, eq_before = eq_upto - eq;
  for (int w = 0; w < (tid >> 5); ++w) gt_before += warp_gt[w], eq_before += warp_eq[w];
#pragma unroll
  for (int b = 0; b < kMaxCluster; ++b)
    if (b < rank) {
      const int* c = cluster.map_shared_rank(block_counts, b);
      gt_before += c[0], eq_before += c[1];
    }
  int32_t* rows = x.rows + tg * C;
  float al[G];
#pragma unroll
  for (int h = 0; h < G; ++h) al[h] = 0;
  // alpha's exponentials after each 32 keys, over the ones taken (a few a thread: a lane's loop, not every lane's
  // every key as when they were taken one by one), in position order as before
  for (int c0 = i_begin; c0 < i_end; c0 += 32) {
    unsigned taken = 0;
    for (int i = c0; i < min(i_end, c0 + 32); ++i) {
      const unsigned u = __float_as_uint(key_b[i]) & mask;
      if (u > prefix || (u == prefix && unsigned(eq_before) < remaining)) {
        rows[gt_before + min(eq_before, int(remaining))] = s0 + i;
        taken |= 1u << (i - c0);
      }
      gt_before += u > prefix, eq_before += u == prefix;
    }
    for (; taken != 0; taken &= taken - 1) {
      const int i = c0 + __ffs(taken) - 1;
#pragma unroll
      for (int h = 0; h < G; ++h)
        if (h < group) al[h] += expf(logit_b[h * slice + i] - lse[h]);
    }
  }
  block_reduce_heads<G, false>(al, red, block_alpha, group);
  }  // !exact

  // ---- step 4: this block's share of the n selected rows, a warp's run of them at a time
  cluster.sync();  // (6) every block's rows (global memory: the barrier releases and acquires), block_alpha, block_v
  constexpr int R = (G == 4 ? 16 : 8) / sizeof(KV);  // rows a warp loads (K and V) before it uses them; divides 32
  const bool contiguous = hd == 32 * E;
  const int n = exact ? len : ta.k, share = (n + nb - 1) / nb;
  const int b0 = min(n, rank * share), b1 = min(n, b0 + share);
  constexpr bool kMmaGather = std::is_same_v<KV, __nv_bfloat16> && G == 4 && E <= 4;  // gather_rows_mma's cases
  constexpr int kRun = kMmaGather ? 16 : R;  // a warp's rows come in runs of kRun (its steps)
  const int wr = ((b1 - b0 + kSelectWarps - 1) / kSelectWarps + kRun - 1) / kRun * kRun;
  const int i_begin = b0 + warp * wr, i_end = min(b1, i_begin + wr);
  const int32_t* rows = x.rows + tg * C;
  float* warp_out = dyn_smem;  // [warps][group][hd]: the slices are dead
  __shared__ float warp_m[kSelectWarps][G], warp_l[kSelectWarps][G], part_m[G], part_l[G];  // part_*: read by the cluster
  bool gathered = false;
  if constexpr (kMmaGather)
    if (contiguous) {
      gather_rows_mma<E>(q_s, a.k_cache, a.v_cache, a.kv, t, seq, g, rows, exact, i_begin, i_end, a.scale, a.status,
                         group, warp_m[warp], warp_l[warp], warp_out + warp * group * hd);
      gathered = true;
    }
  if (!gathered) {
    float m[G], l[G], o[G][E];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      m[h] = -INFINITY, l[h] = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) o[h][e] = 0;
    }
    int64_t off = 0;  // lane i: the cache offset of row i of the current 32
    for (int i0 = i_begin; i0 < i_end; i0 += R) {  // warp-uniform
      if (((i0 - i_begin) & 31) == 0) {
        const int i = i0 + lane;
        if (i < i_end) off = kv_read_row(a.kv, t, seq, g, exact ? i : rows[i], a.status) * hd;
      }
      Chunk<KV, E> kc[R], vc[R];
#pragma unroll
      for (int u = 0; u < R; ++u) {
        const int64_t row = __shfl_sync(0xffffffffu, off, (i0 - i_begin + u) & 31);
        if (i0 + u < i_end) {
          load_lane<KV, E>(a.k_cache + row, lane, hd, contiguous, kc[u]);
          load_lane<KV, E>(a.v_cache + row, lane, hd, contiguous, vc[u]);
        } else {  // past the warp's rows: zeros, so that their weight 0 times V stays 0
#pragma unroll
          for (int w = 0; w < Chunk<KV, E>::kWords; ++w) kc[u].w[w] = 0, vc[u].w[w] = 0;
        }
      }
      float sc[G][R];  // scores, then weights
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float dot = 0;
#pragma unroll
          for (int e = 0; e < E; ++e) {
            const int d = lane_index(lane, e, E, contiguous);
            if (h < group && d < hd) dot += q_s[h * hd + d] * kc[u].at(e);
          }
          dot = warp_sum(dot);
          sc[h][u] = i0 + u < i_end ? dot * a.scale : -INFINITY;
        }
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float m_new = m[h];
#pragma unroll
        for (int u = 0; u < R; ++u) m_new = fmaxf(m_new, sc[h][u]);  // finite: row i0 exists
        const float corr = m[h] == -INFINITY ? 0.0f : expf(m[h] - m_new);
        l[h] *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) o[h][e] *= corr;
#pragma unroll
        for (int u = 0; u < R; ++u) {
          sc[h][u] = i0 + u < i_end ? expf(sc[h][u] - m_new) : 0.0f;
          l[h] += sc[h][u];
        }
        m[h] = m_new;
      }
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float v = vc[u].at(e);
#pragma unroll
          for (int h = 0; h < G; ++h) o[h][e] += sc[h][u] * v;
        }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h >= group) break;
      if (lane == 0) warp_m[warp][h] = m[h], warp_l[warp][h] = l[h];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int d = lane_index(lane, e, E, contiguous);
        if (d < hd) warp_out[(warp * group + h) * hd + d] = o[h][e];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < group * hd; i += blockDim.x) {  // the block's warps, in warp order, into warp 0's place
    const int h = i / hd;
    float M = -INFINITY;
    for (int w = 0; w < kSelectWarps; ++w) M = fmaxf(M, warp_m[w][h]);
    float L = 0, O = 0;
    for (int w = 0; w < kSelectWarps; ++w) {
      if (warp_m[w][h] == -INFINITY) continue;  // a warp past the rows
      const float f = expf(warp_m[w][h] - M);
      L += f * warp_l[w][h];
      O += f * warp_out[w * group * hd + i];
    }
    warp_out[i] = O;
    if (i % hd == 0) part_m[h] = M, part_l[h] = L;
  }

  // ---- step 5: block `rank` merges outputs [rank P, rank P + P) of the group's group * hd over the cluster
  cluster.sync();  // (7) every block's part_m, part_l and warp_out[0]
  const int P = (group * hd + nb - 1) / nb, item = rank * P + tid;
  if (tid < P && item < group * hd) {
    const int h = item / hd, d = item % hd;
    float mb[kMaxCluster], lb[kMaxCluster], ob[kMaxCluster];  // loaded before use, as for the log-sum-exp
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b)
      if (b < nb) {
        mb[b] = cluster.map_shared_rank(part_m, b)[h];
        lb[b] = cluster.map_shared_rank(part_l, b)[h];
        ob[b] = cluster.map_shared_rank(warp_out, b)[item];
      }
    float M = -INFINITY;
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b)
      if (b < nb) M = fmaxf(M, mb[b]);
    float L = 0, O = 0, alpha = 0, v_sum = 0;
#pragma unroll
    for (int b = 0; b < kMaxCluster; ++b) {
      if (b >= nb) break;
      if (mb[b] != -INFINITY) {  // a block past the rows has none
        const float f = expf(mb[b] - M);
        L += f * lb[b];
        O += f * ob[b];
      }
      if (!exact) alpha += cluster.map_shared_rank(block_alpha, b)[h], v_sum += cluster.map_shared_rank(block_v, b)[d];
    }
    const float y = O / L;
    a.out[th0 * hd + item] = exact ? y : alpha * y + (1 - alpha) * (v_sum / float(len));
  }
  cluster.sync();  // (8) every block done reading the others' shared memory before they exit
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

// The heads an instantiation keeps in registers: 1 (MHA), 4 (groups of 2-4), 8 (5-8).
int heads_kept(int64_t group) { return group == 1 ? 1 : group <= 4 ? 4 : 8; }

// Clusters of sh.cluster blocks of `kernel` resident at once with sh's shared memory (the driver's answer, kept:
// it is asked when a step is built or captured, not on a graph's replay).
int resident_clusters(const void* kernel, cudaError_t (*query)(int*, const cudaLaunchConfig_t&), const SparqShape& sh) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int64_t, size_t>, int> known;
  const auto key = std::make_tuple(kernel, sh.cluster, sh.dyn_smem_bytes());
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  int n = 0;
  ClusterLaunchConfig launch(dim3(unsigned(sh.T * sh.nKv * sh.cluster)), kSelectThreads, sh.dyn_smem_bytes(),
                             int(sh.cluster));
  if (query(&n, launch.cfg) != cudaSuccess) n = 0;  // unknown: treated as one cluster at a time
  return known[key] = std::max(n, 1);
}

template <typename KV, int G, int E>
void launch_sparq(const Ctx& ctx, SparqArgs<KV> args) {
  auto kernel = sparq_attention_kernel<KV, G, E>;
  auto query = [](int* n, const cudaLaunchConfig_t& cfg) {
    // the opt-in is needed once static and dynamic shared memory together pass 48 KB (static arrays: 22-45 KB)
    cudaFuncSetAttribute(sparq_attention_kernel<KV, G, E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(cfg.dynamicSmemBytes));
    return cudaOccupancyMaxActiveClusters(n, sparq_attention_kernel<KV, G, E>, &cfg);
  };
  // the cluster size with the fewest waves of clusters, the largest on a tie
  const int64_t units = args.sh.T * args.sh.nKv;
  auto waves = [&](const SparqShape& sh) {
    const int64_t n = resident_clusters(reinterpret_cast<const void*>(kernel), query, sh);
    return (units + n - 1) / n;
  };
  int64_t best = waves(args.sh);
  for (int64_t c = kMaxCluster - 1; c >= kMinCluster && best > 1; --c) {
    const SparqShape at = args.sh.with_cluster(c);
    const int64_t w = waves(at);
    if (w < best) best = w, args.sh = at;
  }
  const SparqShape& sh = args.sh;
  const size_t smem = sh.dyn_smem_bytes();
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  // An ordinary (not programmatic) dependent: its clusters are placed once the kernels before it have left the SMs.
  // As a programmatic one they were placed while wqkv's GEMV still held SMs, and a cluster needs its 4-8 SMs free in
  // one GPC: now and then a second wave (~195 us a call instead of ~103), on layer 0 always. At 32K, blocks of 16,
  // Llama-2-7B, the kernel took 107-109 us a layer in the step that way and 93 us this way, the step 6.92 ms against
  // 7.78 (bench/RESULTS.md, session 18).
  const cudaError_t e = launch_in_clusters(kernel, args, dim3(unsigned(units * sh.cluster)), kSelectThreads, smem,
                                           int(sh.cluster), false, ctx.stream);
  if (e != cudaSuccess) fail_cuda(ctx.st, "sparqAttention", e, " (the cluster launch)");
}

template <typename KV, int G>
void launch_sparq_hd(const Ctx& ctx, const SparqArgs<KV>& args) {
  if (args.sh.hd <= 64)
    launch_sparq<KV, G, 2>(ctx, args);
  else if (args.sh.hd <= 128)
    launch_sparq<KV, G, 4>(ctx, args);
  else
    launch_sparq<KV, G, 8>(ctx, args);
}

}  // namespace

int64_t sparq_scratch_floats(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, int64_t n_heads) {
  const SparqShape sh = shape_of(q, k_cache, kv_block_table, n_heads);
  int64_t most = 0;  // whichever cluster size launch_sparq takes
  for (int64_t c = kMinCluster; c <= kMaxCluster; ++c) most = std::max(most, sh.with_cluster(c).floats());
  return most;
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
                            const Tensor& sparq_k, int64_t n_heads, float scale, const Tensor& out, float* scratch) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const SparqShape sh = shape_of(q, k_cache, kv_block_table, n_heads);
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"kvBlockTable", kv_block_table}};
  WEFT_CHECK(sh.T <= kSparqMaxTokens, "sparqAttention", "serves at most ", kSparqMaxTokens, " tokens a step (got ",
             sh.T, "; longer steps take the dense attention)");
  WEFT_CHECK(sh.group <= kSparqMaxGroup && sh.hd <= kMaxHd, "sparqAttention", "supports GQA groups of at most ",
             kSparqMaxGroup, " query heads and head dims of at most ", kMaxHd, " (got ", sh.group, " and ", sh.hd,
             ")");
  WEFT_CHECK(sh.with_cluster(kMinCluster).slice < (int64_t(1) << 21), "sparqAttention", "a sequence capacity of ", sh.C,
             " positions is too large (the select's counts hold under 2^21 positions a block)");
  if (sh.T == 0) return;
  const SparqScratch x = sh.carve(scratch);
  const int32_t *seq = token_seq.data<int32_t>(), *pos = positions.data<int32_t>();
  const int32_t *r = sparq_r.data<int32_t>(), *k = sparq_k.data<int32_t>();
  const int G = heads_kept(sh.group);
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    const SparqArgs<KV> sel{q.data<float>(), k_t.data<KV>(), k_cache.data<KV>(), v_cache.data<KV>(),
                             v_sum.data<float>(), kv, seq, pos, r, k, int(n_heads), int(sh.hd), scale, sh, x,
                             ctx.status, out.data<float>()};
    if (G == 1) launch_sparq_hd<KV, 1>(ctx, sel);
    else if (G == 4) launch_sparq_hd<KV, 4>(ctx, sel);
    else launch_sparq_hd<KV, 8>(ctx, sel);
  });
  check_launch(ctx, "sparqAttention", args);
}

}  // namespace weft::cuda
