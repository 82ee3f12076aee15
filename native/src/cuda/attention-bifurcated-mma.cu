// Bifurcated decode attention on tensor cores, for bf16 caches at head dims 64 and 128: the split-K plan, KV tiles
// and merge of the plain decode kernel (attention-decode-mma.cu, attention-decode.cuh), over two kinds of task in
// one partial kernel and one merge kernel:
//  - prefix: (group, kv head, chunk of 16 MT query rows, partition of the group's shared positions). The rows are
//    the group's members x the kv head's GQA heads (MHA n = 16: one m16 tile; GQA 4 heads x 16 members: four);
//    the partition's K/V tiles are read once for all of them;
//  - private: (token, kv head, chunk of its GQA heads, partition of its own positions groupShared..positions[t];
//    every position for a token of no group): the plain kernel's block, with the token's heads as the rows.
// Partitions: a range's positions are cut into the plan's count of partitions of whole 32-row tiles
// (decode::partition_rows), the count chosen by decode_plan's cost (rounds of resident blocks, kBlocksPerSm an SM
// or what the variant's registers and shared memory leave, times the tiles each reads, plus its start) at the
// full capacity; the private count at most kMaxPrivateParts, since a
// short continuation leaves the rest of them empty. The table is looked up a tile ahead by the threads that copy
// the rows (no per-partition row list), so a partition may be of any length.
// Per tile of 32 positions (three stages in flight, cp.async): S = Q K^T on mma.sync m16n8k16 (warp w: M tile
// w % MT, MT of the tile's four n8 key tiles), the online softmax in f32 (TPR threads a row), O += P V (warp w: a
// quarter of the head dim, every M tile).
// Precision: q, the cache's values and the softmax weights are f16 operands (a bf16 value converted in registers:
// exact in f16's normal range), f32 accumulators, as the prefill kernel: ops-check's bound is the prefill's (1e-3).
#include "cuda/attention-bifurcated-mma.cuh"
#include "cuda/attention-decode.cuh"

namespace weft::cuda::bifurcated {
namespace {

using decode::kThreads;
using decode::kWarps;
constexpr int kTileRows = decode::kTileRows;  // 32 positions a tile
constexpr int kStages = decode::kStages;      // three tiles in flight
constexpr int kScoreLd = kTileRows + 4;       // score row stride (floats): the softmax's float4 reads without bank conflicts
constexpr int kMaxPrivateParts = 8;

using bf16 = __nv_bfloat16;

// Blocks an SM holds by registers (the launch bounds): at head dim 128, MT = 4's o and q fragments take 166
// registers a thread, so 3; else decode's 4.
__host__ __device__ constexpr int register_blocks(int hd, int mt) { return hd == 128 && mt == 4 ? 3 : decode::kBlocksPerSm; }

// Shared memory: the stages [kStages][K, V][kTileRows][kLd] bf16, the scores [16 MT][kScoreLd] (the group's
// members [T] before the first tile), the rows' rescale [16 MT] and (token * nH + head) [16 MT]. At head dim 128:
// 57 KB for MT = 2, so that 4 blocks fit an SM; 61 KB for MT = 4 (3 blocks, as its registers).
template <int HD>
struct MmaTiles {
  static constexpr int kLd = HD + 8;  // 16-byte pad: ldmatrix without bank conflicts
  static constexpr size_t kStageBytes = size_t(kStages) * 2 * kTileRows * kLd * sizeof(bf16);
  __host__ __device__ static size_t score_floats(int mt, int64_t T) {
    return size_t(16 * mt) * kScoreLd > size_t(T) ? size_t(16 * mt) * kScoreLd : size_t(T);
  }
  static size_t bytes(int mt, int64_t T) {
    return kStageBytes + (score_floats(mt, T) + size_t(16 * mt) * 2) * sizeof(float);
  }
  // Blocks an SM holds: its 228 KB of shared memory, 1 KB of each block's reserved; at most register_blocks.
  static int blocks_per_sm(int mt, int64_t T) {
    return static_cast<int>(std::min<size_t>(register_blocks(HD, mt), size_t{228 * 1024} / (bytes(mt, T) + 1024)));
  }
};

// The launch's tasks: blocks [0, blocks_a) are prefix blocks, index c + n_part_a (rc + n_rc_a (g + n_kv group));
// the rest private ones, c + n_part_b (hc + n_rc_b (g + n_kv t)).
struct MmaTasks {
  int n_part_a, n_rc_a, n_part_b, n_rc_b, blocks_a;
};

// grid (blocks_a + T n_kv n_rc_b n_part_b); part_out [T nH][n_part_a + n_part_b][HD], part_ml [..][2]: prefix
// partition c in slot c, private partition c in slot n_part_a + c.
template <int HD, int MT>
__global__ void __launch_bounds__(kThreads, register_blocks(HD, MT))
    bifurcated_partial_mma(const float* __restrict__ q, const bf16* __restrict__ k_cache,
                           const bf16* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                           const int32_t* __restrict__ positions, const int32_t* __restrict__ token_group,
                           const int32_t* __restrict__ group_shared, int T, int G, int nH, MmaTasks tasks,
                           float scale, float* __restrict__ part_out, float* __restrict__ part_ml,
                           DeviceStatus* status) {
  constexpr int ROWS = 16 * MT, LD = MmaTiles<HD>::kLd, KSTEPS = HD / 16, NT = HD / 32;
  constexpr int KW = kWarps / MT;                        // warps sharing an M tile's scores
  constexpr int TPR = kThreads / ROWS, KPT = kTileRows / TPR;  // softmax: threads a row, positions a thread
  constexpr int CPR = HD / 8, RPP = kThreads / CPR, PASSES = kTileRows / RPP;  // copies: 16-byte chunks
  static_assert(MT * KW == kWarps && KW * MT * 8 == kTileRows, "each warp scores MT n8 tiles of one M tile");
  static_assert(KPT % 4 == 0 && PASSES * RPP == kTileRows, "tile shape");
  pdl_trigger();
  pdl_wait();
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* stages = reinterpret_cast<bf16*>(smem);
  float* sc = reinterpret_cast<float*>(smem + MmaTiles<HD>::kStageBytes);  // [ROWS][kScoreLd]
  int* members = reinterpret_cast<int*>(sc);                                // [T], before the first tile
  float* alpha = sc + MmaTiles<HD>::score_floats(MT, T);                   // [ROWS]
  int* row_th = reinterpret_cast<int*>(alpha + ROWS);                       // [ROWS]
  __shared__ int n_members;

  const int n_kv = static_cast<int>(kv.n_kv), group = nH / n_kv, tid = threadIdx.x;
  const int n_slots = tasks.n_part_a + tasks.n_part_b;
  int g, t_rep, seq, p0, np, n_rows, slot;
  if (static_cast<int>(blockIdx.x) < tasks.blocks_a) {
    const int c = blockIdx.x % tasks.n_part_a, rest = blockIdx.x / tasks.n_part_a;
    const int rc = rest % tasks.n_rc_a, task = rest / tasks.n_rc_a / n_kv;
    g = rest / tasks.n_rc_a % n_kv;
    const int shared = shared_of(group_shared, task, kv.capacity());
    if (shared <= 0) return;
    const int rows_each = decode::partition_rows(shared - 1, tasks.n_part_a);
    p0 = c * rows_each;
    if (p0 >= shared) return;
    np = min(rows_each, shared - p0);
    find_members(token_group, T, G, task, members, &n_members);
    __syncthreads();
    n_rows = min(ROWS, n_members * group - rc * ROWS);
    if (n_rows <= 0) return;
    t_rep = members[0];
    seq = token_seq[t_rep];
    if (!kv_token_in_range(kv, t_rep, seq, shared - 1, kKvRead, status, c == 0 && g == 0 && rc == 0 && tid == 0))
      return;
    for (int r = tid; r < ROWS; r += kThreads) {
      const int x = rc * ROWS + r;
      row_th[r] = r < n_rows ? members[x / group] * nH + g * group + x % group : -1;
    }
    slot = c;
  } else {
    const int b = blockIdx.x - tasks.blocks_a;
    const int c = b % tasks.n_part_b, rest = b / tasks.n_part_b;
    const int hc = rest % tasks.n_rc_b, t = rest / tasks.n_rc_b / n_kv;
    g = rest / tasks.n_rc_b % n_kv;
    t_rep = t;
    seq = token_seq[t];
    const int pos = positions[t];
    if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, c == 0 && g == 0 && hc == 0 && tid == 0)) return;
    const int lo = shared_of(group_shared, group_of(token_group, t, G), kv.capacity()), len = pos + 1 - lo;
    if (len <= 0) return;
    const int rows_each = decode::partition_rows(len - 1, tasks.n_part_b);
    if (c * rows_each >= len) return;
    p0 = lo + c * rows_each;
    np = min(rows_each, len - c * rows_each);
    n_rows = min(ROWS, group - hc * ROWS);
    for (int r = tid; r < ROWS; r += kThreads) row_th[r] = r < n_rows ? t * nH + g * group + hc * ROWS + r : -1;
    slot = tasks.n_part_a + c;
  }
  __syncthreads();

  // The thread's copies: chunk ce of rows cr + RPP k of every tile. blk: their table entries in the next tile to
  // be issued, loaded when the tile before is issued (the load's latency hidden behind a tile's use).
  const int B = static_cast<int>(kv.block_size), cr = tid / CPR, ce = (tid % CPR) * 8;
  const int32_t* table_row = kv.table + int64_t(seq) * kv.max_blocks;
  int32_t blk[PASSES];
  // f(k, i, j, o) for the thread's rows of tile it: i the row in the partition, position p0 + i = j B + o (one
  // division a tile).
  auto rows_of = [&](int it, auto&& f) {
    int i = it * kTileRows + cr, j = (p0 + i) / B, o = p0 + i - j * B;
#pragma unroll
    for (int k = 0; k < PASSES; ++k, i += RPP) {
      f(k, i, j, o);
      for (o += RPP; o >= B; o -= B) ++j;
    }
  };
  auto lookup = [&](int it) {
    rows_of(it, [&](int k, int i, int j, int) { blk[k] = i < np ? table_row[j] : 0; });
  };
  auto stage_k = [&](int it) { return stages + size_t(it % kStages) * 2 * kTileRows * LD; };
  auto issue = [&](int it) {
    bf16* kt = stage_k(it);
    bf16* vt = kt + kTileRows * LD;
    rows_of(it, [&](int k, int i, int, int o) {
      const int r = cr + RPP * k;
      const bool in = i < np;
      int64_t off = 0;
      if (in) {
        if (blk[k] >= 0 && blk[k] < kv.n_blocks)
          off = kv.row(blk[k], g, o) * HD;
        else  // a bad table entry: reported, the row read from row 0
          report(status, StatusOp::AttentionBlock, t_rep, blk[k], kv.n_blocks);
      }
      cp_async16(smem_u32(kt + r * LD + ce), k_cache + off + ce, in ? 16 : 0);
      cp_async16(smem_u32(vt + r * LD + ce), v_cache + off + ce, in ? 16 : 0);
    });
    lookup(it + 1);
  };
  lookup(0);

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int mq = warp % MT, kw = warp / MT;  // the warp's M tile of scores and its place among the KW sharing it
  const bool scores_active = mq * 16 < n_rows;
  // Its rows' query A fragments (f16; rows past n_rows zero): a0 (row gq, cols 2tq, 2tq + 1), a1 (row gq + 8),
  // a2 (row gq, cols + 8), a3 (row gq + 8, cols + 8) of each k16 step.
  uint32_t qa[KSTEPS][4];
  {
    const int ra = mq * 16 + gq, rb = ra + 8;
    const float* qra = ra < n_rows ? q + size_t(row_th[ra]) * HD : nullptr;
    const float* qrb = rb < n_rows ? q + size_t(row_th[rb]) * HD : nullptr;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = ks * 16 + half * 8 + 2 * tq;
        const float2 xa = qra ? *reinterpret_cast<const float2*>(qra + col) : make_float2(0, 0);
        const float2 xb = qrb ? *reinterpret_cast<const float2*>(qrb + col) : make_float2(0, 0);
        qa[ks][2 * half] = pack_f16(xa.x, xa.y);
        qa[ks][2 * half + 1] = pack_f16(xb.x, xb.y);
      }
  }
  float o[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < NT; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0;
  // The softmax state of row sr (the TPR threads of a row hold the same).
  const int sr = tid / TPR, sp = tid % TPR;
  float m_run = -INFINITY, l_run = 0;
  const int col0 = warp * (HD / 4);  // the warp's quarter of the head dim in O += P V

  decode::stream_tiles<kStages>(static_cast<int>(decode::ceil_div(np, kTileRows)), issue, [&](int it) {
    const int nr = min(kTileRows, np - it * kTileRows);
    const bf16* kt = stage_k(it);
    const bf16* vt = kt + kTileRows * LD;

    // Scores of the warp's M tile x n8 key tiles kw + KW j; even and odd k16 steps in two accumulators (two
    // independent mma chains).
    if (scores_active) {
#pragma unroll
      for (int jj = 0; jj < MT; ++jj) {
        const int j = kw + KW * jj;
        float s0[4] = {0, 0, 0, 0}, s1[4] = {0, 0, 0, 0};
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks += 2) {
          uint32_t b[4];
          ldmatrix_x4(b, smem_u32(kt + (8 * j + (lane & 7)) * LD + ks * 16 + (lane >> 3) * 8));
          mma_f16(s0, qa[ks], bf16x2_to_f16x2(b[0]), bf16x2_to_f16x2(b[1]));
          mma_f16(s1, qa[ks + 1], bf16x2_to_f16x2(b[2]), bf16x2_to_f16x2(b[3]));
        }
        float* srow = sc + (mq * 16 + gq) * kScoreLd + 8 * j + 2 * tq;
        *reinterpret_cast<float2*>(srow) = make_float2((s0[0] + s1[0]) * scale, (s0[1] + s1[1]) * scale);
        *reinterpret_cast<float2*>(srow + 8 * kScoreLd) =
            make_float2((s0[2] + s1[2]) * scale, (s0[3] + s1[3]) * scale);
      }
    }
    __syncthreads();

    // Online softmax: row sr's positions sp KPT .. + KPT; positions past the tile's nr are masked, rows past
    // n_rows (never written) read as zeros.
    {
      float* srow = sc + sr * kScoreLd + sp * KPT;
      const bool row_in = sr < n_rows;
      float s[KPT], mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < KPT; i += 4) {
        const float4 x = row_in ? *reinterpret_cast<const float4*>(srow + i) : make_float4(0, 0, 0, 0);
        s[i] = x.x, s[i + 1] = x.y, s[i + 2] = x.z, s[i + 3] = x.w;
      }
#pragma unroll
      for (int i = 0; i < KPT; ++i) {
        if (sp * KPT + i >= nr) s[i] = -INFINITY;
        mx = fmaxf(mx, s[i]);
      }
#pragma unroll
      for (int o = 1; o < TPR; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_run, mx);  // finite: a tile holds a position
      float sum = 0;
#pragma unroll
      for (int i = 0; i < KPT; ++i) {
        s[i] = expf(s[i] - m_new);
        sum += s[i];
      }
#pragma unroll
      for (int i = 0; i < KPT; i += 4) *reinterpret_cast<float4*>(srow + i) = make_float4(s[i], s[i + 1], s[i + 2], s[i + 3]);
#pragma unroll
      for (int o = 1; o < TPR; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float a = expf(m_run - m_new);
      l_run = l_run * a + sum;
      m_run = m_new;
      if (sp == 0) alpha[sr] = a;
    }
    __syncthreads();

    // O += P V: the warp's quarter of the head dim for every M tile that holds rows; V's fragments loaded once.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt * 16 >= n_rows) break;
      const float a0 = alpha[mt * 16 + gq], a1 = alpha[mt * 16 + gq + 8];
#pragma unroll
      for (int n = 0; n < NT; ++n) o[mt][n][0] *= a0, o[mt][n][1] *= a0, o[mt][n][2] *= a1, o[mt][n][3] *= a1;
    }
#pragma unroll
    for (int ks = 0; ks < kTileRows / 16; ++ks) {
      uint32_t b[NT / 2][4];
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        ldmatrix_x4_trans(b[n2], smem_u32(vt + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + col0 + n2 * 16 +
                                          (lane >> 4) * 8));
#pragma unroll
        for (int i = 0; i < 4; ++i) b[n2][i] = bf16x2_to_f16x2(b[n2][i]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (mt * 16 >= n_rows) break;
        const float* w = sc + (mt * 16 + gq) * kScoreLd + ks * 16 + 2 * tq;
        const float2 x0 = *reinterpret_cast<const float2*>(w), x1 = *reinterpret_cast<const float2*>(w + 8 * kScoreLd);
        const float2 x2 = *reinterpret_cast<const float2*>(w + 8);
        const float2 x3 = *reinterpret_cast<const float2*>(w + 8 * kScoreLd + 8);
        const uint32_t a[4] = {pack_f16(x0.x, x0.y), pack_f16(x1.x, x1.y), pack_f16(x2.x, x2.y), pack_f16(x3.x, x3.y)};
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
          mma_f16(o[mt][2 * n2], a, b[n2][0], b[n2][1]);
          mma_f16(o[mt][2 * n2 + 1], a, b[n2][2], b[n2][3]);
        }
      }
    }
  });

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    if (mt * 16 >= n_rows) break;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + gq + 8 * half;
      if (r >= n_rows) continue;
      float* out = part_out + (size_t(row_th[r]) * n_slots + slot) * HD + col0 + 2 * tq;
#pragma unroll
      for (int n = 0; n < NT; ++n)
        *reinterpret_cast<float2*>(out + n * 8) = make_float2(o[mt][n][2 * half], o[mt][n][2 * half + 1]);
    }
  }
  if (sp == 0 && sr < n_rows) {
    const size_t x = size_t(row_th[sr]) * n_slots + slot;
    part_ml[2 * x] = m_run;
    part_ml[2 * x + 1] = l_run;
  }
}

// grid (T nH): one (token, head)'s prefix partitions, then its private ones, by their log-sum-exp (a fixed order:
// the same bits every replay), as the plain kernel's merge.
__global__ void bifurcated_merge_mma(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                     const int32_t* __restrict__ positions, const int32_t* __restrict__ token_group,
                                     const int32_t* __restrict__ group_shared, int G, int nH, int hd, int n_part_a,
                                     int n_part_b, const float* __restrict__ part_out,
                                     const float* __restrict__ part_ml, float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  extern __shared__ float weights[];  // [n_part_a + n_part_b] (rounded up to float4s), then [kWarps][hd] sums
  __shared__ float block_red[kWarps];
  const int th = blockIdx.x, t = th / nH;
  const int seq = token_seq[t], pos = positions[t], n_slots = n_part_a + n_part_b;
  float* o = out + size_t(th) * hd;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {  // reported by the partial kernel
    for (int d = threadIdx.x; d < hd; d += kThreads) o[d] = 0;
    return;
  }
  const int shared = shared_of(group_shared, group_of(token_group, t, G), kv.capacity()), len = pos + 1 - shared;
  const int n_a = shared > 0 ? ceil_div(shared, decode::partition_rows(shared - 1, n_part_a)) : 0;
  const int n_b = len > 0 ? ceil_div(len, decode::partition_rows(len - 1, n_part_b)) : 0;
  const int n_valid = n_a + n_b;
  decode::merge_partitions(part_ml + size_t(th) * n_slots * 2, part_out + size_t(th) * n_slots * hd, n_slots, n_valid, hd,
                           [=](int k) { return k < n_a ? k : n_part_a + k - n_a; }, weights, block_red, o);
}

// The launch's shape: M tiles a block (MT), its tasks, and the partitions of both kinds.
struct MmaPlan {
  int mt;
  MmaTasks tasks;
  int64_t blocks;  // prefix and private
};

// Partitions of a range of up to `tiles` tiles for `units` blocks' worth of work: decode_plan's cost (rounds of
// kBlocksPerSm resident blocks times the tiles each block reads, plus its start), the least n in 1 .. n_max.
int64_t partitions(int64_t units, int64_t tiles, int64_t slots, int64_t n_max) {
  int64_t best = 1, best_cost = INT64_MAX;
  for (int64_t n = 1; n <= std::min(tiles, n_max); ++n) {
    const int64_t cost = decode::ceil_div(units * n, slots) * (decode::ceil_div(tiles, n) + decode::kBlockStartTiles);
    if (cost < best_cost) best = n, best_cost = cost;
  }
  return best;
}

// From the shapes alone (the groups' sizes and lengths are on the device): a group holds at most every token, so
// 16 MT >= its rows T x the GQA heads up to 64 (more: chunks of 64); the prefix units are the groups' chunks, at
// least one a group.
MmaPlan mma_plan(int64_t T, int64_t G, int64_t n_kv, int64_t group, int64_t C, int64_t hd, int num_sms) {
  thread_local int64_t last_key[7] = {-1, -1, -1, -1, -1, -1, -1};
  thread_local MmaPlan last{};
  const int64_t key[7] = {T, G, n_kv, group, C, hd, num_sms};
  if (std::equal(key, key + 7, last_key)) return last;
  MmaPlan p{};
  const int64_t rows_max = T * group;
  p.mt = rows_max <= 16 ? 1 : rows_max <= 32 ? 2 : 4;
  const int64_t rows = 16 * p.mt, tiles = decode::ceil_div(C, kTileRows);
  // at least one block an SM: a batch too large for the shared memory (none fit) is refused by launch_mma's check,
  // not by a division by zero here
  const int64_t slots = std::max<int64_t>(1, hd == 64 ? MmaTiles<64>::blocks_per_sm(p.mt, T) : MmaTiles<128>::blocks_per_sm(p.mt, T)) * num_sms;
  const int64_t n_rc_a = decode::ceil_div(rows_max, rows), n_rc_b = decode::ceil_div(group, rows);
  const int64_t units_a = n_kv * std::max(std::min(G, T), n_rc_a), units_b = T * n_kv * n_rc_b;
  const int64_t n_part_a = partitions(units_a, tiles, slots, 1024), n_part_b = partitions(units_b, tiles, slots, kMaxPrivateParts);
  const int64_t blocks_a = G * n_kv * n_rc_a * n_part_a;
  p.tasks = {int(n_part_a), int(n_rc_a), int(n_part_b), int(n_rc_b), int(blocks_a)};
  p.blocks = blocks_a + T * n_kv * n_rc_b * n_part_b;
  std::copy(key, key + 7, last_key);
  last = p;
  return p;
}

template <int HD, int MT>
void launch_partial(const Ctx& ctx, const MmaPlan& plan, int64_t blocks, const Tensor& q, const Tensor& k_cache,
                    const Tensor& v_cache, const KvBlockTable& kv, const Tensor& token_seq, const Tensor& positions,
                    const Tensor& token_group, const Tensor& group_shared, int64_t n_heads, float scale,
                    float* part_out, float* part_ml) {
  auto kernel = bifurcated_partial_mma<HD, MT>;
  const int64_t T = q.dim(0);
  const size_t smem = MmaTiles<HD>::bytes(MT, T);
  if (smem > 48 * 1024)
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "attentionBifurcated", " (cudaFuncSetAttribute)");
  launch_pdl(ctx, kernel, static_cast<unsigned>(blocks), kThreads, smem, q.data<float>(), k_cache.data<bf16>(),
             v_cache.data<bf16>(), kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
             token_group.data<int32_t>(), group_shared.data<int32_t>(), int(T), int(group_shared.dim(0)),
             int(n_heads), plan.tasks, scale, part_out, part_ml, ctx.status);
}

}  // namespace

int64_t mma_scratch_floats(int64_t T, int64_t G, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms) {
  const MmaPlan plan = mma_plan(T, G, n_kv, n_heads / n_kv, C, hd, num_sms);
  return T * n_heads * (plan.tasks.n_part_a + plan.tasks.n_part_b) * (hd + 2);
}

void launch_mma(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                const Tensor& kv_block_table, const Tensor& positions, const Tensor& token_group,
                const Tensor& group_shared, int64_t n_heads, float scale, const Tensor* out, float* scratch,
                int num_sms, bool with_private) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int64_t T = q.dim(0), n_kv = k_cache.dim(1), G = group_shared.dim(0), hd = k_cache.dim(3);
  const MmaPlan plan = mma_plan(T, G, n_kv, n_heads / n_kv, kv.capacity(), hd, num_sms);
  const int n_slots = plan.tasks.n_part_a + plan.tasks.n_part_b;
  WEFT_CHECK(plan.blocks < (int64_t{1} << 31) && MmaTiles<128>::bytes(plan.mt, T) <= 227 * 1024,
             "attentionBifurcated", "a batch of ", T, " tokens is too large for the tensor-core kernel (", q, ", ",
             k_cache, ")");
  float* part_out = scratch;
  float* part_ml = scratch + T * n_heads * n_slots * hd;
  const int64_t blocks = with_private ? plan.blocks : plan.tasks.blocks_a;
  auto go = [&](auto head_dim, auto m_tiles) {
    launch_partial<decltype(head_dim)::value, decltype(m_tiles)::value>(ctx, plan, blocks, q, k_cache, v_cache, kv,
                                                                        token_seq, positions, token_group, group_shared,
                                                                        n_heads, scale, part_out, part_ml);
  };
  auto by_tiles = [&](auto head_dim) {
    if (plan.mt == 1)
      go(head_dim, std::integral_constant<int, 1>{});
    else if (plan.mt == 2)
      go(head_dim, std::integral_constant<int, 2>{});
    else
      go(head_dim, std::integral_constant<int, 4>{});
  };
  if (blocks > 0) {
    if (hd == 64)
      by_tiles(std::integral_constant<int, 64>{});
    else
      by_tiles(std::integral_constant<int, 128>{});
  }
  if (!out) return;
  check_launch(ctx, "attentionBifurcated", {Named{"q", q}, Named{"kCache", k_cache}});
  launch_pdl(ctx, bifurcated_merge_mma, static_cast<unsigned>(T * n_heads), kThreads,
             ((n_slots + 3) / 4 * 4 + kWarps * hd) * sizeof(float), kv, token_seq.data<int32_t>(),
             positions.data<int32_t>(), token_group.data<int32_t>(), group_shared.data<int32_t>(), int(G),
             int(n_heads), int(hd), plan.tasks.n_part_a, plan.tasks.n_part_b, part_out, part_ml, out->data<float>());
}

}  // namespace weft::cuda::bifurcated
